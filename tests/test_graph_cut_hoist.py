"""`graph/cut_hoist`: a fused projection cut after per-channel ops (Qwen3.5's gated delta net:
transpose, depthwise causal conv, SiLU, then q | k | v) or re-cut after a `cat` of separate
projections (Kimi-Linear) is cut at the projection, with the same values and gradients; a cut
behind an op that mixes channels stays where it is."""

from __future__ import annotations

import torch
from torch import nn

from autoshard.graph.cut_hoist import cuts_before_channel_ops
from autoshard.graph.depthwise_conv import depthwise_conv_as_taps

aten = torch.ops.aten


class ConvThenCut(nn.Module):
    """`in_proj` -> channels first -> depthwise causal conv -> SiLU -> back -> q | k | v."""

    def __init__(self, mix: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(8, 16, bias=False)
        self.conv = nn.Conv1d(16, 16, 3, groups=1 if mix else 16, padding=2)

    def forward(self, x):
        h = self.in_proj(x).transpose(1, 2)
        h = torch.nn.functional.silu(self.conv(h)[..., : x.shape[1]]).transpose(1, 2)
        q, k, v = torch.split(h, [4, 4, 8], dim=-1)
        return (q * k).sum(-1, keepdim=True) * v


class CatThenCut(nn.Module):
    """q, k, v projected apart, `cat` for one pointwise op, cut again into the same parts."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.sigmoid(torch.cat([self.q(x), self.k(x), self.v(x)], -1))
        q, k, v = h.split([4, 4, 8], -1)
        return (q * k).sum(-1, keepdim=True) * v


def _rewritten(model, x):
    """(changed, graph, module) after the conv's taps and the cut move; the module computes the
    model's values and gradients (input and every parameter)."""
    ep = torch.export.export(model, (x,), strict=False)
    depthwise_conv_as_taps(ep.graph_module)
    changed = cuts_before_channel_ops(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    m = ep.module()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = m(a), model(b)
    torch.testing.assert_close(out, expect)
    out.pow(2).sum().backward()
    expect.pow(2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    got = dict(m.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad)
    return changed, ep.graph_module


def _cuts(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)]


def test_cut_after_a_depthwise_conv_moves_to_the_projection_with_equal_values_and_gradients():
    torch.manual_seed(0)
    model, x = ConvThenCut(), torch.randn(2, 5, 8)
    changed, gm = _rewritten(model, x)
    assert changed
    at_linear = [c for c in _cuts(gm) if c.args[0].target is aten.linear.default]
    assert len(at_linear) == 1 and at_linear[0].args[1:] == ([4, 4, 8], 2)
    # the conv's filter taps are cut the same way (on the channel dim), nothing else is
    assert all(c.args[1] == [4, 4, 8] for c in _cuts(gm))


def test_cut_after_a_cat_of_the_same_parts_cancels_it():
    model, x = CatThenCut(), torch.randn(2, 5, 8)
    changed, gm = _rewritten(model, x)
    assert changed
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.cat.default not in ops and not _cuts(gm)
    assert ops.count(aten.sigmoid.default) == 3  # once per part


def test_a_cut_behind_a_conv_that_mixes_channels_stays():
    model, x = ConvThenCut(mix=True), torch.randn(2, 5, 8)
    changed, gm = _rewritten(model, x)
    assert not changed
    assert [c.args[0].target for c in _cuts(gm)] == [aten.transpose.int]


class CutPartCutAgain(nn.Module):
    """Mamba-2's in_proj: cut into z | xBC | dt, xBC through SiLU and cut again into x | B | C."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 22, bias=False)

    def forward(self, x):
        z, xbc, dt = self.in_proj(x).split([6, 12, 4], -1)
        h, b, c = torch.nn.functional.silu(xbc).split([8, 2, 2], -1)
        return torch.cat([z * h[..., :6], b * c, dt], -1)


def test_a_part_cut_again_refines_the_projection_cut():
    torch.manual_seed(0)
    model, x = CutPartCutAgain(), torch.randn(2, 5, 8)
    changed, gm = _rewritten(model, x)
    assert changed
    assert [c.args[1:] for c in _cuts(gm)] == [([6, 8, 2, 2, 4], 2)]
    assert _cuts(gm)[0].args[0].target is aten.linear.default
