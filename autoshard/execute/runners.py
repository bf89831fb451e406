"""Lowered and compiled sharded modules: `autoshard(..., compile=True)` and `compile_sharded()`.

A `ShardedModule` runs its program on DTensors. `lower_sharded(sharded)` turns every program
into a graph of plain local tensors with explicit collectives (`passes.lower`), and
`compile_sharded(sharded)` additionally hands that graph to `torch.compile` with the batch and
sequence dims dynamic, so new lengths reuse the compiled code. Parameters stay DTensors at the
module boundary (optimizers, `state_dict`, checkpoints see the same module); each call passes
their local shards into the graph, with the gradient placement the lowering derived.

Example::

    sharded = autoshard(model, mesh, example_inputs, compile=True)
    loss = sharded(input_ids=ids, labels=labels).loss      # any sequence length, no recompile
    print(sharded.lowered_graph_module.code)              # every collective, by name

A program the lowering cannot express exactly keeps running on DTensors (eagerly; the reason is
in `sharded.lowering_notes`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import fx
from torch.distributed.tensor import DTensor

from autoshard.distributed.mesh import tensor_parallel_mesh
from autoshard.graph.analyse import analyse
from autoshard.graph.capture import Captured
from autoshard.execute.lower import LoweredProgram, LoweringError, lower_graph
from autoshard.graph.simulate import PlacementSimulator
from autoshard.schema.plan import Plan
from autoshard.execute.module import ShardedModule


DEFAULT_OPTIONS = {"backend": "inductor", "dynamic": None}


class CompilableShardedModule(ShardedModule):
    """A `ShardedModule` that `torch.compile(sharded)` compiles the right way.

    Dynamo cannot trace the DTensor program for training (TORCH213.md: `as_strided not supported
    with DTensor`, RecursionError with dynamic shapes). So when a user's `torch.compile` traces
    this module, the call leaves dynamo (one graph break at the top) and the module lowers its
    programs to local graphs and compiles those (`compile_options`, inductor by default).
    Called eagerly it is exactly a `ShardedModule`.
    """

    compile_options: dict | None = None   # what a user's torch.compile(sharded) compiles with

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return _call_outside_dynamo(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def compile(self, *args, **kwargs):
        """`nn.Module.compile`: lower and compile the programs in place (same options)."""
        compile_sharded(self, **kwargs)


@torch._dynamo.disable
def _call_outside_dynamo(module: "CompilableShardedModule", *args, **kwargs):
    if not isinstance(module, LoweredShardedModule) or module._compile_options is None:
        compile_sharded(module, **(module.compile_options or {}))
    return ShardedModule.__call__(module, *args, **kwargs)


class LoweredShardedModule(CompilableShardedModule):
    """A `ShardedModule` whose programs run lowered local graphs, compiled or eager."""

    _compile_options: dict | None = None
    lowered: list[LoweredProgram | None]
    lowering_notes: list[str]

    @property
    def lowered_graph_module(self) -> fx.GraphModule | None:
        """The local graph of the first program (print `.code` to see every collective)."""
        return self.lowered[0].graph_module if self.lowered and self.lowered[0] else None

    def add_program(self, captured: Captured, plan: Plan, gm: fx.GraphModule) -> None:
        self._adding_plan = plan
        try:
            super().add_program(captured, plan, gm)
        finally:
            del self._adding_plan

    def _make_call(self, captured: Captured, gm: fx.GraphModule) -> Callable:
        plan = self._adding_plan
        if self.device_mesh.ndim > 1:
            return self._not_lowered(captured, gm, "FSDP over a data-parallel mesh dim is not lowered")
        mesh = tensor_parallel_mesh(self.device_mesh)
        sim = PlacementSimulator(analyse(captured), mesh).run(
            plan.placements(), plan.boundary_placements(), sharded_outputs=set(plan.sharded_outputs)
        )
        try:
            lowered = lower_graph(gm, captured, plan, sim, mesh)
        except LoweringError as e:
            return self._not_lowered(captured, gm, str(e))
        self.lowered.append(lowered)
        return _LoweredCall(self, captured, lowered, mesh, self._compile_options)

    def _not_lowered(self, captured: Captured, gm: fx.GraphModule, why: str) -> Callable:
        """Never silently wrong: keep the (exact) DTensor program, eagerly, and say why."""
        self.lowered.append(None)
        self.lowering_notes.append(f"program {len(self.lowered)}: not lowered, runs on DTensors eagerly: {why}")
        warnings.warn(self.lowering_notes[-1], stacklevel=3)
        return ShardedModule._make_call(self, captured, gm)


class _LoweredCall:
    """Calls one lowered program: local shards of the parameters in, DTensors for sharded outputs."""

    def __init__(self, module: ShardedModule, captured: Captured, lowered: LoweredProgram, mesh, options: dict | None):
        self.module, self.lowered, self.mesh = module, lowered, mesh
        sig = captured.program.graph_signature
        self.getters = []
        for spec in sig.input_specs:
            kind, target = spec.kind.name, spec.target
            if kind == "PARAMETER":
                self.getters.append(("param", target, lowered.grad_placements.get(target)))
            elif kind == "BUFFER":
                self.getters.append(("state", target, None))
            elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                self.getters.append(("const", captured.program.constants[target], None))
            else:
                self.getters.append(("input", spec.arg.name, lowered.dynamic_dims.get(spec.arg.name, [])))
        self.fn = lowered.graph_module
        self.compiled = options is not None
        if self.compiled:
            self.fn = torch.compile(lowered.graph_module, **options)
        self._state: dict = {}

    def __call__(self, flat_inputs: list) -> list:
        if not self._state:
            self._state.update(dict(self.module.named_parameters(remove_duplicate=False)))
            self._state.update(dict(self.module.named_buffers(remove_duplicate=False)))
        it = iter(flat_inputs)
        values = []
        for kind, target, extra in self.getters:
            if kind == "param":
                p = self._state[target]
                values.append(p.to_local(grad_placements=extra) if isinstance(p, DTensor) else p)
            elif kind == "state":
                values.append(self._state[target])
            elif kind == "const":
                values.append(target)
            else:
                x = next(it)
                if self.compiled and isinstance(x, torch.Tensor):
                    for d in extra:
                        torch._dynamo.maybe_mark_dynamic(x, d)
                values.append(x)
        outs = self.fn(*values)
        return [self._wrap(o, spec, size) for o, spec, size in zip(outs, self.lowered.outputs, self.lowered.output_sizes)]

    def _wrap(self, out, spec, size):
        if spec is None or not isinstance(out, torch.Tensor):
            return out
        dim, placements = spec
        shape = list(out.shape)
        shape[dim] = size
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
        return DTensor.from_local(out, self.mesh, placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def _convert(sharded: ShardedModule, options: dict | None) -> LoweredShardedModule:
    if any(hasattr(p, "segments") for p in sharded._programs):  # FSDP stages own program.call
        sharded.__class__ = LoweredShardedModule
        sharded._compile_options, sharded.lowered = options, [None] * len(sharded._programs)
        sharded.lowering_notes = ["not lowered, runs on DTensors eagerly: FSDP over a data-parallel mesh dim"]
        warnings.warn(sharded.lowering_notes[0], stacklevel=3)
        return sharded
    programs = list(sharded._programs)
    sharded.__class__ = LoweredShardedModule
    sharded._compile_options = options
    sharded._programs, sharded.lowered, sharded.lowering_notes = [], [], []
    for p in programs:
        sharded.add_program(p.captured, p.plan, p.graph_module)
    return sharded


def lower_sharded(sharded: ShardedModule) -> LoweredShardedModule:
    """Run `sharded`'s programs as lowered local graphs, eagerly (in place; returns it)."""
    return _convert(sharded, None)


def compile_sharded(sharded: ShardedModule, *, backend: str = "inductor", dynamic: bool | None = None, **options) -> LoweredShardedModule:
    """Lower `sharded`'s programs and `torch.compile` them (in place; returns it).

    Batch and sequence dims that the captured program keeps symbolic are marked dynamic on every
    call, so one compiled graph serves every length (lengths 0/1 specialise, as in torch).
    """
    return _convert(sharded, {"backend": backend, "dynamic": dynamic, **options})


def finish(sharded: ShardedModule, compile: bool | dict = False, lower: bool = False) -> ShardedModule:
    """The last step of `autoshard()`: `compile=True` (or a dict of `torch.compile` options)
    lowers and compiles, `lower=True` lowers eagerly; otherwise the DTensor module is returned,
    ready for a user's `torch.compile(sharded)` (see `CompilableShardedModule`)."""
    if compile:
        return compile_sharded(sharded, **(compile if isinstance(compile, dict) else {}))
    if lower:
        return lower_sharded(sharded)
    if type(sharded) is ShardedModule:
        sharded.__class__ = CompilableShardedModule  # adds behaviour only under torch.compile
    return sharded


__all__ = ["CompilableShardedModule", "LoweredShardedModule", "compile_sharded", "finish", "lower_sharded"]
