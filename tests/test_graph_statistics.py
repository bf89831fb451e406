"""`graph/statistics`: std / var over the features become means with the same values and
gradients (biased and unbiased, keepdim or not), which the labeling pass can reduce over tp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoshard.graph.statistics import spreads_as_means

aten = torch.ops.aten


class Spreads(nn.Module):
    """Gemma3n's activation-sparsity cut, `mean + k * std` over the intermediate width."""

    def __init__(self, unbiased: bool, keepdim: bool):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.unbiased, self.keepdim = unbiased, keepdim

    def forward(self, x):
        h = self.up(x)
        std = torch.std(h, dim=-1, keepdim=True, unbiased=self.unbiased)
        var = torch.var(h, dim=-1, keepdim=self.keepdim, unbiased=self.unbiased)
        return torch.relu(h - h.mean(-1, keepdim=True) - 0.5 * std), var


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("keepdim", [False, True])
def test_std_and_var_become_means_with_equal_values_and_gradients(unbiased, keepdim):
    torch.manual_seed(0)
    model, x = Spreads(unbiased, keepdim), torch.randn(2, 3, 4)
    ep = torch.export.export(model, (x,), strict=False)
    assert spreads_as_means(ep.graph_module)
    ep.graph_module.recompile()
    ops = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
    assert not ops & {aten.std.dim, aten.var.dim, aten.std.correction, aten.var.correction}
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (o1, v1), (o2, v2) = ep.module()(a), model(b)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(v1, v2)
    (o1.sum() + v1.sum()).backward()
    (o2.sum() + v2.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad)
