"""Islands of values that live in a folded layout (`[b * h, ...]` attention, `[rows, d]` norms).

The head and row unfolds rewrite a connected set of values onto their unfolded sources, all or
nothing: an island starts at the ops that fold a value, takes in every op whose folded inputs
all belong to islands of the same lead dims (joining those islands), and is rewritten only if
no value of it leaves except through an op that unfolds it again.
"""

from __future__ import annotations

from typing import Callable

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def same_lead(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def folded_islands(nodes: list[fx.Node], fold_lead: Callable[[fx.Node], tuple | None],
                   folded_inputs: Callable[[fx.Node], list[fx.Node] | None],
                   may_leave: Callable[[fx.Node, fx.Node, tuple], bool]) -> tuple[list[fx.Node], dict[fx.Node, tuple]]:
    """(the members of islands that may be rewritten, in graph order; each member's lead dims).

    `fold_lead(n)`: the lead dims `n` folds, or None if it folds none; `folded_inputs(n)`: the
    inputs that live folded if `n` is an op the island can hold, else None; `may_leave(n, user,
    lead)`: whether a member `n` may be read by `user` outside the island."""
    lead: dict[fx.Node, tuple] = {}
    parent: dict[fx.Node, fx.Node] = {}

    def root(n):
        while parent[n] is not n:
            n = parent[n]
        return n

    for n in nodes:
        start = fold_lead(n)
        if start is not None:
            lead[n], parent[n] = start, n
            continue
        ins = folded_inputs(n)
        if ins and all(a in lead and same_lead(lead[a], lead[ins[0]]) for a in ins):
            lead[n], parent[n] = lead[ins[0]], n
            for a in ins:
                parent[root(a)] = n
    bad = {root(n) for n in lead for u in n.users if u not in lead and not may_leave(n, u, lead[n])}
    return [n for n in nodes if n in lead and root(n) not in bad], lead
