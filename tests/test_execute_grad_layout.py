"""`runtime.ConsistentGrad` and `consistent_grad`: a gradient DTensor built with global strides that do not describe its
local tensor (DTensor's layout-change backwards do this after a transpose) must not reach a
`view` in backward, which DTensor checks on the global strides and the kernel on the local ones.

The model is the shape of Doge's dynamic-mask attention and of the Qwen3-Next/OLMo-hybrid linear
attention: a head-sharded projection reshaped into a row linear whose output is transposed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import full, max_grad_diff, tp_mesh


class DynamicMaskAttention(nn.Module):
    """Doge's attention: a per-head mask computed from V by a row linear, transposed, expanded."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.dt = nn.Linear(hidden, heads, bias=False)
        self.A = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        dt = self.dt(v.transpose(1, 2).reshape(b, t, -1))                         # [b, t, h]
        gate = torch.exp(self.A * F.softplus(dt)).transpose(-1, -2)               # [b, h, t]
        mask = gate[:, :, None, :].expand(-1, -1, t, -1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def _case(guard: bool) -> dict:
    import autoshard
    from autoshard.execute import dtensor_ops as runtime

    torch.manual_seed(0)
    model = DynamicMaskAttention()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(x,))
    guards = sum(1 for m in sharded.graph_module.modules() if type(m).__name__ == "ConsistentGrad")
    saved = runtime.consistent_grad
    if not guard:
        runtime.consistent_grad = lambda t: t
    try:
        out = full(sharded(x))
        out.pow(2).sum().backward()
    except RuntimeError as e:
        return {"error": str(e)[:120], "guards": guards}
    finally:
        runtime.consistent_grad = saved
    ref(x).pow(2).sum().backward()
    grads, missing = max_grad_diff(sharded, ref)
    return {"out": (out - ref(x)).abs().max().item(), "grads": grads, "missing": missing, "guards": guards,
            "split": str(sharded.plan.placements()["v.weight"])}


def test_guarded_program_is_exact(ranks2):
    for r in ranks2.run(_case, True):
        assert r.get("error") is None, r
        assert r["split"] != "Replicate()", r  # the heads really are split, or the test tests nothing
        assert r["guards"] > 0 and r["out"] < 1e-5 and r["grads"] < 1e-5 and not r["missing"], r


def test_unguarded_program_fails_in_backward(ranks2):
    """The failure the guard exists for, so a torch that stops producing it shows up here."""
    for r in ranks2.run(_case, False):
        assert "view size is not compatible" in r.get("error", ""), r


def _consistent_unit() -> dict:
    from torch.distributed.tensor import DTensor, Shard

    from autoshard.execute.dtensor_ops import _consistent

    mesh = tp_mesh()
    local = torch.arange(24.0).reshape(4, 6).t()            # [6, 4], strides (1, 6)
    bad = DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=torch.Size([6, 8]), stride=(8, 1))
    good = DTensor.from_local(local.contiguous(), mesh, [Shard(1)], run_check=False)
    # a dense uneven shard (7 rows over 2 ranks: 4 + 3) is consistent, though its global strides
    # are not its local ones scaled by the mesh size
    rows = 4 if mesh.get_local_rank() == 0 else 3
    uneven = DTensor.from_local(torch.ones(2, rows, 5), mesh, [Shard(1)], run_check=False, shape=torch.Size([2, 7, 5]), stride=(35, 5, 1))
    fixed = _consistent(bad)
    return {"fixed_stride": fixed.stride(), "fixed_local": fixed._local_tensor.is_contiguous(),
            "same_values": torch.equal(fixed._local_tensor, local), "good_untouched": _consistent(good) is good,
            "uneven_untouched": _consistent(uneven) is uneven}


def test_consistent_rewraps_only_inconsistent_gradients(ranks2):
    for r in ranks2.run(_consistent_unit):
        assert r == {"fixed_stride": (8, 1), "fixed_local": True, "same_values": True, "good_untouched": True,
                     "uneven_untouched": True}
