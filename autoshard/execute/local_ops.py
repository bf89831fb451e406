"""What a lowered graph calls: collectives on plain local tensors with Megatron's autograd pairing.

`execute/lower.py` turns the DTensor program into a graph of plain tensors on each rank's
shard. Every layout change becomes one of the functions below, called by name in the graph, so
printing the lowered graph shows each collective and (in its `backward=` argument) the one its
backward runs:

    forward                       backward
    all_gather  (Shard -> Repl.)  reduce_scatter (the gradient is a partial sum: column linears)
                                  or a local slice (the gradient is replicated: a graph output)
    reduce_scatter (Partial -> S) all_gather
    all_reduce  (Partial -> Repl) nothing
    reduce_grad (Repl. -> Repl.)  all_reduce     (Megatron's `f`)
    shard_local (Repl. -> Shard)  zero-padding   (each rank's slice: a partial gradient)

Sharded dims whose size is symbolic (sequence, batch) are padded to `ceil(size / tp)` on every
rank: all ranks then run the same shapes, a compiled graph has one size expression for them,
and `all_gather` / `reduce_scatter` move equal blocks. The padding rows are zeros, are cut off
after every gather, and get zero gradients. Static sharded dims (heads, features, vocabulary)
keep `torch.chunk`'s exact per-rank sizes.

Collectives run on dim 0 (a sharded dim is moved there first): gathering on another dim would
chunk and concatenate symbolic sizes, which makes `torch.compile` guard on the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autoshard.ops.layout import dense_in_order
from autoshard.ops.loss_parallel import VocabParallelCrossEntropy
from autoshard.schema.units import chunk_block, chunk_len, chunk_start

_c10d = torch.ops._c10d_functional


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(t)


def _pad_dim0(x: torch.Tensor, to) -> torch.Tensor:
    extra = to - x.size(0)
    # A symbolic `extra` is padded (maybe by 0 rows) unless provably 0: testing it for 0 would make
    # torch.compile guard on `seq % tp == 0` and recompile when the parity of the length changes.
    if statically_known_true(extra == 0):
        return x
    return F.pad(x, [0, 0] * (x.ndim - 1) + [0, extra])


def _gather_dim0(x: torch.Tensor, size, tp: int, group: str) -> torch.Tensor:
    """`x` [c_local, ...] on each rank -> [size, ...]: pad to a common block, gather, cut."""
    block = chunk_block(size, tp)
    x = _pad_dim0(x, block).contiguous()
    out = _wait(_c10d.all_gather_into_tensor(x, tp, group))
    return out.narrow(0, 0, size)  # a prefix of dim 0: stays contiguous, no stride guard


def _scatter_dim0(x: torch.Tensor, tp: int, rank: int, group: str, padded: bool) -> torch.Tensor:
    """`x` [size, ...] partial sums on each rank -> this rank's block of the sum."""
    size = x.size(0)
    block = chunk_block(size, tp)
    x = _pad_dim0(x, block * tp).contiguous()
    out = _wait(_c10d.reduce_scatter_tensor(x, "sum", tp, group))
    return out if padded else out.narrow(0, 0, chunk_len(size, tp, rank))


def _slice_dim0(x: torch.Tensor, tp: int, rank: int, padded: bool) -> torch.Tensor:
    """This rank's block of a replicated `x` along dim 0 (no communication)."""
    size = x.size(0)
    block = chunk_block(size, tp)
    if padded:
        return _pad_dim0(x, block * tp).narrow(0, rank * block, block)
    return x.narrow(0, chunk_start(size, tp, rank), chunk_len(size, tp, rank))


def _unslice_dim0(g: torch.Tensor, size, tp: int, rank: int, padded: bool) -> torch.Tensor:
    """The adjoint of `_slice_dim0`: this rank's block in place, zeros elsewhere."""
    block = chunk_block(size, tp)
    start = rank * block if padded else min(rank * block, size)
    total = block * tp if padded else size
    full = F.pad(g, [0, 0] * (g.ndim - 1) + [start, total - start - g.size(0)])
    return full.narrow(0, 0, size)


def _to0(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == 0 else x.movedim(dim, 0)


def _from0(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == 0 else x.movedim(0, dim).contiguous()


# ---- autograd pairs -----------------------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, size, tp, rank, group, padded, backward):
        ctx.args = (dim, size, tp, rank, group, padded, backward)
        return _from0(_gather_dim0(_to0(x, dim), size, tp, group), dim)

    @staticmethod
    def backward(ctx, g):
        dim, size, tp, rank, group, padded, backward = ctx.args
        g0 = _to0(g, dim)
        if backward == "reduce_scatter":
            out = _scatter_dim0(g0.contiguous(), tp, rank, group, padded)
        else:  # the gradient is replicated: every rank keeps its own block
            out = _slice_dim0(g0, tp, rank, padded)
        return _from0(out, dim), None, None, None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, rank, group, padded):
        ctx.args = (dim, x.size(dim), tp, group)
        return _from0(_scatter_dim0(_to0(x, dim).contiguous(), tp, rank, group, padded), dim)

    @staticmethod
    def backward(ctx, g):
        dim, size, tp, group = ctx.args
        return _from0(_gather_dim0(_to0(g, dim), size, tp, group), dim), None, None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad, parts):
        ctx.group, ctx.reduce_grad, ctx.parts = group, reduce_grad, parts
        out = _wait(_c10d.all_reduce(x.contiguous(), "sum", group))
        return out / parts if parts != 1 else out

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:
            g = _wait(_c10d.all_reduce(g.contiguous(), "sum", ctx.group))
        return (g / ctx.parts if ctx.parts != 1 else g), None, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.tp, None


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _wait(_c10d.all_reduce(g.contiguous(), "sum", ctx.group)), None


class _ShardLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, rank, padded):
        ctx.args = (dim, x.size(dim), tp, rank, padded)
        return _from0(_slice_dim0(_to0(x, dim), tp, rank, padded), dim)

    @staticmethod
    def backward(ctx, g):
        dim, size, tp, rank, padded = ctx.args
        return _from0(_unslice_dim0(_to0(g, dim), size, tp, rank, padded), dim), None, None, None, None


# ---- what lowered graphs call ------------------------------------------------------------------
def all_gather(x, dim: int, size, tp: int, rank: int, group: str, padded: bool, backward: str):
    """Shard(dim) -> Replicate. `size`: the global size of `dim`; `backward`: 'reduce_scatter'
    (the gradient arrives as partial sums) or 'slice' (it arrives replicated)."""
    return _AllGather.apply(x, dim, size, tp, rank, group, padded, backward)


def reduce_scatter(x, dim: int, tp: int, rank: int, group: str, padded: bool):
    """Partial -> Shard(dim); backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, dim, tp, rank, group, padded)


def all_reduce(x, group: str, reduce_grad: bool = False, parts: int = 1):
    """Partial -> Replicate; the gradient of a sum is passed through, or all-reduced first when it
    arrives as partial sums (`reduce_grad`: the sum feeds sharded ops directly). `parts` > 1:
    `Partial(avg)` (the mean of `parts` equal shards' means), the sum divided by it both ways."""
    return _AllReduce.apply(x, group, reduce_grad, parts)


def reduce_grad(x, group: str):
    """Replicate -> Replicate with the gradient's partial sums all-reduced (Megatron's `f`)."""
    return _ReduceGrad.apply(x, group)


def shard_local(x, dim: int, tp: int, rank: int, padded: bool):
    """Replicate -> Shard(dim) by slicing; the gradient (zero outside the slice) is a partial sum."""
    return _ShardLocal.apply(x, dim, tp, rank, padded)


def scale_grad(x, tp: int):
    """Identity forward; the (whole) gradient divided by `tp` in backward, so that summed over
    the ranks with the partial gradients a replicated value's sharded readers send, it counts once."""
    return _ScaleGrad.apply(x, tp)


def partition_value(x, tp: int):
    """Replicate -> Partial as DTensor does it for a sum: each rank holds `x / tp`."""
    return x / tp


def vocab_parallel_embedding(weight, ids, vocab_start: int, padding_idx: int = -1):
    """Lookup in this rank's rows `[vocab_start, vocab_start + rows)` of a vocab-sharded table;
    ids outside the range give zero rows (the partial sums the following reduction adds up).

    `padding_idx` is the global row that gets no gradient (`nn.Embedding(padding_idx=)`): it is
    moved into the local numbering on the rank that holds it, and dropped on the others (their
    rows get gradients only through ids they hold)."""
    rows = weight.size(0)
    local = ids - vocab_start
    outside = (local < 0) | (local >= rows)
    pad = padding_idx - vocab_start if padding_idx >= 0 and vocab_start <= padding_idx < vocab_start + rows else -1
    out = torch.ops.aten.embedding.default(weight, local.masked_fill(outside, 0), pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def attention(q, k, v, attn_mask, layout: tuple[int, ...] | None, **sdpa_kwargs):
    """SDPA on this rank's heads (or batch rows), its output in the layout the graph was captured
    with (`autoshard.ops.layout`: a later `view` may rely on it)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **sdpa_kwargs)
    return dense_in_order(out, layout)


def vocab_parallel_loss(logits, target, vocab_start: int, vocab_size: int, group: str,
                        reduction: int = 1, ignore_index: int = -100, label_smoothing: float = 0.0):
    """`cross_entropy_loss` of local vocab-sharded logits `[N, v_local]` (see ops.loss_parallel):
    two all-reduces of per-row statistics forward, none backward."""
    rows = VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1).long(), vocab_start, vocab_size,
        ignore_index, float(label_smoothing), group,
    )
    if reduction == 0:
        return rows.view(target.shape).to(logits.dtype)
    if reduction == 2:
        return rows.sum().to(logits.dtype)
    total = rows.sum()
    return (total / (target != ignore_index).sum().to(total.dtype)).to(logits.dtype)


def run_with_grad_enabled(enabled: bool, fn, *args):
    """`torch.ops.higher_order.wrap_with_set_grad_enabled` as plain Python (compilers trace it)."""
    with torch.set_grad_enabled(enabled):
        return fn(*args)
