"""A program's decoder layers as stretches of its graph, from where their parameters are read.

A unit is a repeated block of the model (`model.layers.3`): the parameters under one path that
ends in an index, with two or more siblings. Its stretch of the graph runs from the first node
that reads one of its parameters to the last — reads through views included (a transposed expert
weight read later by a grouped matmul), since everything reading a parameter's storage must run
while FSDP has it gathered. FSDP's stages, activation checkpointing and its price all cut here.

    >>> layer_units(["model.layers.0.mlp.up.weight", "model.layers.1.mlp.up.weight"])
    ['model.layers.0', 'model.layers.1']
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import fx

_INDEXED = re.compile(r"^(.*?)\.(\d+)\.")


def layer_units(fqns) -> list[str]:
    """Paths of the repeated blocks among parameter names: the first indexed path with 2+ siblings."""
    by_parent: dict[str, set[int]] = defaultdict(set)
    for fqn in fqns:
        m = _INDEXED.match(fqn)
        if m:
            by_parent[m.group(1)].add(int(m.group(2)))
    if not by_parent:
        return []
    parent, indices = max(by_parent.items(), key=lambda kv: len(kv[1]))
    return [f"{parent}.{i}" for i in sorted(indices)] if len(indices) >= 2 else []


def unit_of(fqn: str, units: list[str]) -> str | None:
    for u in units:
        if fqn.startswith(u + "."):
            return u
    return None


def reads(node: fx.Node) -> set[fx.Node]:
    """The nodes that read `node`'s storage: its users, and through views theirs."""
    out, todo = set(), list(node.users)
    while todo:
        u = todo.pop()
        if u not in out:
            out.add(u)
            if is_view(u):
                todo.extend(u.users)
    return out


def is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and any(r.alias_info is not None for r in schema.returns)


def spans(nodes: list[fx.Node], state: list[tuple[fx.Node, str]], units: list[str]) -> list[tuple[int, int, str]]:
    """(first index, last index, unit) of each unit's stretch of `nodes`, in graph order: from
    the first to the last read of a parameter or buffer of the unit (`state`: node, its FQN)."""
    index = {n: i for i, n in enumerate(nodes)}
    found: dict[str, list[int]] = {}
    for node, fqn in state:
        unit = unit_of(fqn, units)
        users = reads(node) if unit is not None else set()
        if users:
            lo, hi = min(index[u] for u in users), max(index[u] for u in users)
            s = found.setdefault(unit, [lo, hi])
            s[0], s[1] = min(s[0], lo), max(s[1], hi)
    return sorted((lo, hi, u) for u, (lo, hi) in found.items())


def segments(nodes: list[fx.Node], spans: list[tuple[int, int, str]]) -> dict[fx.Node, str]:
    """Node -> unit for the nodes each unit's stage runs: from its first read to the next unit's
    first read (the last unit: to its last read), as `execute.staged.split_program` cuts."""
    out = {}
    for k, (lo, hi, unit) in enumerate(spans):
        end = spans[k + 1][0] - 1 if k + 1 < len(spans) else hi
        for n in nodes[lo:end + 1]:
            out[n] = unit
    return out
