"""`graph/head_folds`: attention written on `[b * h, s, d]` (BART-style `bmm`, BLOOM's `baddbmm`
with ALiBi) is rewritten onto `[b, h, s, d]` with the same values and gradients, so heads can
split; an island a merged value escapes from is left alone. On gloo, XGLM and BLOOM then shard
their attention exactly, DTensor and lowered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoshard.graph.head_folds import unfold_batch_heads, zero_started_baddbmm_as_bmm
from tests.test_fused import _check_exact, _shard_family

aten = torch.ops.aten


class FoldedAttention(nn.Module):
    """q/k/v folded to `[b * h, s, d]`; scores viewed to `[b, h, s, s]` for the mask and back;
    BLOOM's ALiBi bias `repeat`ed to `[b * h, 1, s]` and added by `baddbmm`."""

    def __init__(self, dim: int = 16, heads: int = 4, alibi: bool = False, leak: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.alibi, self.leak = heads, alibi, leak

    def forward(self, x, mask):
        b, s, e = x.shape
        h, d = self.heads, e // self.heads

        def fold(t):
            return t.view(b, s, h, d).transpose(1, 2).reshape(b * h, s, d)

        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        if self.alibi:
            slopes = torch.arange(1, h + 1, dtype=x.dtype)[:, None, None] * torch.arange(s, dtype=x.dtype)[None, None, :]
            scores = torch.baddbmm(slopes.repeat(b, 1, 1), q, k.transpose(1, 2), beta=0.5, alpha=d ** -0.5)
        else:
            scores = torch.bmm(q * d ** -0.5, k.transpose(1, 2))
        scores = scores.view(b, h, s, s) + mask
        probs = torch.softmax(scores.view(b * h, s, s), dim=-1)
        out = torch.bmm(probs, v).view(b, h, s, d).transpose(1, 2).reshape(b, s, e)
        if self.leak:  # a merged value leaves the island unsplit
            return self.o(out), q.sum()
        return self.o(out)


def _run(alibi: bool, leak: bool = False):
    torch.manual_seed(0)
    model = FoldedAttention(alibi=alibi, leak=leak)
    x, mask = torch.randn(2, 5, 16), torch.randn(2, 1, 5, 5)
    ep = torch.export.export(model, (x, mask), strict=False)
    changed = unfold_batch_heads(ep.graph_module)
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    ops = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = ep.module()(a, mask), model(b, mask)
    out, expect = (out, expect) if not leak else (out[0] + out[1], expect[0] + expect[1])
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    expect.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    return changed, ops


@pytest.mark.parametrize("alibi", [False, True], ids=["bmm", "baddbmm-alibi"])
def test_folded_attention_runs_on_four_d_values_with_equal_values_and_gradients(alibi):
    changed, ops = _run(alibi)
    assert changed
    assert aten.bmm.default not in ops and aten.baddbmm.default not in ops and aten.repeat.default not in ops
    assert ops.count(aten.matmul.default) == 2


def test_an_island_a_merged_value_escapes_from_is_left_alone():
    changed, ops = _run(alibi=False, leak=True)
    # q (returned summed, merged) keeps its scores' bmm; the probabilities' island is rewritten
    assert changed and ops.count(aten.bmm.default) == 1 and ops.count(aten.matmul.default) == 1


class ZeroStartedScores(nn.Module):
    """GPT-NeoX-Japanese's scores: `baddbmm` onto a fresh `zeros(b * h, s, s)`, folded q and k."""

    def forward(self, q, k):
        b, h, s, d = q.shape
        zeros = torch.zeros(b * h, s, s, dtype=q.dtype)
        scores = torch.baddbmm(zeros, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2), beta=1.0, alpha=0.5)
        return torch.softmax(scores.view(b, h, s, s), -1)


def test_scores_started_from_zeros_unfold_to_a_four_d_matmul_with_equal_values_and_gradients():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    ep = torch.export.export(ZeroStartedScores(), (q, k), strict=False)
    assert zero_started_baddbmm_as_bmm(ep.graph_module) and unfold_batch_heads(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    ops = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert aten.baddbmm.default not in ops and aten.bmm.default not in ops and aten.zeros.default not in ops
    assert ops.count(aten.matmul.default) == 1
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    out, expect = ep.module()(qa, k), ZeroStartedScores()(qb, k)
    torch.testing.assert_close(out, expect)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    torch.testing.assert_close(qa.grad, qb.grad)


# the lowered program on every CI run; the DTensor one (same plan) with the slow tests
@pytest.mark.parametrize("lower", [pytest.param(False, marks=pytest.mark.slow), True], ids=["dtensor", "lowered"])
@pytest.mark.parametrize("family", ["xglm", "bloom"])
def test_folded_attention_families_shard_heads_exactly_tp2(ranks2, family, lower):
    names = {"xglm": ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.out_proj.weight"),
             "bloom": ("transformer.h.0.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight")}
    col, row = names[family]
    for r in ranks2.run(_shard_family, family, lower):
        _check_exact(r, lower)
        assert r["plan"][col] == "Shard(0)" and r["plan"][row] == "Shard(1)"
        # 2 layers x (attention, MLP) row reduces and the vocab-parallel embedding's: all-reduces,
        # or reduce-scatters onto a sequence-parallel stream
        assert r["planned"] + r["expected_comms"].get("reduce_scatter", 0) == 5, r


def test_gpt_neox_japanese_zero_started_scores_shard_heads_exactly_tp2(ranks2):
    """On DTensors: its lowering falls back (a bias added after the reduction, `expand_as`)."""
    attn = "gpt_neox_japanese.layers.0.attention"
    for r in ranks2.run(_shard_family, "gpt_neox_japanese", False):
        _check_exact(r, False)
        assert r["plan"][f"{attn}.query_key_value.weight"] == "Shard(0)" and r["plan"][f"{attn}.dense.weight"] == "Shard(1)"
