"""Spreads over the features written as means.

`x.std(-1)` / `x.var(-1)` of a column linear's output (Gemma3n's activation sparsity cuts its MLP
gate at mean + k * std over the intermediate width) is one value per token, but DTensor has no
rule to reduce it over a split width. As `sqrt(mean((x - mean(x))^2) * n / (n - correction))` it
is two means, each a per-token statistic the labeling pass reduces across tp (one all-reduce of
one value per token each); the same values up to summation order.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from autoshard.graph.fx_nodes import call, tensor_value

aten = torch.ops.aten
_SPREADS = (aten.std.correction, aten.var.correction, aten.std.dim, aten.var.dim)


def spreads_as_means(gm: fx.GraphModule) -> bool:
    changed = False
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _SPREADS or len(node.args) < 2:
            continue
        x, dims = node.args[0], node.args[1]
        xv = tensor_value(x)
        if xv is None or not isinstance(dims, (list, tuple)) or not dims:
            continue
        n = math.prod(xv.shape[d] for d in dims)
        if node.target in (aten.std.dim, aten.var.dim):  # (x, dim, unbiased=True, keepdim=False)
            rest = list(node.args[2:]) + [node.kwargs.get("unbiased", True), node.kwargs.get("keepdim", False)][len(node.args) - 2:]
            correction, keepdim = int(bool(rest[0])), bool(rest[1])
        else:
            correction, keepdim = node.kwargs.get("correction", 1), node.kwargs.get("keepdim", False)
        if not isinstance(n, int) or not isinstance(correction, (int, float)) or n <= correction:
            continue
        with g.inserting_before(node):
            mean = call(g, aten.mean.dim, (x, list(dims), True))
            centred = call(g, aten.sub.Tensor, (x, mean))
            out = call(g, aten.mean.dim, (call(g, aten.mul.Tensor, (centred, centred)), list(dims), keepdim))
            if correction:
                out = call(g, aten.mul.Tensor, (out, n / (n - correction)))
            if node.target in (aten.std.correction, aten.std.dim):
                out = call(g, aten.sqrt.default, (out,))
        out.meta = {**node.meta, "val": out.meta["val"]}
        node.replace_all_uses_with(out)
        g.erase_node(node)
        changed = True
    return changed
