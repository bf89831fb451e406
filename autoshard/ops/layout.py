"""Memory layouts the captured graph relies on.

`torch.export` records each value's strides and drops what they make redundant: after an
attention kernel whose output is laid out `[B, T, H, D]` in memory, a model's
`y.transpose(1, 2).contiguous().view(B, T, C)` is captured as `transpose` + `view` (the
`.contiguous()` was a no-op on that layout). Whatever runs such an op later — on shards, on
another kernel, on meta — must hand back the captured layout, or the `view` fails.
"""

from __future__ import annotations

import torch


def stride_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost (largest stride) to innermost; ties keep dim order. Symbolic strides
    are compared at the example's sizes: reading them as ints would specialise the capture."""
    strides = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in t.stride()]
    strides = [0 if s is None else int(s) for s in strides]
    return tuple(sorted(range(t.ndim), key=lambda d: (-strides[d], d)))


def dense_in_order(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """`t`, dense, with its dims laid out in memory in `order` (a copy only where it is not)."""
    if order is None or len(order) != t.ndim:
        return t.contiguous()
    outer_first = t.permute(order)
    if outer_first.is_contiguous():
        return t
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return outer_first.contiguous().permute(inverse)


def dense_strides(shape, order: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a dense tensor of `shape` whose dims lie in memory in `order` (outermost first)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= int(shape[d])
    return tuple(strides)


def canonical_in_order(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """`dense_in_order(t, order)` with size-1 dims given the strides a dense tensor has there too.

    Torch ignores a size-1 dim's stride (SDPA returns `[B, 1, T, D]` with any stride on the head
    dim), but DTensor rebuilds a sharded tensor's global strides from its local ones: on one head
    per rank an arbitrary head stride turns a `[B, T, H, D]` layout into `[B, H, T, D]` globally,
    and the captured `transpose` + `view` after attention fails. Eager DTensor path only: the
    stride comparison would guard in a compiled graph."""
    t = dense_in_order(t, order)
    if order is None or len(order) != t.ndim:
        return t
    want = dense_strides(t.shape, order)
    return t if tuple(t.stride()) == want else t.as_strided(t.shape, want)
