"""Loss parallel: cross-entropy on vocab-sharded logits without ever gathering them.

The LM head of a tensor-parallel model produces logits as a DTensor sharded on the vocab (last)
dim. Gathering them for ``F.cross_entropy`` would move an ``N x V`` tensor; instead
:func:`vocab_parallel_cross_entropy` runs the Megatron scheme on the local shard, communicating
only per-row (``N``-element) statistics:

forward (on the vocab mesh dim's process group)
    1. all-reduce MAX of the local row maxima                          -> ``m``        ([N])
    2. one all-reduce SUM of the stacked per-row partials              -> ``[2, N]`` or ``[3, N]``
       * ``sum_j exp(x_j - m)`` over the local columns,
       * ``x_t - m`` where the target ``t`` falls in this rank's vocab range, 0 elsewhere,
       * (label smoothing only) ``sum_j (x_j - m)`` over the local columns.
    loss_i = log(sumexp_i) - (x_t - m)_i, ignore_index rows -> 0.
backward
    ``grad = g * (softmax - (1 - eps) * onehot - eps / V)`` on the local columns: no communication.

So forward + backward costs exactly 2 all-reduces (max, then the stacked sums) whatever the
label smoothing; Megatron issues the two sums separately (3 all-reduces), stacking them halves
the latency-bound part at no extra bytes. The mean's denominator is computed locally (the target
is replicated over the vocab mesh dim). When the logits are additionally sharded on a batch dim
(e.g. a 2-D ``(dp, tp)`` mesh with ``[Shard(0), Shard(-1)]``), the ``sum``/``mean`` reductions
add one all-reduce of a 1- or 2-element tensor per batch-sharded mesh dim, and ``reduction='none'``
returns the per-row losses sharded like the batch.

The collectives are the functional ones (``torch.distributed._functional_collectives``) on the
group name, so the op can be traced by ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

try:  # private; present in the torch versions autoshard supports, guarded anyway
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = ()  # type: ignore[assignment]

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, 0: 0, 1: 1, 2: 2}


def _reduction_enum(reduction: int | str) -> int:
    key = reduction.lower() if isinstance(reduction, str) else reduction
    if isinstance(key, bool) or key not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'none'/'mean'/'sum' or 0/1/2 (aten enum), got {reduction!r}")
    return _REDUCTIONS[key]


def _all_reduce(t: torch.Tensor, op: str, group_name: str | None) -> torch.Tensor:
    if group_name is None:  # vocab not sharded: nothing to reduce
        return t
    out = funcol.all_reduce(t, op, group_name)
    # Eager mode hands back an AsyncCollectiveTensor; wait here so the subclass does not leak into
    # the autograd.Function's saved tensors / outputs. When traced it is already a plain tensor.
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of local vocab-sharded logits ``[n, v_local]``; returns fp32 ``[n]``."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, ignore_index, label_smoothing, group_name):
        x = logits.to(_compute_dtype(logits.dtype))
        n, v_local = x.shape

        if v_local > 0:
            local_max = x.amax(dim=1)
        else:  # this rank holds no vocab columns (torch.chunk layout, V < mesh size)
            local_max = x.new_full((n,), -math.inf)
        gmax = _all_reduce(local_max, "max", group_name)

        shifted = x - gmax.unsqueeze(1)
        valid = target != ignore_index
        local_t = target - vocab_start
        in_range = valid & (local_t >= 0) & (local_t < v_local)
        idx = torch.where(in_range, local_t, torch.zeros_like(local_t))

        if v_local > 0:
            picked = shifted.gather(1, idx.unsqueeze(1)).squeeze(1)
            picked = torch.where(in_range, picked, torch.zeros_like(picked))
        else:
            picked = shifted.new_zeros((n,))
        smooth_part = shifted.sum(dim=1) if label_smoothing > 0 else None
        # exp in place: `shifted` is a fresh temporary that nothing reads afterwards (one N x v_local buffer)
        partials = [shifted.exp_().sum(dim=1), picked]
        if smooth_part is not None:
            partials.append(smooth_part)
        sums = _all_reduce(torch.stack(partials), "sum", group_name)

        log_z = sums[0].log()
        loss = log_z - sums[1]  # -log_softmax at the target
        if label_smoothing > 0:
            # torch: (1 - eps) * nll + eps / V * smooth, smooth = -sum_j log_softmax_j = V log_z - sum_j (x_j - m)
            smooth = vocab_size * log_z - sums[2]
            loss = (1.0 - label_smoothing) * loss + smooth * (label_smoothing / vocab_size)
        loss = torch.where(valid, loss, torch.zeros_like(loss))

        # the original logits (not an upcast copy) are saved: bf16 logits keep their bf16 footprint
        ctx.save_for_backward(logits, gmax, log_z, idx, in_range, valid)
        ctx.label_smoothing = label_smoothing
        ctx.vocab_size = vocab_size
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, gmax, log_z, idx, in_range, valid = ctx.saved_tensors
        eps = ctx.label_smoothing
        x = logits.to(_compute_dtype(logits.dtype))
        # Ignored rows get exactly 0 even when the upstream grad is inf/nan (mean over 0 rows), like torch.
        g = torch.where(valid, grad_loss, torch.zeros_like(grad_loss))
        grad = torch.exp(x - (gmax + log_z).unsqueeze(1))  # softmax on the local columns
        grad.mul_(g.unsqueeze(1))
        if eps > 0:
            grad.sub_((g * (eps / ctx.vocab_size)).unsqueeze(1))
        if x.shape[1] > 0:
            hit = torch.where(in_range, g * -(1.0 - eps), torch.zeros_like(g))
            grad.scatter_add_(1, idx.unsqueeze(1), hit.unsqueeze(1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def vocab_parallel_cross_entropy(
    logits: DTensor,
    target: torch.Tensor | DTensor,
    weight: torch.Tensor | None = None,
    reduction: int | str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> DTensor:
    """``F.cross_entropy`` on vocab-sharded DTensor logits, communicating only ``O(N)`` tensors.

    Args:
        logits: DTensor ``[..., V]`` (class dim LAST, unlike ``F.cross_entropy``'s dim 1 for >2-D
            input), sharded ``Shard(-1)`` on exactly one mesh dim (uneven ``torch.chunk`` layout,
            ranks with zero columns included). Every other mesh dim must be ``Replicate`` or
            ``Shard`` a leading (batch) dim. No mesh dim sharding the vocab is allowed too (then it
            is a local cross-entropy).
        target: int64 class indices of shape ``logits.shape[:-1]``: a plain tensor holding the
            full target (the same on every rank), or a DTensor on the logits' mesh (redistributed
            to the logits' batch layout if needed).
        weight: must be None (class weights are not supported).
        reduction: ``'none' | 'mean' | 'sum'`` or the aten enum ``0 | 1 | 2``.
        ignore_index: rows whose target equals it contribute 0 and are left out of the mean.
        label_smoothing: in ``[0, 1]``; supported (it needs no extra collective: the per-row sum
            of logits rides in the same all-reduce as the exp-sum).

    Returns:
        A DTensor with ``Replicate()`` placements: a scalar for mean/sum, ``logits.shape[:-1]``
        for none (sharded like the batch dims of ``logits`` if those are sharded). Differentiable
        w.r.t. ``logits``; the gradient is ``Shard``-ed like ``logits`` and needs no communication.
    """
    if not isinstance(logits, DTensor):
        raise TypeError(f"vocab_parallel_cross_entropy expects DTensor logits, got {type(logits).__name__}")
    if weight is not None:
        raise NotImplementedError(
            "vocab_parallel_cross_entropy: class weights (weight=...) are not supported; "
            "gather the logits and use F.cross_entropy, or drop the weights"
        )
    red = _reduction_enum(reduction)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.ndim < 1:
        raise ValueError("logits must have a class (vocab) dim")
    if isinstance(target, torch.Tensor) and not isinstance(target, DTensor) and target.is_floating_point():
        raise NotImplementedError("class-probability (floating point) targets are not supported; pass class indices")

    mesh = logits.device_mesh
    placements = tuple(logits.placements)
    ndim = logits.ndim
    vdim = ndim - 1
    vocab_size = logits.shape[-1]
    batch_shape = tuple(logits.shape[:-1])

    vocab_mesh_dims, batch_mesh_dims = [], []
    for i, p in enumerate(placements):
        if isinstance(p, Shard):
            if p.dim % ndim == vdim:
                if _StridedShard and isinstance(p, _StridedShard):
                    raise NotImplementedError(
                        f"vocab_parallel_cross_entropy: strided sharding {p} of the vocab dim on mesh dim {i} "
                        "is not supported (a rank's columns are not one contiguous range)"
                    )
                vocab_mesh_dims.append(i)
            else:
                batch_mesh_dims.append(i)
        elif not isinstance(p, Replicate):
            raise NotImplementedError(
                f"vocab_parallel_cross_entropy: logits placement {p} on mesh dim {i} is not supported; "
                "redistribute Partial logits to Shard(-1)/Replicate first"
            )
    if len(vocab_mesh_dims) > 1:
        raise NotImplementedError(
            f"vocab_parallel_cross_entropy: the vocab dim is sharded on mesh dims {vocab_mesh_dims}; "
            "exactly one mesh dim may shard it"
        )
    vmd = vocab_mesh_dims[0] if vocab_mesh_dims else None

    # Target layout: the logits' batch placements, Replicate over the vocab mesh dim.
    tgt_placements = tuple(Replicate() if (i == vmd or isinstance(p, Replicate)) else p for i, p in enumerate(placements))
    if isinstance(target, DTensor):
        if target.device_mesh != mesh:
            raise ValueError("target DTensor must live on the logits' device mesh")
        if tuple(target.shape) != batch_shape:
            raise ValueError(f"target shape {tuple(target.shape)} != logits.shape[:-1] {batch_shape}")
        if tuple(target.placements) != tgt_placements:
            target = target.redistribute(mesh, tgt_placements)
        local_target = target.to_local()
    else:
        if tuple(target.shape) != batch_shape:
            raise ValueError(f"target shape {tuple(target.shape)} != logits.shape[:-1] {batch_shape}")
        if batch_mesh_dims:  # slice this rank's batch rows out of the full target: no communication
            local_target = (
                DTensor.from_local(target, mesh, [Replicate()] * mesh.ndim, run_check=False)
                .redistribute(mesh, tgt_placements)
                .to_local()
            )
        else:
            local_target = target
    if local_target.is_floating_point():
        raise NotImplementedError("class-probability (floating point) targets are not supported; pass class indices")
    local_target = local_target.long()
    # Out-of-range class indices would silently read 0 as the target logit; torch errors instead.
    torch._assert_async(
        ((local_target == ignore_index) | ((local_target >= 0) & (local_target < vocab_size))).all(),
        "vocab_parallel_cross_entropy: target out of [0, V) and != ignore_index",
    )

    if vmd is None:
        vocab_start, group_name = 0, None
    else:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # plain index arithmetic: also under fake tensors (plan-time dry run)
            _, offsets = compute_local_shape_and_global_offset(logits.shape, mesh, placements)
        vocab_start = offsets[vdim] if offsets else 0
        group_name = mesh.get_group(vmd).group_name

    local_logits = logits.to_local()  # differentiable: its grad comes back Shard-ed like logits
    local_batch_shape = tuple(local_logits.shape[:-1])
    rows = VocabParallelCrossEntropy.apply(
        # explicit row count: a rank holding zero vocab columns has 0 elements, so -1 is ambiguous
        local_logits.reshape(math.prod(local_batch_shape), local_logits.shape[-1]),
        local_target.reshape(-1),
        int(vocab_start),
        int(vocab_size),
        int(ignore_index),
        label_smoothing,
        group_name,
    )

    out_dtype = logits.dtype
    replicate = [Replicate()] * mesh.ndim
    if red == 0:
        loss = rows.reshape(local_batch_shape).to(out_dtype)
        if not batch_mesh_dims:
            return DTensor.from_local(loss, mesh, replicate, run_check=False)
        return DTensor.from_local(
            loss, mesh, tgt_placements, run_check=False, shape=torch.Size(batch_shape), stride=_contiguous_stride(batch_shape)
        )

    total = rows.sum()
    if red == 1:
        count = (local_target != ignore_index).sum().to(total.dtype)
        stats = torch.stack([total, count])
    else:
        stats = total.unsqueeze(0)
    if batch_mesh_dims:  # rows are split over the batch mesh dims: sum the partial statistics
        partial = [Partial("sum") if i in batch_mesh_dims else Replicate() for i in range(mesh.ndim)]
        stats = DTensor.from_local(stats, mesh, partial, run_check=False).redistribute(mesh, replicate).to_local()
    loss = stats[0] / stats[1] if red == 1 else stats[0]
    return DTensor.from_local(loss.to(out_dtype), mesh, replicate, run_check=False)
