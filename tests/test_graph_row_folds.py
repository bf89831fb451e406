"""`graph/row_folds`: a gated RMSNorm written on `[b * s * h, d]` rows (Qwen3.5's, Qwen3-Next's)
is rewritten onto `[b, s, h, d]` with the same values and gradients, so heads can split; an
island a row value escapes from is left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoshard.graph.row_folds import unflatten_rows

aten = torch.ops.aten


class RowGatedNorm(nn.Module):
    """Attention output and gate `[b, s, h, d]`, normalised per row of `d` and gated, then
    `[b, s, h * d]` into the output projection."""

    def __init__(self, d: int = 4, heads: int = 3, leak: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.o = nn.Linear(heads * d, 6)
        self.d, self.leak = d, leak

    def forward(self, x, z):
        b, s = x.shape[:2]
        rows, gate = x.reshape(-1, self.d), z.reshape(-1, self.d)
        var = rows.float().pow(2).mean(-1, keepdim=True)
        y = self.weight * (rows * torch.rsqrt(var + 1e-6)) * torch.nn.functional.silu(gate)
        out = self.o(y.reshape(b, s, -1))
        return (out, rows.sum(0)) if self.leak else out


def _run(leak: bool, gate_features: bool = False):
    """`gate_features`: the gate comes as its projection's `[b, s, h * d]` features."""
    torch.manual_seed(0)
    model = RowGatedNorm(leak=leak)
    x, z = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 12) if gate_features else torch.randn(2, 5, 3, 4)
    ep = torch.export.export(model, (x, z), strict=False)
    changed = unflatten_rows(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    m = ep.module()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = m(a, z), model(b, z)
    out, expect = (out, expect) if not leak else (out[0].sum() + out[1].sum(), expect[0].sum() + expect[1].sum())
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    expect.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(dict(m.named_parameters())["weight"].grad, model.weight.grad)
    return changed, ep.graph_module


@pytest.mark.parametrize("gate_features", [False, True], ids=["gate_by_heads", "gate_features"])
def test_rows_of_a_gated_norm_are_unflattened_with_equal_values_and_gradients(gate_features):
    changed, gm = _run(leak=False, gate_features=gate_features)
    assert changed
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert not any(v.ndim == 2 for v in vals)  # no value lives as rows any more
    means = [n for n in gm.graph.nodes if n.target is aten.mean.dim]
    assert len(means) == 1 and means[0].args[1] == [-1] and means[0].meta["val"].shape == (2, 5, 3, 1)


def test_an_island_whose_rows_escape_is_left_alone():
    changed, gm = _run(leak=True)
    assert not changed
