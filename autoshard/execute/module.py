"""The module `autoshard()` returns: a drop-in for the original.

- Parameters are DTensors registered under their original names (`state_dict()` keys identical,
  tied weights one Parameter under both names); buffers are the original buffers.
- `forward` takes the original signature (positional or keyword), returns the original output
  structure (HF `ModelOutput` included) with plain full tensors, except outputs the plan keeps
  sharded (vocab-sharded logits when the loss is computed in the graph).
- A call whose inputs the captured program cannot take (`graph.inputs.accepts`) is re-captured and
  re-planned once and cached; the new plan must place every parameter the same way, or the call is
  refused.
- How programs run is held, not built in: `self.execution` makes each program's runner (DTensor
  eager, lowered, compiled, staged for FSDP; `execute/runners.py`, `execute/staged.py`), and
  `run_with` swaps it for every program, the ones captured later included.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh

from autoshard.execute.materialize import non_persistent_buffers, unset_message
from autoshard.graph.capture import Captured, bind_arguments, capture_mode
from autoshard.graph.inputs import accepts
from autoshard.graph.simulate import Simulation
from autoshard.schema.errors import PlanError
from autoshard.schema.plan import Plan


@dataclass
class Program:
    """One captured-and-rewritten graph, the plan it follows, and how it is run."""

    captured: Captured
    plan: Plan
    graph_module: fx.GraphModule
    simulation: Simulation                         # the plan's placements over `captured`'s graph
    runner: Callable[[list], list] | None = None   # flat user inputs -> flat outputs


class Container(nn.Module):
    """A submodule of the sharded tree (`model`, `model.layers.0`, ...). It holds its part of the
    state and, when called, runs the graph slice it is given on that state: FSDP's hooks on a
    container then gather and free its parameters around the slice (`execute/staged.py`)."""

    def forward(self, run: Callable, *values):
        return run(self, *values)


class ShardedModule(nn.Module):
    compile_options: dict | None = None   # what a user's torch.compile(sharded) compiles with (see __call__)
    serving = None                        # plans and runs `generate` (`serve.generate.Serving`, set by autoshard())

    def __init__(self, original: nn.Module, mesh: DeviceMesh, tp_mesh: DeviceMesh, replan: Callable, execution):
        super().__init__()
        self._signature = inspect.signature(original.forward)
        self._original_type = type(original)
        self.training = original.training  # the mode the first program was captured in
        self.config = getattr(original, "config", None)
        self.device_mesh = mesh
        self.tp_mesh = tp_mesh
        self._replan = replan  # named inputs -> a PlanRun with its rewritten graph
        self.execution = execution
        self._programs: list[Program] = []
        self.unset_buffers: set[str] = set()   # non-persistent buffers with no value (built on meta): calls refused
        self.state_version = 0                 # counts `to_empty`s: runners read the new tensors

    # ---- state -----------------------------------------------------------------------------------
    def adopt(self, fqn: str, value: torch.Tensor, *, buffer: bool = False, persistent: bool = True) -> None:
        """Register a parameter or buffer at its original dotted name, creating parents as needed."""
        *path, leaf = fqn.split(".")
        mod: nn.Module = self
        for part in path:
            if not hasattr(mod, part) or not isinstance(getattr(mod, part), nn.Module):
                mod.add_module(part, Container())
            mod = getattr(mod, part)
        if buffer:
            mod.register_buffer(leaf, value, persistent=persistent)
        else:
            mod.register_parameter(leaf, value)

    def to_empty(self, *, device, recurse: bool = True) -> "ShardedModule":
        """`nn.Module.to_empty`, except that non-persistent buffers keep their values (moved to
        `device`): no checkpoint holds them (rotary `inv_freq`), so the garbage `to_empty` leaves
        would be used silently. One with no value (built on meta) stays in `unset_buffers`."""
        kept = non_persistent_buffers(self)
        super().to_empty(device=device, recurse=recurse)
        self.state_version += 1
        for fqn, buffer in non_persistent_buffers(self).items():
            if kept[fqn].is_meta:
                self.unset_buffers.add(fqn)
            else:
                buffer.copy_(kept[fqn])
        return self

    @property
    def plan(self) -> Plan:
        return self._programs[0].plan

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph of the first program (print it to see every boundary)."""
        return self._programs[0].graph_module

    @property
    def programs(self) -> list[Program]:
        return list(self._programs)

    # ---- how programs run ------------------------------------------------------------------------
    def add_program(self, run) -> None:
        """Add the program of a `PlanRun` (captured, plan, simulation, rewritten graph)."""
        if self._programs:
            _check_same_placements(self._programs[0].plan, run.plan)
        program = Program(run.captured, run.plan, run.graph, run.simulation)
        program.runner = self.execution.runner(self, program)
        self._programs.append(program)

    def run_with(self, execution) -> "ShardedModule":
        """Run every program, and every program captured later, with `execution`."""
        self.execution = execution
        for program in self._programs:
            program.runner = execution.runner(self, program)
        return self

    @property
    def lowering_notes(self) -> list[str]:
        """Why programs that were to be lowered run on DTensors instead (empty: all lowered)."""
        return self.execution.notes

    @property
    def lowered(self) -> list:
        """Each program's `LoweredProgram`, None where it runs on DTensors."""
        return [getattr(p.runner, "lowered", None) for p in self._programs]

    @property
    def lowered_graph_module(self) -> fx.GraphModule | None:
        """The local graph of the first program (print `.code` to see every collective)."""
        first = self.lowered[0] if self._programs else None
        return first.graph_module if first is not None else None

    def __call__(self, *args, **kwargs):
        # Dynamo cannot trace the DTensor program for training (`as_strided` is not supported with
        # DTensor; dynamic shapes recurse). Under a user's torch.compile the call leaves dynamo (one
        # graph break at the top) and runs the programs lowered and compiled with `compile_options`.
        if torch.compiler.is_compiling():
            return _call_outside_dynamo(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def compile(self, *args, **kwargs):
        """`nn.Module.compile`: lower and compile the programs in place (`torch.compile` options)."""
        from autoshard.execute.runners import compile_sharded

        compile_sharded(self, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """`model.generate` on the sharded model, with a KV cache split as the plan splits attention
        (`serve/generate.py`, held as `self.serving`): greedy or sampled, left padding, `eos_token_id`."""
        return self._serving().generate(input_ids, attention_mask, **kwargs)

    def generation_programs(self, batch: int, max_length: int):
        """The prefill and decode programs `generate` runs for `batch` sequences of up to
        `max_length` tokens (planned on first use): `.report()` shows the cache and a decode step."""
        return self._serving().programs(batch, max_length)

    def _serving(self):
        if self.serving is None:
            raise PlanError("generate needs a module made by autoshard(), which gives it its serving programs")
        return self.serving

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.unset_buffers:
            raise PlanError(unset_message(sorted(self.unset_buffers)))
        named = bind_arguments(self._signature, self._original_type.__name__, args, kwargs)
        for program in self._programs:
            flat = accepts(program.captured, named, self.training)
            if flat is not None:
                return self._run(program, flat)
        with capture_mode(self.training):
            run = self._replan(named)
        self.add_program(run)
        flat = accepts(run.captured, named, self.training)
        if flat is None:
            raise PlanError("re-captured program does not accept the inputs it was captured with")
        return self._run(self._programs[-1], flat)

    def _run(self, program: Program, flat: list):
        outputs = program.runner(flat)
        return pytree.tree_unflatten(list(outputs), program.captured.program.call_spec.out_spec)

    def extra_repr(self) -> str:
        return f"{self._original_type.__name__} sharded over {self.device_mesh} ({self.execution.kind})"


@torch._dynamo.disable
def _call_outside_dynamo(module: ShardedModule, *args, **kwargs):
    if module.execution.kind != "compiled":
        module.compile(**(module.compile_options or {}))
    return nn.Module.__call__(module, *args, **kwargs)


def _check_same_placements(first: Plan, new: Plan) -> None:
    diff = [f for f, p in new.params.items() if f in first.params and first.params[f].placement != p.placement]
    if diff:
        f = diff[0]
        raise PlanError(
            f"re-planning for new inputs would move parameter {f} from {first.params[f].placement} to "
            f"{new.params[f].placement}; parameters are already distributed. Call autoshard() with "
            "example_inputs shaped like this call."
        )
