"""Undo attention code's fold of batch and heads into one dim.

Older attention code (BART-style XGLM, TrOCR, MVP; BLOOM with its ALiBi bias) runs
`q.view(b, s, h, d).transpose(1, 2).reshape(b * h, s, d)` and then `bmm`/`baddbmm` on 3-D
tensors, viewing the scores back to `[b, h, s, s]` for the mask. With heads split over tp the
merged `b * h` dim is no placement DTensor has (rank r holds every batch's heads r), so the
whole attention was replicated. The same computation on the unmerged 4-D tensors (`matmul`
batches over `b` and `h`) keeps heads a dim of their own: an island of values living merged is
rewritten onto their 4-D sources, from the merges to the views that split `b * h` again.

An island is rewritten only when every op in it has a 4-D form here and every value leaving it
is split back to `[b, h, ...]`; anything else leaves the graph as it is.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autoshard.graph.fx_nodes import call as _call
from autoshard.graph.fx_nodes import tensor_value as _val
from autoshard.graph.islands import folded_islands, same_lead

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_UNARY = (aten.softmax.int, aten._softmax.default, aten.dropout.default, aten.to.dtype, aten._to_copy.default,
          aten.mul.Tensor, aten.div.Tensor, aten.clone.default, aten.alias.default, aten.detach.default)

_FRESH = (aten.matmul.default, aten.add.Tensor, aten.softmax.int, aten._softmax.default, aten.clone.default)  # contiguous results


def unfold_batch_heads(gm: fx.GraphModule) -> bool:
    """Rewrite every island of `[b * h, ...]` values onto 4-D `[b, h, ...]` ones (see module doc)."""
    nodes = list(gm.graph.nodes)
    good, lead = folded_islands(
        nodes, lambda n: _lead(n) if _merged_source(n) is not None else None,
        lambda n: [a for a in n.all_input_nodes if _val(a) is not None] if _has_4d_form(n) else None,
        lambda n, u, lead: _splits(u, lead) or u.target is aten._assert_tensor_metadata.default)
    if not good:
        return False
    g, four, done, members = gm.graph, {}, [], set(good)
    for n in nodes:
        if n in members:
            with g.inserting_before(n.next):  # new nodes in the order they are made
                four[n] = _four_d(g, n, four)
        elif n.op == "call_function" and n.target in _RESHAPES and n.args[0] in four:
            # a split of a merged value is its 4-D form, made contiguous as the merge made it
            c = four[n.args[0]]
            if c.target not in _FRESH:
                with g.inserting_after(n):
                    c = _call(g, aten.clone.default, (c,), {"memory_format": torch.contiguous_format})
            n.replace_all_uses_with(c)
            done.append(n)
    for n in done + good[::-1]:
        for user in list(n.users):
            if user.target is aten._assert_tensor_metadata.default:
                g.erase_node(user)
        g.erase_node(n)
    return True


_ZEROS = (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)


def zero_started_baddbmm_as_bmm(gm: fx.GraphModule) -> bool:
    """`baddbmm(zeros(b * h, q, k), q, k^T, alpha=a)` (GPT-NeoX-Japanese's scores, started from a
    fresh zero tensor) as `bmm(q, k^T) * a`: the same values, with no fresh `[b * h, ...]` tensor
    (no merge of a `[b, h]` value) keeping the island below from its 4-D form."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.baddbmm.default or len(node.args) != 3:
            continue
        start = node.args[0]
        if not (isinstance(start, fx.Node) and start.target in _ZEROS and set(node.kwargs) <= {"beta", "alpha"}):
            continue
        alpha = node.kwargs.get("alpha", 1)
        with gm.graph.inserting_before(node):
            new = _call(gm.graph, aten.bmm.default, node.args[1:])
            if alpha != 1:
                new = _call(gm.graph, aten.mul.Tensor, (new, alpha))
        new.meta = {**node.meta, "val": new.meta["val"]}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not start.users:
            gm.graph.erase_node(start)
        changed = True
    return changed


def _merged_source(node: fx.Node):
    """(kind, source) when `node` is a 4-D `[b, h, *rest]` value merged to `[b * h, *rest]`:
    a reshape ("reshape"), or `repeat` of `[h, *rest]` b times on dim 0 ("repeat", BLOOM's ALiBi)."""
    if node.op != "call_function":
        return None
    out, src = _val(node), _val(node.args[0]) if node.args else None
    if out is None or src is None:
        return None
    if node.target in _RESHAPES and src.ndim == out.ndim + 1 >= 4 and same_lead(out.shape[1:], src.shape[2:]) \
            and statically_known_true(out.shape[0] == src.shape[0] * src.shape[1]):
        return "reshape", node.args[0]
    if node.target is aten.repeat.default and src.ndim == out.ndim >= 3 and all(r == 1 for r in node.args[1][1:]):
        return "repeat", node.args[0]
    return None


def _splits(node: fx.Node, lead) -> bool:
    """Does reshape `node` split a merged value back to `[b, h, *rest]`?"""
    out, src = _val(node), _val(node.args[0])
    return (node.target in _RESHAPES and out is not None and out.ndim == src.ndim + 1 and same_lead(out.shape[:2], lead)
            and same_lead(out.shape[2:], src.shape[1:]))


def _lead(node: fx.Node):
    kind, src = _merged_source(node)
    if kind == "reshape":
        return tuple(_val(src).shape[:2])
    b = node.args[1][0]
    return (b.meta["val"] if isinstance(b, fx.Node) else b, _val(src).shape[0])


def _has_4d_form(node: fx.Node) -> bool:
    t = node.target
    if t in (aten.bmm.default, aten.baddbmm.default):
        return True
    if t is aten.transpose.int:
        return all(d % _val(node).ndim != 0 for d in node.args[1:3])
    if t in (aten.softmax.int, aten._softmax.default):
        return node.args[1] % _val(node).ndim != 0
    if t in _UNARY:
        return sum(_val(a) is not None for a in node.all_input_nodes) == 1
    return False


def _four_d(g: fx.Graph, n: fx.Node, four: dict) -> fx.Node:
    kind_src = _merged_source(n)
    if kind_src is not None:
        kind, src = kind_src
        if kind == "reshape":
            return src
        un = _call(g, aten.unsqueeze.default, (src, 0))  # repeat of [h, ...] b times: expand, not copy
        return _call(g, aten.expand.default, (un, [n.args[1][0]] + [-1] * _val(src).ndim))
    args = [four.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
    t = n.target
    if t is aten.bmm.default:
        return _call(g, aten.matmul.default, tuple(args))
    if t is aten.baddbmm.default:
        beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
        mm = _call(g, aten.matmul.default, (args[1], args[2]))
        last = mm if alpha == 1 else _call(g, aten.mul.Tensor, (mm, alpha))
        bias = args[0] if beta == 1 else _call(g, aten.mul.Tensor, (args[0], beta))
        return _call(g, aten.add.Tensor, (bias, last))
    if t is aten.transpose.int:
        nd = _val(n).ndim
        return _call(g, t, (args[0], args[1] % nd + 1, args[2] % nd + 1))
    if t in (aten.softmax.int, aten._softmax.default):
        nd = _val(n).ndim
        return _call(g, t, (args[0], args[1] % nd + 1, *args[2:]), dict(n.kwargs))
    return _call(g, t, tuple(args), dict(n.kwargs))
