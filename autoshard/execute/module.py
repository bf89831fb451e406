"""The module `autoshard()` returns: a drop-in for the original.

- Parameters are DTensors registered under their original names (`state_dict()` keys identical,
  tied weights one Parameter under both names); buffers are the original buffers.
- `forward` takes the original signature (positional or keyword), returns the original output
  structure (HF `ModelOutput` included) with plain full tensors, except outputs the plan keeps
  sharded (vocab-sharded logits when the loss is computed in the graph).
- A call whose inputs the captured program cannot take is re-captured and re-planned once and
  cached; the new plan must place every parameter the same way, or the call is refused. "Cannot
  take" is decided strictly, because a program run outside what export proved is silently wrong:
  other arguments or non-tensor values, another tensor dtype or rank, a size outside export's
  range constraints — including sizes 0 and 1, which export lets through although it traced
  assuming >= 2 (a `if x.shape[0] == 1` branch was decided for the example) — or another
  train/eval mode (dropout is baked into the graph). Ranks check that the new plan agrees.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from autoshard.schema.errors import PlanError
from autoshard.graph.capture import Captured, bind_arguments, capture_mode
from autoshard.schema.plan import Plan


@dataclass
class Program:
    """One captured-and-rewritten graph and how to call it."""

    captured: Captured
    plan: Plan
    graph_module: fx.GraphModule
    call: Callable


class ShardedModule(nn.Module):
    def __init__(self, original: nn.Module, mesh: DeviceMesh, replan: Callable[[dict], tuple[Captured, Plan, fx.GraphModule]]):
        super().__init__()
        self._signature = inspect.signature(original.forward)
        self._original_type = type(original)
        self.training = original.training  # the mode the first program was captured in
        self.config = getattr(original, "config", None)
        self.device_mesh = mesh
        self._replan = replan
        self._programs: list[Program] = []

    # ---- state -----------------------------------------------------------------------------------
    def adopt(self, fqn: str, value: torch.Tensor, *, buffer: bool = False, persistent: bool = True) -> None:
        """Register a parameter or buffer at its original dotted name, creating parents as needed."""
        *path, leaf = fqn.split(".")
        mod: nn.Module = self
        for part in path:
            if not hasattr(mod, part) or not isinstance(getattr(mod, part), nn.Module):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if buffer:
            mod.register_buffer(leaf, value, persistent=persistent)
        else:
            mod.register_parameter(leaf, value)

    @property
    def plan(self) -> Plan:
        return self._programs[0].plan

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph of the first program (print it to see every boundary)."""
        return self._programs[0].graph_module

    def add_program(self, captured: Captured, plan: Plan, gm: fx.GraphModule) -> None:
        if self._programs:
            _check_same_placements(self._programs[0].plan, plan)
        self._programs.append(Program(captured, plan, gm, self._make_call(captured, gm)))

    def _make_call(self, captured: Captured, gm: fx.GraphModule) -> Callable:
        sig = captured.program.graph_signature
        getters = []
        for spec in sig.input_specs:
            kind, target = spec.kind.name, spec.target
            if kind == "PARAMETER":
                getters.append(("state", target))
            elif kind == "BUFFER":
                getters.append(("state", target))
            elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                getters.append(("const", captured.program.constants[target]))
            else:
                getters.append(("input", None))
        state_lookup = {}

        def call(flat_inputs: list) -> list:
            if not state_lookup:
                state_lookup.update(dict(self.named_parameters(remove_duplicate=False)))
                state_lookup.update(dict(self.named_buffers(remove_duplicate=False)))
            it = iter(flat_inputs)
            values = [state_lookup[t] if k == "state" else t if k == "const" else next(it) for k, t in getters]
            # no module hooks: the graph is internal (see runtime.RuntimeOp); export turns a model's
            # `no_grad` blocks into grad-mode switches, so restore the mode even if the graph raises
            with torch.set_grad_enabled(torch.is_grad_enabled()):
                return gm.forward(*values)

        return call

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        named = bind_arguments(self._signature, self._original_type.__name__, args, kwargs)
        for program in self._programs:
            flat = _accepts(program.captured, named, self.training)
            if flat is not None:
                return self._run(program, flat)
        with capture_mode(self.training):
            captured, plan, gm = self._replan(named)
        _agree(plan, self.device_mesh)
        self.add_program(captured, plan, gm)
        flat = _accepts(captured, named, self.training)
        if flat is None:
            raise PlanError("re-captured program does not accept the inputs it was captured with")
        return self._run(self._programs[-1], flat)

    def _run(self, program: Program, flat: list):
        outputs = program.call(flat)
        return pytree.tree_unflatten(list(outputs), program.captured.program.call_spec.out_spec)

    def extra_repr(self) -> str:
        return f"{self._original_type.__name__} sharded over {self.device_mesh}"


def _accepts(captured: Captured, named: dict, training: bool | None = None) -> list | None:
    """The flat user inputs for this program, or None if it cannot take these arguments."""
    if training is not None and captured.training != training:
        return None
    named = {**named}
    for k, v in captured.constant_inputs.items():
        if k not in named:
            named[k] = v  # defaults autoshard added at capture (use_cache=False)
    if set(named) != set(captured.input_names) or any(named[k] != v for k, v in captured.constant_inputs.items() if not isinstance(v, torch.Tensor)):
        return None
    ordered = {k: named[k] for k in captured.input_names}
    flat, spec = pytree.tree_flatten(((), ordered))
    if spec != captured.program.call_spec.in_spec:
        return None
    placeholders = [n for n in captured.program.graph.nodes if n.op == "placeholder" and n.name in captured.user_input_placeholders]
    try:
        from torch._export.utils import _check_input_constraints_for_graph

        paths = pytree.tree_flatten_with_path(((), ordered))[0]
        _check_input_constraints_for_graph(placeholders, paths, captured.program.range_constraints)
    except Exception:  # noqa: BLE001 - any violated guard means: capture again for these shapes
        return None
    if not _same_dtypes(placeholders, flat) or not _within_ranges(placeholders, flat, captured.program.range_constraints):
        return None
    return [v.full_tensor() if isinstance(v, DTensor) else v for v in flat]


def _same_dtypes(placeholders: list[fx.Node], flat: list) -> bool:
    """Export's dtype asserts are erased from the rewritten graph; a mask passed as bool instead of
    int64 (or a bf16 `inputs_embeds` into an fp32 capture) takes another path: capture again."""
    for node, arg in zip(placeholders, flat):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor) and val.dtype != arg.dtype:
            return False
    return True


def _within_ranges(placeholders: list[fx.Node], flat: list, ranges: dict) -> bool:
    """Every symbolic size inside export's range, lower bound included.

    `torch.export` deliberately lets sizes 0 and 1 through its own check although it traced
    assuming >= 2: a branch on `size == 1` (or a broadcast) was decided for the example, so a
    batch of 1 could run the wrong code. Such a call is captured again instead.
    """
    import sympy
    from torch._export.passes.add_runtime_assertions_for_constraints_pass import _convert_range_to_int

    for node, arg in zip(placeholders, flat):
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor)):
            continue
        for size, actual in zip(val.shape, arg.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) and size.node.expr in ranges:
                low, high = _convert_range_to_int(ranges[size.node.expr])
                if not low <= int(actual) <= high:
                    return False
    return True


def _agree(plan: Plan, mesh: DeviceMesh) -> None:
    """A re-plan happens on every rank for the same call: check the ranks still agree."""
    from autoshard.distributed.mesh import tensor_parallel_mesh
    from autoshard.distributed.agree import agree_across_ranks

    agree_across_ranks(plan, tensor_parallel_mesh(mesh))


def _check_same_placements(first: Plan, new: Plan) -> None:
    diff = [f for f, p in new.params.items() if f in first.params and first.params[f].placement != p.placement]
    if diff:
        f = diff[0]
        raise PlanError(
            f"re-planning for new inputs would move parameter {f} from {first.params[f].placement} to "
            f"{new.params[f].placement}; parameters are already distributed. Call autoshard() with "
            "example_inputs shaped like this call."
        )
