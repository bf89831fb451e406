"""A two-operand `einsum` as `permute`, `unsqueeze` and one batched `matmul`.

Mamba-2's chunked scan (and the hybrids built on it) contracts its per-head tensors with
`einsum("bclhn,bcshn->bclsh", C, B)` and four more like it. DTensor has no rule for `einsum`
itself, so the simulator saw every head-split operand gathered. Written as a `matmul` whose
batch dims are the letters both operands and the output share (heads among them), the same
product runs on head shards; a second free letter of one side becomes a batch dim the other
side broadcasts over. Equations this cannot write that way (a letter summed inside one operand,
a repeated letter, more than one contracted letter, `...`) are left as they are.
"""

from __future__ import annotations

import torch
from torch import fx

from autoshard.graph.fx_nodes import call as _call
from autoshard.graph.fx_nodes import tensor_value as _val

aten = torch.ops.aten


def einsum_as_matmul(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        roles = _roles(node)
        if roles is None:
            continue
        with gm.graph.inserting_before(node):
            new = _matmul_form(gm.graph, node, *roles)
        new.meta = {**node.meta, "val": new.meta["val"]}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _roles(node: fx.Node):
    """(a, b, out, batch, contract, left, right) letters of a two-operand einsum node, else None."""
    if node.op != "call_function" or node.target is not aten.einsum.default or node.kwargs or len(node.args) != 2:
        return None
    eq, ops = node.args
    if not isinstance(eq, str) or "..." in eq or "->" not in eq or len(ops) != 2:
        return None
    ins, out = eq.replace(" ", "").split("->")
    if ins.count(",") != 1:
        return None
    a, b = ins.split(",")
    vals = [_val(o) for o in ops]
    if any(v is None for v in vals) or (vals[0].ndim, vals[1].ndim) != (len(a), len(b)):
        return None
    if any(len(set(s)) != len(s) for s in (a, b, out)) or set(out) - set(a) - set(b):
        return None
    if (set(a) - set(b) - set(out)) or (set(b) - set(a) - set(out)):
        return None  # a letter summed inside one operand
    contract = [c for c in a if c in b and c not in out]
    if len(contract) > 1:
        return None
    batch = [c for c in out if c in a and c in b]
    left = [c for c in a if c in out and c not in b]
    right = [c for c in b if c in out and c not in a]
    return a, b, out, batch, contract, left, right


def _matmul_form(g: fx.Graph, node: fx.Node, a, b, out, batch, contract, left, right) -> fx.Node:
    x, y = node.args[1]
    extra_a, extra_b = left[:-1], right[:-1]  # more free letters than a matmul has: batch dims
    lead = batch + extra_a + extra_b
    x = _arrange(g, x, a, lead, left[-1:] or [None], contract or [None])
    y = _arrange(g, y, b, lead, contract or [None], right[-1:] or [None])
    prod = _call(g, aten.matmul.default, (x, y))
    have = lead + (left[-1:] or [None]) + (right[-1:] or [None])
    for i in [i for i, c in enumerate(have) if c is None][::-1]:
        prod = _call(g, aten.squeeze.dim, (prod, i))
    have = [c for c in have if c is not None]
    perm = [have.index(c) for c in out]
    return prod if perm == list(range(len(perm))) else _call(g, aten.permute.default, (prod, perm))


def _arrange(g: fx.Graph, x: fx.Node, letters: str, lead: list, row: list, col: list) -> fx.Node:
    """`x` (dims named by `letters`) permuted to `lead + row + col`, with a size-1 dim where it
    lacks a letter (None: a matmul dim the equation does not have)."""
    want = lead + row + col
    present = [c for c in want if c is not None and c in letters]
    perm = [letters.index(c) for c in present]
    if perm != list(range(len(perm))):
        x = _call(g, aten.permute.default, (x, perm))
    for i, c in enumerate(want):
        if c is None or c not in letters:
            x = _call(g, aten.unsqueeze.default, (x, i))
    return x
