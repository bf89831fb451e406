"""Data parallel on the other mesh dims with FSDP2 (`fully_shard`), per decoder layer and root.

autoshard runs a model as one exported graph, so its decoder layers never run as modules — and
FSDP2 works through module hooks (all-gather before a module's forward, free after it, all-gather
again before its backward, reduce-scatter its gradients after). `data_parallel` cuts every
program of a `ShardedModule` at its repeating units (the decoder layers, found from the repeating
structure of the parameters, not from their names) and makes each unit's container in the
`ShardedModule` tree run its slice of the graph, reading its parameters when it runs. FSDP's
hooks on those containers then do exactly what they do for an eager model: one all-gather and
one reduce-scatter per layer over `dp`; the graph in between is the tensor-parallel program,
on the tensor-parallel DTensors FSDP hands back.

    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "tp"))
    sharded = autoshard(model, mesh)                                  # TP on "tp", FSDP2 on "dp"
    sharded = data_parallel(autoshard(model, mesh["tp"]), mesh["dp"])  # the same, composed by hand

Each data-parallel rank passes its own batch (ranks of one tensor-parallel group the same one);
gradients are averaged over `dp`, so with equal token counts per rank the steps equal
single-process steps on the whole batch.
"""

from __future__ import annotations

import bisect
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from autoshard.distributed.parameters import GradReducer
from autoshard.schema.errors import PlanError


# ---- options --------------------------------------------------------------------------------------
def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The dims of `mesh` other than "tp" (None for a 1-D mesh): FSDP over one, HSDP over two."""
    names = [n for n in (mesh.mesh_dim_names or ()) if n != "tp"]
    if mesh.ndim == 1 or not names:
        return None
    return mesh[names[0]] if len(names) == 1 else mesh[tuple(names)]


def resolve_fsdp(mesh: DeviceMesh, fsdp: bool | dict | None) -> dict | None:
    """`autoshard(..., fsdp=)`: None applies FSDP when the mesh has data-parallel dims, False never,
    True or a dict of `data_parallel` options (mp_policy, reshard_after_forward) always."""
    dp = data_parallel_mesh(mesh)
    if fsdp is False or (fsdp is None and dp is None):
        return None
    if dp is None:
        raise PlanError(f"fsdp= needs a mesh with a data-parallel dim besides 'tp', e.g. ('dp', 'tp'); got {mesh.mesh_dim_names}")
    opts = {} if fsdp in (None, True) else dict(fsdp)
    unknown = set(opts) - {"mp_policy", "reshard_after_forward", "units"}
    if unknown:
        raise PlanError(f"unknown fsdp options {sorted(unknown)}; use mp_policy, reshard_after_forward, units")
    return {"mesh": dp, **opts}


def cast_parameters(skeleton: nn.Module, opts: dict | None) -> nn.Module:
    """Capture in the dtype the graph will compute in: under a `MixedPrecisionPolicy` FSDP hands the
    graph `param_dtype` parameters, and export bakes every dtype cast (HF's norms) into the graph."""
    dtype = getattr((opts or {}).get("mp_policy"), "param_dtype", None)
    if dtype is not None:
        for p in skeleton.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return skeleton


# ---- the units ------------------------------------------------------------------------------------
def repeating_units(module: nn.Module) -> list[str]:
    """Paths of the largest set of sibling blocks (two or more parameters each) with identical
    parameters (names relative to each sibling, shapes, dtypes, placements): a transformer's
    decoder layers, whatever they are called. Empty when no block repeats. (Single weights that
    happen to match, like an embedding and an LM head of the same shape, are not units.)

    >>> repeating_units(sharded)
    ['model.layers.0', 'model.layers.1']
    """
    best: list[str] = []
    best_size = 0
    for path, mod in module.named_modules():
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, child in mod.named_children():
            sig = _signature(child)
            if len(sig) >= 2:
                groups[sig].append(f"{path}.{name}" if path else name)
        for sig, members in groups.items():
            size = len(members) * sum(numel for *_, numel in sig)
            if len(members) >= 2 and size > best_size:
                best, best_size = members, size
    return best


def _signature(module: nn.Module) -> tuple:
    out = []
    for name, p in module.named_parameters():
        placement = tuple(map(str, p.placements)) if isinstance(p, DTensor) else ()
        out.append((name, tuple(p.shape), str(p.dtype), placement, p.numel()))
    return tuple(out)


class Stage(nn.Module):
    """A unit's container in the `ShardedModule` tree, made callable: it runs the graph slice it is
    given on its own (FSDP-managed) parameters. Holds nothing but the unit's state."""

    def forward(self, run: Callable, *values):
        return run(self, *values)


# ---- composing -----------------------------------------------------------------------------------
def data_parallel(
    sharded: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | int | None = None,
    units: list[str] | None = None,
) -> nn.Module:
    """FSDP2 over `mesh` (the data-parallel sub-mesh) for a module `autoshard` sharded over tensor
    parallel ranks: `fully_shard` on each repeating unit (`units`, default `repeating_units`), then
    on the root. Returns `sharded` (now also an `FSDPModule`).

    Weights are first broadcast from data-parallel rank 0 (as DDP does), so replicas that were
    initialised differently still start equal. With `mp_policy.param_dtype` the graph must have
    been captured in that dtype: pass `fsdp={"mp_policy": ...}` to `autoshard` instead.

    >>> mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    >>> sharded = data_parallel(autoshard(model, mesh["tp"]), mesh["dp"])
    """
    programs = sharded._programs
    want = getattr(mp_policy, "param_dtype", None)
    for program in programs:
        state = program.captured.program.state_dict
        dtypes = {state[f].dtype for f in program.captured.param_fqns.values() if state[f].is_floating_point()}
        if want is not None and dtypes and dtypes != {want}:
            raise PlanError(
                f"mp_policy.param_dtype={want} but the graph was captured with {sorted(map(str, dtypes))} parameters; "
                "pass fsdp={'mp_policy': ...} to autoshard() so it captures in the compute dtype"
            )
    units = repeating_units(sharded) if units is None else list(units)
    for p in programs:
        try:
            _check_units(p.graph_module, p.captured, units)
        except PlanError as e:
            warnings.warn(f"FSDP per unit is not possible ({e}); sharding the whole model as one FSDP group")
            units = []
            break
    buckets = _unit_buckets(sharded, units)
    _broadcast_from_first(sharded, mesh)
    opts = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        opts["mp_policy"] = mp_policy
    for path in units:
        stage = sharded.get_submodule(path)
        if type(stage) is nn.Module:
            stage.__class__ = Stage  # the container has no state of its own but its parameters
        elif not isinstance(stage, Stage):
            raise PlanError(f"{path} is a {type(stage).__name__}, not a container autoshard made")
        fully_shard(stage, **opts)
    fully_shard(sharded, **opts)

    if isinstance(getattr(sharded, "grad_reducer", None), GradReducer):
        sharded.grad_reducer.remove()  # its parameters are FSDP's sharded ones now
    reducer = GradReducer(buckets)
    sharded.grad_reducer = reducer
    staged = _Stager(sharded, units, reducer)
    for program in programs:
        staged.install(program)
    # Programs captured later (another input signature) must run staged too.
    add_program = sharded.add_program

    def add_and_stage(captured, plan, gm):
        add_program(captured, plan, gm)
        staged.install(sharded._programs[-1])

    sharded.add_program = add_and_stage
    return sharded


def _unit_buckets(sharded: nn.Module, units: list[str]) -> list[list[str]]:
    """One gradient bucket per unit (reduced before FSDP reduce-scatters that unit) and one for the
    rest, holding the replicated parameters, whose gradients may be `Partial` over tp."""
    buckets: dict[str | None, list[str]] = defaultdict(list)
    for fqn, p in sharded.named_parameters():
        if isinstance(p, DTensor) and all(pl.is_replicate() for pl in p.placements):
            buckets[_unit_of(fqn, units)].append(fqn)
    return list(buckets.values())


def _unit_of(fqn: str, units: list[str]) -> str | None:
    for u in units:
        if fqn.startswith(u + "."):
            return u
    return None


def _broadcast_from_first(sharded: nn.Module, mesh: DeviceMesh) -> None:
    """Every parameter's local shard from data-parallel rank 0: one broadcast per dtype and dim."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in sharded.parameters():
        by_dtype[p.dtype].append(p._local_tensor if isinstance(p, DTensor) else p.data)
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if group.size() == 1:
            continue
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, dist.get_global_rank(group, 0), group=group)
            for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(chunk.view_as(t))


# ---- cutting the graph -----------------------------------------------------------------------------
@dataclass
class _Segment:
    unit: str | None            # the Stage that runs it, None: the root runs it
    gm: fx.GraphModule
    state: list[str]            # the unit's parameters/buffers it reads, relative to the unit
    inputs: list[str]           # names of values from the program inputs or earlier segments
    outputs: list[str]          # names of values it defines that later segments or the output use
    release: list[str] = field(default_factory=list)  # inputs no later segment needs: dropped


def _state(module: nn.Module, fqn: str) -> torch.Tensor:
    *path, leaf = fqn.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, leaf)


def _sources(gm: fx.GraphModule, captured) -> list[tuple[fx.Node, str, Any]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = captured.program.graph_signature.input_specs
    if len(placeholders) != len(specs):
        raise PlanError("the rewritten graph's inputs do not match the exported signature")
    out = []
    for node, spec in zip(placeholders, specs):
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            out.append((node, "state", spec.target))
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            out.append((node, "const", captured.program.constants[spec.target]))
        else:
            out.append((node, "input", None))
    return out


def _check_units(gm: fx.GraphModule, captured, units: list[str]) -> list[tuple[int, int, str]]:
    """Each unit's state must be used in one contiguous stretch of the graph, units one after
    another: (first node index, last node index, unit), in graph order."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    spans: dict[str, list[int]] = {}
    for node, kind, target in _sources(gm, captured):
        unit = _unit_of(target, units) if kind == "state" else None
        if unit is not None and node.users:
            lo, hi = min(index[u] for u in node.users), max(index[u] for u in node.users)
            s = spans.setdefault(unit, [lo, hi])
            s[0], s[1] = min(s[0], lo), max(s[1], hi)
    ordered = sorted((lo, hi, u) for u, (lo, hi) in spans.items())
    for (_, hi, a), (lo, _, b) in zip(ordered, ordered[1:]):
        if hi >= lo:
            raise PlanError(f"{a} and {b} run interleaved in the graph")
    return ordered


def split_program(gm: fx.GraphModule, captured, units: list[str]) -> tuple[list, list[_Segment], Any]:
    """Cut `gm` into segments run in order: the root's prologue, one per unit (from its first
    parameter use to the next unit's), the root's epilogue. Returns (sources, segments, output
    structure, of nodes)."""
    spans = _check_units(gm, captured, units)
    nodes = list(gm.graph.nodes)
    starts = [0] + [lo for lo, _, _ in spans] + ([spans[-1][1] + 1] if spans else [])
    owners: list[str | None] = [None] + [u for _, _, u in spans] + ([None] if spans else [])
    members: list[list[fx.Node]] = [[] for _ in starts]
    for i, n in enumerate(nodes):
        if n.op in ("call_function", "call_module", "call_method"):
            members[bisect.bisect_right(starts, i) - 1].append(n)
    sources = _sources(gm, captured)
    unit_state = {node: (target, _unit_of(target, units)) for node, kind, target in sources if kind == "state"}
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
        segments.append(_Segment(
            unit=unit, gm=fx.GraphModule(gm, g), state=[unit_state[a][0][len(unit) + 1:] for a in state],
            inputs=[a.name for a in inputs], outputs=[n.name for n in outs],
        ))
    kept = {n.name for n in output.all_input_nodes}
    last = {name: i for i, seg in enumerate(segments) for name in seg.inputs}
    for i, seg in enumerate(segments):
        seg.release = [name for name, j in last.items() if j == i and name not in kept]
    return sources, segments, output.args[0]


class _Stager:
    """Replaces a program's call: root state read at call time, each segment run by its Stage."""

    def __init__(self, sharded: nn.Module, units: list[str], reducer: GradReducer):
        self.sharded, self.units, self.reducer = sharded, units, reducer

    def install(self, program) -> None:
        sources, segments, out_struct = split_program(program.graph_module, program.captured, self.units)
        program.segments = segments
        program.call = lambda flat: self._call(sources, segments, out_struct, flat)

    def _call(self, sources, segments: list[_Segment], out_struct, flat: list):
        env: dict[str, Any] = {}
        it = iter(flat)
        for node, kind, target in sources:
            if kind == "input":
                env[node.name] = next(it)
            elif kind == "const":
                env[node.name] = target
            elif _unit_of(target, self.units) is None:
                env[node.name] = self._read(target)
        for seg in segments:
            values = [env[n] for n in seg.inputs]
            if seg.unit is None:
                outs = seg.gm(*values)
            else:
                stage = self.sharded.get_submodule(seg.unit)
                outs = stage(lambda s, *v, seg=seg: self._run(seg, s, *v), *values)
            env.update(zip(seg.outputs, outs))
            for name in seg.release:
                del env[name]
        return list(fx.node.map_arg(out_struct, lambda n: env[n.name]))

    def _read(self, fqn: str) -> torch.Tensor:
        t = _state(self.sharded, fqn)
        if isinstance(t, nn.Parameter):
            self.reducer.watch(fqn, t)
        return t

    def _run(self, seg: _Segment, stage: nn.Module, *values):
        state = []
        for rel in seg.state:
            t = _state(stage, rel)
            if isinstance(t, nn.Parameter):  # FSDP's unsharded parameter, the same object each step
                self.reducer.watch(f"{seg.unit}.{rel}", t)
            state.append(t)
        return seg.gm(*state, *values)
