"""Data parallel on the other mesh dims with FSDP2 (`fully_shard`), per decoder layer and root.

FSDP2 works through module hooks, and autoshard runs a model as one exported graph.
`data_parallel` finds the repeating units (the decoder layers, from the repeating structure of
the parameters, not from their names), applies `fully_shard` to each unit's container and the
root, and runs the module with `execute.staged.StagedExecution`: every program cut at the units,
each slice run by its container, so FSDP's hooks do what they do for an eager model — one
all-gather and one reduce-scatter per layer over `dp`.

    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "tp"))
    sharded = autoshard(model, mesh)                                  # TP on "tp", FSDP2 on "dp"
    sharded = data_parallel(autoshard(model, mesh["tp"]), mesh["dp"])  # the same, composed by hand

Each data-parallel rank passes its own batch (ranks of one tensor-parallel group the same one);
gradients are averaged over `dp`, so with equal token counts per rank the steps equal
single-process steps on the whole batch.
"""

from __future__ import annotations

import warnings
from collections import defaultdict



import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.distributed.parameters import GradReducer
from autoshard.execute.module import Container
from autoshard.execute.staged import StagedExecution, unit_spans
from autoshard.graph.units import unit_of
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


# ---- composing -----------------------------------------------------------------------------------
def _beside_strided(param: nn.Parameter) -> Shard | None:
    """FSDP2's dim for a weight split part by part over tp (a fused q|k|v or gate|up): another dim
    than the parts'. On the same dim FSDP's own `_StridedShard` nests in the parts' layout, and
    DTensor then gathers such a weight (its gradient too) in the wrong row order."""
    fused = [p for p in getattr(param, "placements", ()) if isinstance(p, _StridedShard)]
    if not fused:
        return None  # FSDP's default: dim 0
    dims = [d for d in range(param.ndim) if d != fused[0].dim % param.ndim]
    return Shard(max(dims, key=lambda d: param.shape[d])) if dims else None


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
            unit_spans(p.graph_module, p.captured, units)
        except PlanError as e:
            warnings.warn(f"FSDP per unit is not possible ({e}); sharding the whole model as one FSDP group")
            units = []
            break
    buckets = _unit_buckets(sharded, units)
    _broadcast_from_first(sharded, mesh)
    opts = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "shard_placement_fn": _beside_strided}
    if mp_policy is not None:
        opts["mp_policy"] = mp_policy
    for path in units:
        container = sharded.get_submodule(path)
        if not isinstance(container, Container):
            raise PlanError(f"{path} is a {type(container).__name__}, not a container autoshard made")
        fully_shard(container, **opts)
    fully_shard(sharded, **opts)

    if isinstance(getattr(sharded, "grad_reducer", None), GradReducer):
        sharded.grad_reducer.remove()  # its parameters are FSDP's sharded ones now
    reducer = GradReducer(buckets)
    sharded.grad_reducer = reducer
    before = sharded.execution
    recompute = getattr(sharded.execution, "recompute", None)
    if recompute is not None and set(recompute.units) != set(units):
        raise PlanError(f"activation checkpointing layers {sorted(recompute.units)} differ from FSDP's units {sorted(units)}")
    staged = StagedExecution(units, reducer.watch, [], recompute)
    if before.kind in ("lowered", "compiled"):   # composed by hand after compile=/lower=: each stage lowered too
        staged = staged.lowered_with(before.options)
    return sharded.run_with(staged)  # later programs too


def _unit_buckets(sharded: nn.Module, units: list[str]) -> list[list[str]]:
    """One gradient bucket per unit (reduced before FSDP reduce-scatters that unit) and one for the
    rest, holding the replicated parameters, whose gradients may be `Partial` over tp."""
    buckets: dict[str | None, list[str]] = defaultdict(list)
    for fqn, p in sharded.named_parameters():
        if isinstance(p, DTensor) and all(pl.is_replicate() for pl in p.placements):
            buckets[unit_of(fqn, units)].append(fqn)
    return list(buckets.values())


def _broadcast_from_first(sharded: nn.Module, mesh: DeviceMesh) -> None:
    """Every parameter's local shard from data-parallel rank 0: one broadcast per dtype and dim."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in sharded.parameters():
        if p.is_meta:
            continue   # built on meta: a checkpoint fills every replica alike (`autoshard.load`)
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
