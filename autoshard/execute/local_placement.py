"""Which placement each value of the graph being lowered holds: the forward half of the lowering's
analysis (`grad_placement` is the backward half).

A value's placement is what the plan's simulation says of the node it came from, written the way
the local program reads it (a negative shard dim counted from the front, every partial sum
`Partial()` but a mean of equal shards' means, `Partial(avg)`); a runtime module's output is what
that module makes of its inputs' placements.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.execute import dtensor_ops as runtime
from autoshard.execute import local_ops as rt
from autoshard.graph.grouped import fused_linear_placement, grouped_mm_placement
from autoshard.graph.simulate import Simulation
from autoshard.schema.errors import PlanError
from autoshard.schema.placements import parse_placement

REPLICATE, PARTIAL, PARTIAL_AVG = Replicate(), Partial(), Partial("avg")


def local_placement(p: Placement, node: fx.Node, index: int | None = None) -> Placement:
    """`p` (the placement of `node`'s value, or of its `index`-th output) as the lowering reads it."""
    if isinstance(p, _StridedShard):
        return p
    if not p.is_shard():
        return REPLICATE if p.is_replicate() else PARTIAL_AVG if p == PARTIAL_AVG else PARTIAL
    val = node.meta.get("val")
    if index is not None and isinstance(val, (tuple, list)):
        val = val[index]
    ndim = val.ndim if isinstance(val, torch.Tensor) else None
    return Shard(p.dim % ndim) if ndim and p.dim < 0 else Shard(p.dim)


def global_value(node: fx.Node):
    """The (fake) global value a node of the rewritten graph stands for."""
    if node.op == "call_module" and "val" in node.meta:  # an op run whole (ReplicatedLocal)
        return node.meta["val"]
    if node.op == "call_module":  # the other runtime modules keep their input's global shape
        return global_value(node.args[0])
    if node.op == "call_function" and node.target in (rt.shard_local, rt.partition_value):
        return global_value(node.args[0])
    return node.meta.get("val")


def forward_placements(graph: fx.Graph, sim: Simulation, module_of: Callable, error: type[PlanError] = PlanError) -> dict:
    """node -> the placement of its local value (None: a plain value; a tuple for multi-output ops)."""
    # a planned boundary right at a node (`consumer == source`): the node itself holds the source layout
    pre = {r.source: parse_placement(r.src) for r in sim.redistributions if r.planned and r.consumer == r.source and "(" in r.src}
    placement: dict[fx.Node, object] = {}
    for node in graph.nodes:
        spec = sim.specs.get(node.name)
        if node.op == "call_module":
            placement[node] = _module_placement(node, module_of(node), placement, error)
        elif node.op == "call_function" and node.name in pre:
            placement[node] = local_placement(pre[node.name], node)
        elif node.op in ("placeholder", "call_function") and isinstance(spec, DTensorSpec):
            placement[node] = local_placement(spec.placements[0], node)
        elif node.op == "call_function" and isinstance(spec, (tuple, list)):
            placement[node] = tuple(local_placement(s.placements[0], node, i) if isinstance(s, DTensorSpec) else None for i, s in enumerate(spec))
        else:
            placement[node] = None
    return placement


def _module_placement(node: fx.Node, mod, placement: dict, error: type[PlanError]):
    src = placement.get(node.args[0]) if node.args else None
    if isinstance(mod, runtime.Redistribute):
        return local_placement(mod.placements[0], node.args[0]) if src is not None else None
    if isinstance(mod, runtime.ToReplicate):
        return REPLICATE
    if isinstance(mod, runtime.ToFull):
        return None
    if isinstance(mod, (runtime.LocalAttention, runtime.LocalMatmul)):
        return local_placement(mod.placement, node.args[0]) if src is not None else None
    if isinstance(mod, runtime.LocalGroupedMM):  # whole with split inputs would gather: an unplanned move, rejected before
        return grouped_mm_placement(*(placement.get(a) or REPLICATE for a in node.args[:2])) or REPLICATE
    if isinstance(mod, runtime.LocalLinear):
        have = [placement.get(a) or REPLICATE for a in node.args[:2]]
        return fused_linear_placement(*have, global_value(node.args[0]).ndim) or REPLICATE
    if isinstance(mod, runtime.LocalChunk):
        return tuple(Shard(mod.dim) for _ in node.meta["val"])
    if isinstance(mod, runtime.LocalStridedSlice):
        return Shard(mod.dim)
    if isinstance(mod, runtime.VocabParallelLoss):
        return REPLICATE
    if isinstance(mod, runtime.LocalStateWrite):  # the written buffer keeps its own layout
        return src
    if isinstance(mod, runtime.ReplicatedLocal):  # the whole op on every rank: whole results
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(REPLICATE if isinstance(v, torch.Tensor) else None for v in val)
        return REPLICATE if isinstance(val, torch.Tensor) else None
    raise error(f"unknown runtime module {type(mod).__name__} at {node.name}")
