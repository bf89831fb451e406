"""The program cut at its layers, each slice run by its layer's container: how FSDP2 sees it.

autoshard runs a model as one exported graph, so its decoder layers never run as modules — and
FSDP2 works through module hooks (all-gather before a module's forward, free after it, all-gather
again before its backward, reduce-scatter its gradients after). `split_program` cuts a program at
its units (the decoder layers) and `StagedRunner` makes each unit's `Container` in the sharded
tree run its slice of the graph, reading its parameters when it runs. FSDP's hooks on those
containers then do exactly what they do for an eager model; the graph in between is the
tensor-parallel program, on the tensor-parallel DTensors FSDP hands back.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

from torch.distributed.tensor import DTensor

from autoshard.execute.lower import LoweringError, lower_graph
from autoshard.execute.lowered_program import LoweredProgram, wrap_output
from autoshard.execute.module import Program, ShardedModule
from autoshard.graph.capture import Captured
from autoshard.graph.units import spans, unit_of
from autoshard.graph.inputs import CONST, INPUT, STATE, program_sources
from autoshard.schema.errors import PlanError

if TYPE_CHECKING:
    from autoshard.execute.recompute import Recompute


@dataclass
class Segment:
    unit: str | None            # the container that runs it, None: the root runs it
    gm: fx.GraphModule
    state: list[str]            # the unit's parameters/buffers it reads, relative to the unit
    inputs: list[str]           # names of values from the program inputs or earlier segments
    outputs: list[str]          # names of values it defines that later segments or the output use
    release: list[str] = field(default_factory=list)  # inputs no later segment needs: dropped


def _sources(gm: fx.GraphModule, captured: Captured) -> list[tuple[fx.Node, Any]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = program_sources(captured)
    if len(placeholders) != len(sources):
        raise PlanError("the rewritten graph's inputs do not match the exported signature")
    return list(zip(placeholders, sources))


def unit_spans(gm: fx.GraphModule, captured: Captured, units: list[str]) -> list[tuple[int, int, str]]:
    """Each unit's state must be used in one contiguous stretch of the graph, units one after
    another: (first node index, last node index, unit), in graph order."""
    state = [(node, src.target) for node, src in _sources(gm, captured) if src.kind == STATE]
    ordered = spans(list(gm.graph.nodes), state, units)
    for (_, hi, a), (lo, _, b) in zip(ordered, ordered[1:]):
        if hi >= lo:
            raise PlanError(f"{a} and {b} run interleaved in the graph")
    return ordered


def split_program(gm: fx.GraphModule, captured: Captured, units: list[str]) -> tuple[list, list[Segment], Any]:
    """Cut `gm` into segments run in order: the root's prologue, one per unit (from its first
    parameter use to the next unit's), the root's epilogue. Returns (sources, segments, output
    structure, of nodes)."""
    spans = unit_spans(gm, captured, units)
    nodes = list(gm.graph.nodes)
    starts = [0] + [lo for lo, _, _ in spans] + ([spans[-1][1] + 1] if spans else [])
    owners: list[str | None] = [None] + [u for _, _, u in spans] + ([None] if spans else [])
    members: list[list[fx.Node]] = [[] for _ in starts]
    for i, n in enumerate(nodes):
        if n.op in ("call_function", "call_module", "call_method"):
            members[bisect.bisect_right(starts, i) - 1].append(n)
    sources = _sources(gm, captured)
    unit_state = {node: (src.target, unit_of(src.target, units)) for node, src in sources if src.kind == STATE}
    output = next(n for n in nodes if n.op == "output")

    segment_of = {n: k for k, ms in enumerate(members) for n in ms}
    segments = []
    for k, (unit, ms) in enumerate(zip(owners, members)):
        if not ms:
            continue
        mine = set(ms)
        external: list[fx.Node] = []
        for n in ms:
            for a in n.all_input_nodes:
                if a not in mine and a.op != "get_attr" and a not in external:
                    external.append(a)
        state = [a for a in external if unit is not None and unit_state.get(a, (None, None))[1] == unit]
        inputs = [a for a in external if a not in state]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {a: g.placeholder(a.name) for a in state + inputs}
        for n in ms:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = g.node_copy(a)
            env[n] = g.node_copy(n, lambda a: env[a])
        outs = [n for n in ms if any(u is output or segment_of.get(u, k) > k for u in n.users)]
        g.output(tuple(env[n] for n in outs))
        segments.append(Segment(
            unit=unit, gm=fx.GraphModule(gm, g), state=[unit_state[a][0][len(unit) + 1:] for a in state],
            inputs=[a.name for a in inputs], outputs=[n.name for n in outs],
        ))
    kept = {n.name for n in output.all_input_nodes}
    last = {name: i for i, seg in enumerate(segments) for name in seg.inputs}
    for i, seg in enumerate(segments):
        seg.release = [name for name, j in last.items() if j == i and name not in kept]
    return sources, segments, output.args[0]


def _state(module: nn.Module, fqn: str) -> torch.Tensor:
    *path, leaf = fqn.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, leaf)


class StagedRunner:
    """Runs one program as segments: root state read at call time, each unit's segment by its
    container. With `lowered`, the segments are the lowered local graph's (parameters enter as
    `to_local(grad_placements=...)` of FSDP's gathered DTensors), compiled per segment with
    `options` (per layer, as torchtitan compiles per block)."""

    def __init__(self, module: ShardedModule, program: Program, units: list[str], watch: Callable[[str, nn.Parameter], None],
                 recompute: Recompute | None = None, lowered: LoweredProgram | None = None, options: dict | None = None):
        self.module, self.units, self.watch, self.recompute, self.lowered = module, units, watch, recompute, lowered
        gm = program.graph_module if lowered is None else lowered.graph_module
        self.sources, self.segments, self.out_struct = split_program(gm, program.captured, units)
        self.fns = [self._segment_fn(seg, options) for seg in self.segments]

    def _segment_fn(self, seg: Segment, options: dict | None) -> Callable:
        fn = seg.gm
        if self.recompute is not None and self.recompute.wraps(seg.unit):
            fn = partial(self.recompute.run, seg.gm, unit=seg.unit)   # inside FSDP's hooks, as checkpoint_wrapper would be
        return torch.compile(fn, **options) if options is not None else fn

    def __call__(self, flat: list):
        env: dict[str, Any] = {}
        it = iter(flat)
        for node, src in self.sources:
            if src.kind == INPUT:
                env[node.name] = next(it)
            elif src.kind == CONST:
                env[node.name] = src.target
            elif unit_of(src.target, self.units) is None:
                env[node.name] = self._read(src.target, self.module, src.target)
        for seg, fn in zip(self.segments, self.fns):
            values = [env[n] for n in seg.inputs]
            if seg.unit is None:
                outs = fn(*values)
            else:
                container = self.module.get_submodule(seg.unit)
                outs = container(lambda c, *v, seg=seg, fn=fn: self._run(seg, fn, c, *v), *values)
            env.update(zip(seg.outputs, outs))
            for name in seg.release:
                del env[name]
        outs = list(fx.node.map_arg(self.out_struct, lambda n: env[n.name]))
        if self.lowered is None:
            return outs
        return [wrap_output(o, spec, size, self.module.tp_mesh)
                for o, spec, size in zip(outs, self.lowered.outputs, self.lowered.output_sizes)]

    def _read(self, rel: str, owner: nn.Module, fqn: str) -> torch.Tensor:
        t = _state(owner, rel)
        if isinstance(t, nn.Parameter):  # under FSDP, its unsharded parameter: the same object each step
            self.watch(fqn, t)
            if self.lowered is not None and isinstance(t, DTensor):
                return t.to_local(grad_placements=self.lowered.grad_placements.get(fqn))
        return t

    def _run(self, seg: Segment, fn: Callable, container: nn.Module, *values):
        state = [self._read(rel, container, f"{seg.unit}.{rel}") for rel in seg.state]
        return fn(*state, *values)


class StagedExecution:
    """Every program cut at `units` and run by their containers (under FSDP2); `watch` is told of
    each parameter a segment reads (the gradient reducer hooks it). `lower`: the segments of the
    lowered program (compiled with `options` unless None); a program the lowering cannot express
    runs on DTensors, and `notes` says why."""

    def __init__(self, units: list[str], watch: Callable[[str, nn.Parameter], None], notes: list[str] | None = None,
                 recompute: Recompute | None = None, lower: bool = False, options: dict | None = None):
        self.units, self.watch, self.notes, self.recompute = list(units), watch, list(notes or []), recompute
        self.lower, self.options = lower, options
        self.kind = "staged" if not lower else "staged-lowered" if options is None else "staged-compiled"

    def lowered_with(self, options: dict | None) -> "StagedExecution":
        """The same stages, lowered (and compiled with `options` unless None)."""
        return StagedExecution(self.units, self.watch, [], self.recompute, True, options)

    def runner(self, module: ShardedModule, program: Program) -> StagedRunner:
        lowered = None
        if self.lower:
            try:
                lowered = lower_graph(program.graph_module, program.captured, program.plan, program.simulation, module.tp_mesh)
            except LoweringError as e:
                self.notes.append(f"not lowered, runs on DTensors eagerly: {e}")
                warnings.warn(self.notes[-1], stacklevel=3)
        return StagedRunner(module, program, self.units, self.watch, self.recompute, lowered,
                            self.options if lowered is not None else None)
