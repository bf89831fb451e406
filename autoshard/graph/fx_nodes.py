"""Building graph nodes in the rewrites that run right after capture."""

from __future__ import annotations

from torch import fx


def call(g: fx.Graph, target, args, kwargs=None, after: fx.Node | None = None) -> fx.Node:
    """A new node computing `target(*args)` (after `after`, else at the graph's insertion point),
    its fake value worked out from the arguments' as the passes after capture expect."""
    if after is not None:
        with g.inserting_after(after):
            node = g.call_function(target, args, kwargs or {})
    else:
        node = g.call_function(target, args, kwargs or {})
    vals = fx.node.map_arg(args, lambda a: a.meta["val"])
    kw = fx.node.map_arg(kwargs or {}, lambda a: a.meta["val"])
    node.meta["val"] = target(*vals, **kw)
    return node
