"""`graph/depthwise_conv`: a conv1d with one filter per channel becomes pad, slices and products
with the same values and gradients (padding, dilation, bias); other convolutions stay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoshard.graph.depthwise_conv import depthwise_conv_as_taps

aten = torch.ops.aten


class Convs(nn.Module):
    def __init__(self, groups: int, bias: bool, padding: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(6, 6, 3, groups=groups, bias=bias, padding=padding, dilation=dilation)

    def forward(self, x):  # a causal conv: the first L outputs
        return self.conv(x)[..., : x.shape[-1]]


def _rewritten(model, x):
    ep = torch.export.export(model, (x,), strict=False)
    changed = depthwise_conv_as_taps(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return changed, ep, [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("bias,padding,dilation", [(True, 2, 1), (False, 0, 1), (True, 4, 2)])
def test_depthwise_conv_becomes_taps_with_equal_values_and_gradients(bias, padding, dilation):
    torch.manual_seed(0)
    model, x = Convs(6, bias, padding, dilation), torch.randn(2, 6, 9)
    changed, ep, ops = _rewritten(model, x)
    assert changed and aten.conv1d.default not in ops
    assert ops.count(aten.select.int) == 3  # one tap per kernel position
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    rewritten = ep.module()
    out = rewritten(a)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in rewritten.named_parameters()}
    model.zero_grad()
    expect = model(b)
    expect.pow(2).sum().backward()
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(a.grad, b.grad)
    assert grads.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)


def test_a_conv_mixing_channels_is_left_alone():
    changed, _, ops = _rewritten(Convs(2, True, 2, 1), torch.randn(2, 6, 9))
    assert not changed and aten.conv1d.default in ops
