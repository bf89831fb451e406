"""Placement rules for grouped (expert) matmuls and the chunks of a fused output.

DTensor has no sharding rule for transformers' grouped-matmul fallback op and none that keeps a
fused weight's `_StridedShard` layout through a matmul and a `chunk`; both run on local shards
instead (`execute.dtensor_ops.LocalGroupedMM`, `LocalChunk`). These rules are the one statement
of what such a local run produces, read by the simulator, the DTensor runtime and the lowering.
"""

from __future__ import annotations

from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

REPLICATE = Replicate()


def grouped_mm_placement(x: Placement, w: Placement) -> Placement | None:
    """The output of a grouped matmul run on local shards, or None if it cannot be."""
    if x.is_replicate() and w.is_replicate():
        return REPLICATE
    if x.is_replicate() and isinstance(w, _StridedShard) and w.dim == 2:
        return _StridedShard(1, split_factor=w.split_factor)
    if x.is_replicate() and w == Shard(2):
        return Shard(1)
    if x == Shard(1) and w == Shard(1):
        return Partial()
    return None


def fused_chunk(node: fx.Node, spec) -> bool:
    """`chunk(x, k, dim)` of a value laid out `_StridedShard(dim, sf=k)`: k local parts, no communication."""
    if not (isinstance(spec, DTensorSpec) and isinstance(spec.placements[0], _StridedShard)):
        return False
    p, ndim = spec.placements[0], len(spec.tensor_meta.shape)
    chunks, dim = node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
    return dim % ndim == p.dim % ndim and chunks == p.split_factor


def grouped_mm_spec(simulator, node: fx.Node, sim, operands) -> DTensorSpec:
    """The simulator's step for `x [S, K] @ w [E, K, N]` per expert: column (x whole, w split on
    N: the output split on N, in w's layout), row (x and w split on K: partial sums), else
    everything whole. A split must be even: the local product's shape says the global one."""
    from autoshard.graph.simulate import flatten_names

    args, _ = simulator._args(node, operands)
    x, w, offs = args[0], args[1], args[2]
    names = flatten_names(node.args)
    out = grouped_mm_placement(x.placements[0], w.placements[0])
    tp, (_, k, n) = simulator.mesh.size(), w.tensor_meta.shape
    parts = getattr(w.placements[0], "split_factor", 1)
    if out is not None and (out.is_partial() and k % tp or not out.is_partial() and not out.is_replicate() and n % (tp * parts)):
        out = None
    if out is None:
        for i, spec in enumerate((x, w)):
            if spec.placements != (REPLICATE,):
                simulator._move(sim, spec, (REPLICATE,), names[i] or node.name, node.name, planned=False)
        out = REPLICATE
    if isinstance(offs, DTensorSpec) and offs.placements != (REPLICATE,):
        simulator._move(sim, offs, (REPLICATE,), names[2] or node.name, node.name, planned=False)
    return simulator._spec(node.meta["val"], out)
