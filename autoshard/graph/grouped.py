"""Placement rules for grouped (expert) matmuls, fused projections and the parts of their output.

DTensor has no sharding rule for transformers' grouped-matmul fallback op and none that keeps a
fused weight's `_StridedShard` layout through a matmul (its `linear` decomposition folds and
unfolds the batch dims and loses it) and a `chunk`/`split`; all run on local shards instead
(`execute.dtensor_ops.LocalGroupedMM`, `LocalLinear`, `LocalChunk`). These rules are the one
statement of what such a local run produces, read by the simulator, the DTensor runtime and the
lowering.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.schema.fused_parts import StridedParts, divides, moved

aten = torch.ops.aten
REPLICATE = Replicate()
_PART_OPS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


def grouped_mm_placement(x: Placement, w: Placement) -> Placement | None:
    """The output of a grouped matmul run on local shards, or None if it cannot be."""
    if x.is_replicate() and w.is_replicate():
        return REPLICATE
    if x.is_replicate() and isinstance(w, _StridedShard) and w.dim == 2:
        return moved(w, 1)
    if x.is_replicate() and w == Shard(2):
        return Shard(1)
    if x == Shard(1) and w == Shard(1):
        return Partial()
    return None


def equal_parts(node: fx.Node) -> tuple[int, int] | None:
    """(k, dim) when `node` cuts its input into k > 1 equal parts on `dim`: `chunk(x, k, dim)`,
    `split(x, w // k, dim)` or `split_with_sizes(x, [w // k] * k, dim)` of a width w = k * (w // k)."""
    if node.op != "call_function" or node.target not in _PART_OPS or not isinstance(node.args[0], fx.Node):
        return None
    val = node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return None
    dim %= val.ndim
    width, how = val.shape[dim], node.args[1]
    if not isinstance(width, int):
        return None
    if node.target is aten.chunk.default:
        k = how
    elif node.target is aten.split.Tensor:
        k = width // how if isinstance(how, int) and how > 0 and width % how == 0 else 0
    else:
        k = len(how) if all(isinstance(h, int) and h == how[0] for h in how) and sum(how) == width else 0
    return (k, dim) if isinstance(k, int) and k > 1 and width % k == 0 else None


def part_sizes(node: fx.Node) -> tuple[tuple[int, ...], int] | None:
    """(widths, dim) when `node` cuts its input into parts on `dim`: the equal parts of
    `equal_parts`, or `split_with_sizes` into widths that differ (q | k | v with fewer KV heads)."""
    parts = equal_parts(node)
    if parts is not None:
        k, dim = parts
        return (node.args[0].meta["val"].shape[dim] // k,) * k, dim
    if node.op != "call_function" or node.target is not aten.split_with_sizes.default or not isinstance(node.args[0], fx.Node):
        return None
    val, sizes = node.args[0].meta.get("val"), node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(val, torch.Tensor) or not isinstance(dim, int) or not all(isinstance(s, int) and s > 0 for s in sizes):
        return None
    dim %= val.ndim
    return (tuple(sizes), dim) if len(sizes) > 1 and sum(sizes) == val.shape[dim] else None


def fused_chunk(node: fx.Node, spec) -> bool:
    """The parts of a value laid out `_StridedShard(dim, sf=k)` (k equal parts, `equal_parts`) or
    `StridedParts(dim, widths)` (`part_sizes`), cut into those parts on that dim: each rank's
    local pieces are the parts' `Shard(dim)`, no communication."""
    if not (isinstance(spec, DTensorSpec) and isinstance(spec.placements[0], _StridedShard)):
        return False
    p, ndim = spec.placements[0], len(spec.tensor_meta.shape)
    if isinstance(p, StridedParts):
        return part_sizes(node) == (p.sizes, p.dim % ndim)
    parts = equal_parts(node)
    return parts is not None and parts == (p.split_factor, p.dim % ndim)


def interleaved_part(node: fx.Node, spec, tp: int) -> int | None:
    """The dim of `x[..., s::k]` (0 <= s < k) of a value split evenly on that dim in blocks of whole
    k-tuples (gpt-oss's gate/up, fused interleaved: `gate_up[..., ::2]`): each rank's slice of the
    part is its local slice, no communication. None if not that."""
    if node.target is not aten.slice.Tensor or not (isinstance(spec, DTensorSpec) and spec.placements[0].is_shard()):
        return None
    ndim = len(spec.tensor_meta.shape)
    dim, start, end, step = (list(node.args[1:]) + [0, 0, None, 1])[:4]
    d = spec.placements[0].dim % ndim
    width = spec.tensor_meta.shape[d]
    whole = end is None or isinstance(end, int) and end >= width
    if dim % ndim != d or not (isinstance(step, int) and step > 1 and isinstance(start, int) and 0 <= start < step and whole):
        return None
    return d if width % (tp * step) == 0 else None


def only_local_rules_read_parts(operands: dict) -> None:
    """Raise for an op (other than the fused rules here) reading a `StridedParts` value: DTensor's
    own rules would rebuild its layout as equal parts. The simulator then runs the op whole, its
    operand gathered by `StridedParts`' own gather."""
    for name, spec in operands.items():
        if isinstance(spec, DTensorSpec) and isinstance(spec.placements[0], StridedParts):
            raise NotImplementedError(f"{name} is laid out {spec.placements[0]}: only its parts or a local linear read it sharded")


def attention_operand(p: Placement, shape) -> Placement:
    """What a k, v or mask of `shape` holds for attention run on local shards laid out `p`: the
    same split, or whole where it has one head (or row) broadcast over q's (multi-query K/V)."""
    return p if p.is_shard() and shape[p.dim] != 1 else REPLICATE


def fused_linear_placement(x: Placement, w: Placement, out_ndim: int) -> Placement | None:
    """`linear(x, w)` with a fused weight `_StridedShard(0, sf=k)` (k parts split part by part) and
    a whole input: the output's features laid out the same way, or None if it cannot be."""
    if x.is_replicate() and isinstance(w, _StridedShard) and w.dim == 0:
        return moved(w, out_ndim - 1)
    return None


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


def fused_linear_spec(simulator, node: fx.Node, sim, operands: tuple, names: list) -> DTensorSpec:
    """The simulator's step for a fused weight's linear on local shards: each rank's output holds
    its slice of every part. Evenly only (the local product's shape says the global one), with
    the bias laid out as the weight; else everything whole."""
    x, w, b = operands
    val = node.meta["val"]
    out = fused_linear_placement(x.placements[0], w.placements[0], val.ndim)
    width = w.tensor_meta.shape[0]
    if out is None or not divides(w.placements[0], width, simulator.mesh.size()) or isinstance(b, DTensorSpec) and b.placements != w.placements:
        for i, spec in enumerate(operands):
            if isinstance(spec, DTensorSpec) and spec.placements != (REPLICATE,):
                simulator._move(sim, spec, (REPLICATE,), names[i] or node.name, node.name, planned=False)
        return simulator._spec(val, REPLICATE)
    return simulator._spec(val, out)
