"""The small modules the rewritten graph calls. Each is one idea and prints as itself in the graph.

They hold no parameters or buffers (the mesh is not state), so they never show up in
`state_dict()`; autograd of every layout change is DTensor's own (`redistribute`'s backward is the
Megatron pairing: all-gather <-> reduce-scatter, all-reduce <-> identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch._prims_common import make_contiguous_strides_for
from torch.distributed.tensor.experimental import local_map
from torch.distributed.tensor.placement_types import Placement, _MaskPartial

from autoshard.graph.grouped import attention_operand, fused_linear_placement, grouped_mm_placement
from autoshard.ops.layout import canonical_in_order, stride_order
from autoshard.ops.loss_parallel import vocab_parallel_cross_entropy


def consistent_grad(x):
    """Make sure the gradient that comes back into `x` is a DTensor whose global strides describe
    its local tensor.

    DTensor builds the gradient of a layout change (redistribute, `to_local`, `local_map`) from the
    local tensor it got and a stride it did not take from it; when the two disagree (a gradient
    coming back through a transpose), a later `view` in backward passes DTensor's check on the
    global strides and fails on the local ones ("view size is not compatible"). A hook on `x`
    re-wraps such a gradient densely; a consistent one passes untouched.
    """
    if isinstance(x, DTensor) and x.requires_grad and torch.is_grad_enabled():
        x.register_hook(_consistent)
    return x


def _consistent(grad):
    """`grad` if its local tensor is laid out as its global strides say (both dense, or both in
    the same dim order); else the same values, dense, with dense global strides. (The global
    strides of a shard are not the local ones scaled: a sequence of 7 over 2 ranks is 4 + 3.)"""
    if not isinstance(grad, DTensor):
        return grad
    local = grad._local_tensor
    if local.is_contiguous() and grad.is_contiguous():
        return grad
    if not local.is_contiguous() and not grad.is_contiguous() and stride_order(local) == stride_order(grad):
        return grad
    return DTensor.from_local(local.contiguous(), grad.device_mesh, grad.placements, run_check=False,
                              shape=grad.shape, stride=make_contiguous_strides_for(grad.shape))


class RuntimeOp(nn.Module):
    """Base of the graph's own ops: called without module hooks. They are autoshard's internals,
    not the user's modules; a global hook a tool installs (CommDebugMode's module tracker) would
    wrap their DTensor inputs and outputs in `BackwardHook` functions, whose backward then mixes
    plain and DTensor gradients ("got mixed torch.Tensor and DTensor")."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Redistribute(RuntimeOp):
    """An explicit layout change at a region boundary (the only place collectives are planned)."""

    def __init__(self, mesh: DeviceMesh, placements: tuple[Placement, ...]):
        super().__init__()
        self.mesh, self.placements = mesh, tuple(placements)

    def forward(self, x):
        if not isinstance(x, DTensor):
            return x
        x = consistent_grad(x)
        whole = all(p.is_replicate() for p in self.placements)
        if tuple(x.placements) == self.placements and whole:
            return _reduce_grad_here(x)
        if whole and any(isinstance(p, _MaskPartial) or p == Partial("avg") for p in x.placements):
            # the vocab-parallel lookup's masked partial, or a norm's mean over the sharded width,
            # reduced: partial gradients come back from the sharded ops that read it (column
            # linears after a post-norm block, the normalised shards), which DTensor cannot turn
            # into a masked or averaged partial; sum them here (Megatron's backward all-reduce)
            return _reduce_grad_here(x.redistribute(self.mesh, self.placements))
        return x.redistribute(self.mesh, self.placements)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.placements))


def _reduce_grad_here(x: DTensor) -> DTensor:
    """Megatron's `f`: identity forward, all-reduce of the gradient in backward.

    A replicated activation entering column linears gets a `Partial` gradient back. DTensor would
    carry it, unreduced, up the residual stream until something forces a reduction — and it cannot
    hand a `Partial` gradient to the vocab-parallel embedding's masked partial at all. Reducing
    it here, once per region, is what plain tensor parallelism does.
    """
    local = consistent_grad(x).to_local(grad_placements=x.placements)
    return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False)


class ConsistentGrad(RuntimeOp):
    """Identity after an op whose backward views its output's gradient (`view`, `reshape`,
    `linear` on 3-D inputs): the gradient arriving there is made layout-consistent first
    (`consistent_grad`), whichever DTensor op built it."""

    def forward(self, x):
        return consistent_grad(x)


class ToReplicate(RuntimeOp):
    """A plain tensor made in the graph (mask, rotary table, ids) meeting DTensors: the same value
    on every rank, so wrapping it as `Replicate` is free and exact."""

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh

    def forward(self, x):
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)
        return x


class ToFull(RuntimeOp):
    """Graph outputs back to plain full tensors for the caller (a replicated one costs nothing)."""

    def forward(self, x):
        if not isinstance(x, DTensor):
            return x
        x = consistent_grad(x)
        if all(p.is_replicate() for p in x.placements):
            return x.to_local()
        return x.full_tensor()


class LocalAttention(RuntimeOp):
    """`scaled_dot_product_attention` on each rank's own heads (or batch rows).

    CPU SDPA has no DTensor sharding strategy, and every SDPA kernel is independent per head and
    per batch row, so the region runs on local shards via `local_map`; its autograd is local too.
    """

    def __init__(self, placement: Placement, sdpa_kwargs: dict, layout: tuple[int, ...] | None = None):
        super().__init__()
        self.placement, self.sdpa_kwargs, self.layout = placement, dict(sdpa_kwargs), layout

    def forward(self, q, k, v, attn_mask=None):
        if not isinstance(q, DTensor):
            return self._local(q, k, v, attn_mask)
        p = self.placement
        # a whole operand (a head broadcast over q's) gets each rank's share of its gradient, summed later
        mask_p = (attention_operand(p, attn_mask.shape),) if isinstance(attn_mask, DTensor) else None
        ins = ((p,), (attention_operand(p, k.shape),), (attention_operand(p, v.shape),), mask_p)
        fn = local_map(
            self._local, out_placements=((p,),), in_placements=ins,
            in_grad_placements=_grads_of(ins[:3], p) + (None if mask_p is None else _grads_of((mask_p,), p)[0],),
            device_mesh=q.device_mesh, redistribute_inputs=True,
        )
        return fn(*map(consistent_grad, (q, k, v, attn_mask)))

    def _local(self, q, k, v, attn_mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **self.sdpa_kwargs)
        # The graph after attention was captured for the output's layout (`layout`: dims outermost
        # first); a dense result in it, size-1 dims included, keeps DTensor's global strides in it too.
        return canonical_in_order(out, self.layout)

    def extra_repr(self) -> str:
        return f"{self.placement}, {self.sdpa_kwargs}, layout={self.layout}"


class LocalMatmul(RuntimeOp):
    """A batched matmul (attention scores written by hand) on local batch/head shards.

    DTensor would fold the batch dims into one for `bmm` and gather a sharded inner dim; each
    batch index is independent, so the product runs per shard via `local_map`.
    """

    def __init__(self, placement: Placement):
        super().__init__()
        self.placement = placement

    def forward(self, a, b):
        if not (isinstance(a, DTensor) or isinstance(b, DTensor)):
            return torch.matmul(a, b)
        mesh = (a if isinstance(a, DTensor) else b).device_mesh
        p = self.placement
        out_ndim = max(a.ndim, b.ndim)
        ins = tuple((operand_placement(p, x, out_ndim, role),) for x, role in ((a, "a"), (b, "b")))
        fn = local_map(torch.matmul, out_placements=((p,),), in_placements=ins, in_grad_placements=_grads_of(ins, p),
                       device_mesh=mesh, redistribute_inputs=True)
        return fn(consistent_grad(a), consistent_grad(b))

    def extra_repr(self) -> str:
        return str(self.placement)


class LocalGroupedMM(RuntimeOp):
    """A grouped (expert) matmul `x [S, K] @ w [E, K, N]` on local shards, as the plan simulated
    (`graph.grouped.grouped_mm_placement`): column (w split on N, in w's own layout, fused parts
    included) or row (x and w split on K: partial sums); anything else whole. Each rank's rows
    are routed as on every other rank (the router ran on whole tokens), so the local product is
    that rank's slice of every expert's output."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, w, offs, *rest):
        if not (isinstance(x, DTensor) or isinstance(w, DTensor)):
            return self.target(x, w, offs, *rest)
        mesh = (w if isinstance(w, DTensor) else x).device_mesh
        have = [a.placements[0] if isinstance(a, DTensor) else Replicate() for a in (x, w)]
        out = grouped_mm_placement(*have)
        if out is None:
            have, out = [Replicate(), Replicate()], Replicate()
        ins = ((have[0],), (have[1],), (Replicate(),) if isinstance(offs, DTensor) else None)
        grads = ((Partial(),) if have[0].is_replicate() and not have[1].is_replicate() else (have[0],), (have[1],), ins[2])
        fn = local_map(lambda a, b, o: self.target(a, b, o, *rest), out_placements=((out,),), in_placements=ins,
                       in_grad_placements=grads, device_mesh=mesh, redistribute_inputs=True)
        return fn(x, w, offs)

    def extra_repr(self) -> str:
        return str(self.target)


class LocalLinear(RuntimeOp):
    """`linear(x, w, b)` with a fused weight `_StridedShard(0, sf=k)` (each rank holds its slice of
    q, of k and of v, or of gate and of up) and a whole input, on local shards: the output's
    features come out laid out the same way (`graph.grouped.fused_linear_placement`). DTensor's
    own decomposition (`view`, `mm`, `view`) does not keep that layout."""

    target = torch.ops.aten.linear.default  # what the lowered program runs on the local shards

    def forward(self, x, w, b=None):
        if not isinstance(w, DTensor):
            return F.linear(x, w, b)
        out = fused_linear_placement(x.placements[0] if isinstance(x, DTensor) else Replicate(), w.placements[0], x.ndim)
        if out is None:  # not what the plan simulated; whole, as the simulation says then
            return F.linear(x, w.full_tensor(), b.full_tensor() if isinstance(b, DTensor) else b)
        ins = ((Replicate(),), w.placements, b.placements if isinstance(b, DTensor) else None)
        grads = ((Partial(),), w.placements, ins[2])
        fn = local_map(F.linear, out_placements=((out,),), in_placements=ins, in_grad_placements=grads,
                       device_mesh=w.device_mesh, redistribute_inputs=True)
        return fn(x, w, b)


class LocalChunk(RuntimeOp):
    """The parts (`chunk`, `split`, `split_with_sizes`) of a fused output laid out
    `_StridedShard(dim, sf=k)` or `StridedParts(dim, widths)`: each rank's slice holds its share
    of every part in order, so its local pieces are the parts' `Shard(dim)`."""

    def __init__(self, sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.sizes, self.dim = tuple(sizes), dim

    def forward(self, x, *_how):
        tp = x.device_mesh.size()
        local = x.to_local(grad_placements=x.placements).split(self.local_sizes(tp), self.dim)
        out = []
        for piece, width in zip(local, self.sizes):
            shape = list(x.shape)
            shape[self.dim] = width
            out.append(DTensor.from_local(piece, x.device_mesh, (Shard(self.dim),), run_check=False, shape=torch.Size(shape),
                                          stride=make_contiguous_strides_for(shape)))
        return tuple(out)

    def local_sizes(self, tp: int) -> list[int]:
        return [w // tp for w in self.sizes]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}"


class LocalStridedSlice(RuntimeOp):
    """`x[..., s::k]` of a value split on that dim in blocks of whole k-tuples (gpt-oss's interleaved
    gate/up: `gate_up[..., ::2]`, `gate_up[..., 1::2]`): each rank's local slice is its shard of the
    part (`graph.grouped.interleaved_part`). DTensor would gather the value to slice it."""

    target = torch.ops.aten.slice.Tensor  # what the lowered program runs on the local shards

    def __init__(self, dim: int, start: int, step: int):
        super().__init__()
        self.dim, self.start, self.step = dim, start, step

    def forward(self, x, *_how):
        shape = list(x.shape)
        shape[self.dim] //= self.step
        local = x.to_local(grad_placements=x.placements)
        part = self.target(local, self.dim, self.start, None, self.step).contiguous()
        return DTensor.from_local(part, x.device_mesh, (Shard(self.dim),), run_check=False, shape=torch.Size(shape),
                                  stride=make_contiguous_strides_for(shape))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, start={self.start}, step={self.step}"


def _grads_of(ins: tuple, out: Placement) -> tuple:
    """Gradient placements of local_map operands: an operand whole on every rank, next to a split
    output, gets on each rank only its shard's share of the gradient (partial, summed later)."""
    split = out.is_shard()
    return tuple((Partial(),) if split and pl[0].is_replicate() else pl for pl in ins)


def operand_placement(p: Placement, x, out_ndim: int, role: str) -> Placement:
    """What operand `x` (`a` or `b` of `a @ b`) must hold for the output to come out `p`:
    batch dims split alike (a broadcast batch dim whole), the rows of `a` alone, the columns of
    `b` alone."""
    if not p.is_shard():
        return p
    d = p.dim % out_ndim
    rows, cols = out_ndim - 2, out_ndim - 1
    if d == rows:
        return Shard(x.ndim - 2) if role == "a" else Replicate()
    if d == cols:
        return Shard(x.ndim - 1) if role == "b" else Replicate()
    local_dim = d - (out_ndim - x.ndim)
    if local_dim < 0 or x.ndim < 3 or x.shape[local_dim] == 1:
        return Replicate()
    return Shard(local_dim)


class LocalStateWrite(RuntimeOp):
    """An in-place write into a placed buffer (a KV cache split by heads, `index_copy_` along the
    sequence) on each rank's local shards: the write addresses no split dim, so each rank's shard
    of the result is its shard of the buffer written with its shard of the values
    (`graph.state_writes`). DTensor has no rule for `index_copy_`."""

    def __init__(self, target):
        super().__init__()
        self.target = target   # what the lowered program runs on the local shards

    def forward(self, buffer, *args):
        # a replicated value written into a split buffer: each rank's slice of it (no communication)
        local = pytree.tree_map(lambda a: a.redistribute(a.device_mesh, buffer.placements).to_local()
                                if isinstance(a, DTensor) and a.ndim == buffer.ndim else
                                a.to_local() if isinstance(a, DTensor) else a, args)
        # the buffer's own storage, written in place (`to_local()` is a view made in a custom
        # autograd Function, which autograd forbids writing when the values carry a gradient)
        out = self.target(buffer._local_tensor, *local)
        return DTensor.from_local(out, buffer.device_mesh, buffer.placements, run_check=False, shape=buffer.shape, stride=buffer.stride())

    def extra_repr(self) -> str:
        return str(self.target)


class ReplicatedLocal(RuntimeOp):
    """An op DTensor has no sharding rule for (a model's own custom op, e.g. transformers'
    `grouped_mm_fallback` in MoE experts on CPU), run whole on every rank: DTensor operands are
    made Replicate and unwrapped, tensor results wrapped back as Replicate. Each rank computes
    the same values, so the local gradients are replicated too."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, *args, **kwargs):
        meshes = [a.device_mesh for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, DTensor)]
        if not meshes:
            return self.target(*args, **kwargs)
        mesh, whole = meshes[0], (Replicate(),) * meshes[0].ndim

        def unwrap(a):
            a = consistent_grad(a)
            return a.redistribute(mesh, whole).to_local(grad_placements=whole) if isinstance(a, DTensor) else a

        out = self.target(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))
        return pytree.tree_map(lambda t: DTensor.from_local(t, mesh, whole, run_check=False) if isinstance(t, torch.Tensor) else t, out)

    def extra_repr(self) -> str:
        return str(self.target)


class VocabParallelLoss(RuntimeOp):
    """`cross_entropy_loss` on vocab-sharded logits without gathering them (loss parallel)."""

    def __init__(self, weight=None, reduction: int = 1, ignore_index: int = -100, label_smoothing: float = 0.0):
        super().__init__()
        self.weight, self.reduction, self.ignore_index, self.label_smoothing = weight, reduction, ignore_index, label_smoothing

    def forward(self, logits, target, *unused):
        if isinstance(target, DTensor):
            target = target.full_tensor()
        return vocab_parallel_cross_entropy(
            logits, target, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
        )
