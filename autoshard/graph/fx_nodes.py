"""Building graph nodes in the rewrites that run right after capture."""

from __future__ import annotations

import torch
from torch import fx


def tensor_value(node):
    """The fake tensor a node computes, or None (not a node, or a non-tensor value)."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def call(g: fx.Graph, target, args, kwargs=None) -> fx.Node:
    """A new node computing `target(*args)` at the graph's insertion point, its fake value worked
    out from the arguments' as the passes after capture expect."""
    node = g.call_function(target, args, kwargs or {})
    vals = fx.node.map_arg(args, lambda a: a.meta["val"])
    kw = fx.node.map_arg(kwargs or {}, lambda a: a.meta["val"])
    node.meta["val"] = target(*vals, **kw)
    return node
