"""How a `ShardedModule` runs its programs: on DTensors, lowered to local tensors, or compiled.

A module holds one *execution* (`sharded.execution`), which makes a runner for each program it
has and each one captured later; `sharded.run_with(execution)` changes it for all of them.

- `DTensorExecution` (default): the rewritten program on DTensors, eagerly.
- `LoweredExecution()` (`lower=True`, `lower_sharded`): every program lowered to plain local
  tensors with explicit collectives (`execute/lower.py`), run eagerly;
  `LoweredExecution(options)` (`compile=True`, `compile_sharded`) hands that graph to
  `torch.compile` with the batch and sequence dims dynamic, so new lengths reuse the compiled code.
- `StagedExecution` (`execute/staged.py`): the program cut at its layers for FSDP2.

Parameters stay DTensors at the module boundary (optimizers, `state_dict`, checkpoints see the
same module); a lowered runner passes their local shards into the graph, with the gradient
placement the lowering derived. A program the lowering cannot express exactly keeps running on
DTensors, and `sharded.lowering_notes` says why.

Example::

    sharded = autoshard(model, mesh, example_inputs, compile=True)
    loss = sharded(input_ids=ids, labels=labels).loss      # any sequence length, no recompile
    print(sharded.lowered_graph_module.code)              # every collective, by name
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.tensor import DTensor

from autoshard.execute.lower import LoweredProgram, LoweringError, lower_graph
from autoshard.execute.lowered_program import wrap_output
from autoshard.execute.module import Program, ShardedModule
from autoshard.execute.recompute import Recompute, SegmentedProgram
from autoshard.graph.inputs import CONST, INPUT, program_sources

DEFAULT_OPTIONS = {"backend": "inductor", "dynamic": None}


class ModuleState:
    """The module's parameters and buffers by every name they have, read at the first call (FSDP
    replaces parameters after the runner is made)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self._state, self._version = module, {}, None

    def __getitem__(self, fqn: str) -> torch.Tensor:
        version = getattr(self.module, "state_version", 0)   # `to_empty` makes new buffers
        if not self._state or version != self._version:
            self._state.clear()
            self._version = version
            self._state.update(dict(self.module.named_parameters(remove_duplicate=False)))
            self._state.update(dict(self.module.named_buffers(remove_duplicate=False)))
        return self._state[fqn]


class DTensorRunner:
    """Runs the rewritten program on DTensors."""

    lowered = None

    def __init__(self, module: ShardedModule, program: Program, recompute: Recompute | None = None):
        self.graph_module, self.sources, self.state = program.graph_module, program_sources(program.captured), ModuleState(module)
        self.fn = self.graph_module.forward if recompute is None else SegmentedProgram(self.graph_module, program.captured, recompute)

    def __call__(self, flat_inputs: list) -> list:
        it = iter(flat_inputs)
        values = [next(it) if s.kind == INPUT else s.target if s.kind == CONST else self.state[s.target] for s in self.sources]
        # no module hooks: the graph is internal (see dtensor_ops.RuntimeOp); export turns a model's
        # `no_grad` blocks into grad-mode switches, so restore the mode even if the graph raises
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return self.fn(*values)


class LoweredRunner:
    """Runs one lowered program: local shards of the parameters in, DTensors for sharded outputs."""

    def __init__(self, module: ShardedModule, program: Program, lowered: LoweredProgram, options: dict | None,
                 recompute: Recompute | None = None):
        self.lowered, self.mesh, self.state = lowered, module.tp_mesh, ModuleState(module)
        self.sources = program_sources(program.captured)
        self.compiled = options is not None
        fn = lowered.graph_module if recompute is None else SegmentedProgram(lowered.graph_module, program.captured, recompute)
        self.fn = torch.compile(fn, **options) if self.compiled else fn

    def __call__(self, flat_inputs: list) -> list:
        it = iter(flat_inputs)
        values = []
        for s in self.sources:
            if s.kind == INPUT:
                x = next(it)
                if self.compiled and isinstance(x, torch.Tensor):
                    for d in self.lowered.dynamic_dims.get(s.name, []):
                        torch._dynamo.maybe_mark_dynamic(x, d)
                values.append(x)
            elif s.kind == CONST:
                values.append(s.target)
            else:
                t = self.state[s.target]
                grads = self.lowered.grad_placements.get(s.target) if s.parameter else None
                if isinstance(t, DTensor):   # a placed buffer (a KV cache): its own storage, written in place
                    t = t.to_local(grad_placements=grads) if s.parameter else t._local_tensor
                values.append(t)
        outs = self.fn(*values)
        return [wrap_output(o, spec, size, self.mesh) for o, spec, size in zip(outs, self.lowered.outputs, self.lowered.output_sizes)]


class DTensorExecution:
    """Every program on DTensors, eagerly."""

    kind = "dtensor"

    def __init__(self, recompute: Recompute | None = None):
        self.notes: list[str] = []
        self.recompute = recompute

    def runner(self, module: ShardedModule, program: Program):
        return DTensorRunner(module, program, self.recompute)


class LoweredExecution:
    """Every program lowered to local tensors; compiled with `torch.compile(**options)` unless
    `options` is None. Never silently wrong: a program the lowering cannot express keeps its
    (exact) DTensor runner, and `notes` says why."""

    def __init__(self, options: dict | None = None, recompute: Recompute | None = None):
        self.options, self.recompute = options, recompute
        self.kind = "lowered" if options is None else "compiled"
        self.notes: list[str] = []
        self._count = 0

    def runner(self, module: ShardedModule, program: Program):
        self._count += 1
        if module.device_mesh.ndim > 1:
            return self._not_lowered(module, program, "FSDP over a data-parallel mesh dim is not lowered")
        try:
            lowered = lower_graph(program.graph_module, program.captured, program.plan, program.simulation, module.tp_mesh)
        except LoweringError as e:
            return self._not_lowered(module, program, str(e))
        return LoweredRunner(module, program, lowered, self.options, self.recompute)

    def _not_lowered(self, module, program, why: str):
        self.notes.append(f"program {self._count}: not lowered, runs on DTensors eagerly: {why}")
        warnings.warn(self.notes[-1], stacklevel=4)
        return DTensorRunner(module, program, self.recompute)


def lower_sharded(sharded: ShardedModule) -> ShardedModule:
    """Run `sharded`'s programs as lowered local graphs, eagerly (in place; returns it)."""
    return _run_lowered(sharded, None)


def compile_sharded(sharded: ShardedModule, *, backend: str = "inductor", dynamic: bool | None = None, **options) -> ShardedModule:
    """Lower `sharded`'s programs and `torch.compile` them (in place; returns it).

    Batch and sequence dims that the captured program keeps symbolic are marked dynamic on every
    call, so one compiled graph serves every length (lengths 0/1 specialise, as in torch).
    """
    return _run_lowered(sharded, {"backend": backend, "dynamic": dynamic, **options})


def _run_lowered(sharded: ShardedModule, options: dict | None) -> ShardedModule:
    if sharded.execution.kind.startswith("staged"):  # FSDP's layer stages, each lowered
        return sharded.run_with(sharded.execution.lowered_with(options))
    return sharded.run_with(LoweredExecution(options, getattr(sharded.execution, "recompute", None)))


def finish(sharded: ShardedModule, compile: bool | dict = False, lower: bool = False) -> ShardedModule:
    """The last step of `autoshard()`: `compile=True` (or a dict of `torch.compile` options)
    lowers and compiles, `lower=True` lowers eagerly; otherwise the DTensor module is returned,
    ready for a user's `torch.compile(sharded)` (see `ShardedModule.__call__`)."""
    if compile:
        return compile_sharded(sharded, **(compile if isinstance(compile, dict) else {}))
    if lower:
        return lower_sharded(sharded)
    return sharded


__all__ = ["DTensorExecution", "LoweredExecution", "compile_sharded", "finish", "lower_sharded"]
