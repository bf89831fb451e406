"""A depthwise 1-D convolution as the sum of its taps.

LFM2's short conv, Mamba's and the gated-delta-net mixers' causal conv run `conv1d` with one
filter per channel (`groups == channels`). Every output channel reads only its own input
channel, so with channels split over tp the conv is shard-local, but DTensor splits a
convolution on its batch only and would gather the channels. Written as
`sum_j x_padded[..., j : j + L_out] * w[:, :, j]` (plus the bias) it is pad, slices and
elementwise products, which keep the channel split; the same values up to summation order.
"""

from __future__ import annotations

import torch
from torch import fx

from autoshard.graph.fx_nodes import call

aten = torch.ops.aten


def depthwise_conv_as_taps(gm: fx.GraphModule) -> bool:
    changed = False
    g = gm.graph
    for node in list(g.nodes):
        spec = _depthwise(node)
        if spec is None:
            continue
        x, w, bias, pad, dil, k = spec
        with g.inserting_before(node):
            xp = call(g, aten.constant_pad_nd.default, (x, [pad, pad], 0.0)) if pad else x
            acc = None
            for j in range(k):
                end = -(k - 1 - j) * dil or None
                tap = call(g, aten.mul.Tensor, (call(g, aten.slice.Tensor, (xp, 2, j * dil, end)),
                                                call(g, aten.select.int, (w, 2, j))))
                acc = tap if acc is None else call(g, aten.add.Tensor, (acc, tap))
            if bias is not None:
                acc = call(g, aten.add.Tensor, (acc, call(g, aten.unsqueeze.default, (bias, 1))))
        acc.meta = {**node.meta, "val": acc.meta["val"]}
        node.replace_all_uses_with(acc)
        g.erase_node(node)
        changed = True
    return changed


def _depthwise(node: fx.Node):
    """(x, w, bias, padding, dilation, kernel) of a stride-1 `conv1d` with one filter per channel
    on a `[B, C, L]` input, else None."""
    if node.op != "call_function" or node.target is not aten.conv1d.default or node.kwargs:
        return None
    args = list(node.args) + [None, [1], [0], [1], 1][len(node.args) - 2:]
    x, w, bias, stride, padding, dilation, groups = args[:7]
    xv, wv = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (x, w))
    if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor) and xv.ndim == 3 and wv.ndim == 3):
        return None
    c, one, k = wv.shape
    ints = all(isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], int) for v in (stride, padding, dilation))
    if not ints or stride[0] != 1 or one != 1 or not isinstance(groups, int) or groups != c or xv.shape[1] != c or not isinstance(k, int):
        return None
    return x, w, bias, padding[0], dilation[0], k
