"""Layouts the captured graph relies on, on shards too."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Shard
from torch.distributed.tensor._utils import compute_global_tensor_info

from autoshard.ops.layout import canonical_in_order, dense_in_order, dense_strides, stride_order
from tests.passes import fake_tp_mesh

BTHD = (0, 2, 1, 3)  # [B, H, T, D] values laid out [B, T, H, D] in memory (CPU flash attention's output)


def test_dense_in_order_keeps_values_and_lays_them_out_as_asked():
    t = torch.randn(2, 3, 5, 4)
    out = dense_in_order(t, BTHD)
    assert torch.equal(out, t) and stride_order(out) == BTHD and out.stride() == dense_strides(t.shape, BTHD)


def test_one_head_per_rank_keeps_the_global_layout():
    # SDPA on one local head returns [B, 1, T, D] contiguous: dense in either order, since torch
    # ignores a size-1 dim's stride. DTensor builds the global strides from the local ones, so the
    # head stride decides whether the global tensor reads as [B, T, H, D] in memory (captured) or not.
    local = torch.randn(2, 1, 7, 16)
    with fake_tp_mesh(4) as mesh:
        _, loose = compute_global_tensor_info(dense_in_order(local, BTHD), mesh, [Shard(1)])
        _, fixed = compute_global_tensor_info(canonical_in_order(local, BTHD), mesh, [Shard(1)])
    assert tuple(loose) == (448, 112, 16, 1)  # [B, H, T, D]: the captured transpose + view would fail
    assert tuple(fixed) == dense_strides((2, 4, 7, 16), BTHD) == (448, 16, 64, 1)
    assert torch.equal(canonical_in_order(local, BTHD), local)
