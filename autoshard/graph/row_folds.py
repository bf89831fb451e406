"""Undo a fold of every leading dim into rows around a per-row computation.

Qwen3.5's and Qwen3-Next's gated RMSNorm (and FLA's fused norm in the other linear-attention
hybrids) views the attention output `[b, s, h, d]` and its gate as `[b * s * h, d]` rows,
normalises each row, and views the result back to `[b, s, h * d]` for the output projection.
With heads split over tp the merged rows are no placement DTensor has, so the whole mixer was
replicated. Every op on the rows reads one row (pointwise ops, reductions over the last dim
with `keepdim`), so the same ops on the unmerged values give the same numbers with heads a dim
of their own. An island of row values is rewritten onto its sources only when every op in it
is such an op and every value leaving it leaves through a reshape (which reads the same
row-major order from either form).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autoshard.graph.fx_nodes import call as _call
from autoshard.graph.fx_nodes import tensor_value as _val
from autoshard.graph.islands import folded_islands

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SAME_VALUE = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default)
_ROW_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
_ROW_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._log_softmax.default)
_ASSERTS = (aten._assert_tensor_metadata.default,)


def unflatten_rows(gm: fx.GraphModule) -> bool:
    """Rewrite every island of `[rows, d]` values onto `[*lead, d]` ones (see module doc)."""
    nodes = list(gm.graph.nodes)
    good, lead = folded_islands(
        nodes, lambda n: _rows_lead(n) if _merged_source(n) is not None else None,
        lambda n: [a for a in n.all_input_nodes if _val(a) is not None and _val(a).ndim == 2 and not _broadcast(a)]
        if _row_op(n) else None,
        lambda n, u, lead: u.target in _RESHAPES + _ASSERTS)
    g, unmerged = gm.graph, {}
    sizes = {str(v.node.expr): n for n in nodes if isinstance(v := n.meta.get("val"), torch.SymInt)}
    for n in good:
        with g.inserting_before(n):
            unmerged[n] = _unmerged(g, n, unmerged, sizes)
    for n in good:
        for user in list(n.users):
            if user.target in _ASSERTS:
                g.erase_node(user)
            elif user not in lead:  # a reshape out of the island reads the unmerged value
                with g.inserting_before(user):
                    new = _call(g, aten.reshape.default, (unmerged[n], *user.args[1:]))
                new.meta = dict(user.meta)
                user.replace_all_uses_with(new)
                g.erase_node(user)
    for n in good[::-1]:
        g.erase_node(n)
    return bool(good)


def _merged_source(node: fx.Node):
    """The value that reshape `node` folds to `[rows, d]`: `[*lead, d]` (2 or more lead dims), or
    `[*lead, k * d]` (a gate straight from its projection, its heads still merged in the features)."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return None
    out, src = _val(node), _val(node.args[0])
    if out is None or src is None or out.ndim != 2 or src.ndim < 2 or not isinstance(out.shape[1], int):
        return None
    d, width = out.shape[1], src.shape[-1]
    if not isinstance(width, int) or width % d or src.ndim + (width > d) < 3:
        return None
    return node.args[0] if statically_known_true(out.shape[0] == math.prod(src.shape[:-1]) * (width // d)) else None


def _rows_lead(node: fx.Node) -> tuple:
    """The dims the rows of merge `node` unfold to (its last dim `d` aside)."""
    src, d = _val(node.args[0]), _val(node).shape[1]
    return tuple(src.shape[:-1]) + ((src.shape[-1] // d,) if src.shape[-1] != d else ())


def _broadcast(a: fx.Node) -> bool:
    """An operand every row reads whole: a scalar, a `[d]` weight or a `[1, d]` row."""
    v = _val(a)
    return v.ndim <= 1 or v.ndim == 2 and statically_known_true(v.shape[0] == 1)


def _row_op(node: fx.Node) -> bool:
    out = _val(node)
    if node.op != "call_function" or out is None or out.ndim != 2:
        return False
    t = node.target
    if t in _ROW_REDUCTIONS:
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return keep is True and [d % 2 for d in node.args[1]] == [1] and set(node.kwargs) <= {"keepdim", "dtype"}
    if t in _ROW_SOFTMAX:
        return node.args[1] % 2 == 1
    if t in _SAME_VALUE or torch.Tag.pointwise in getattr(t, "tags", ()):
        return not any(isinstance(v, fx.Node) for v in node.kwargs.values())
    return False


def _unmerged(g: fx.Graph, n: fx.Node, unmerged: dict, sizes: dict) -> fx.Node:
    """`n` on unmerged values; `sizes`: the graph's symbolic sizes (the batch and sequence length
    read off the inputs), which a gate's view to heads is written with: a size read off the
    gate itself would be an op on a split value."""
    src = _merged_source(n)
    if src is not None:
        val, d = _val(src), _val(n).shape[1]
        if val.shape[-1] == d:
            return src
        lead = [s if isinstance(s, int) else sizes.get(str(s.node.expr)) or _call(g, aten.sym_size.int, (src, i))
                for i, s in enumerate(val.shape[:-1])]
        return _call(g, aten.view.default, (src, lead + [val.shape[-1] // d, d]))
    args = [unmerged.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
    if n.target in _ROW_REDUCTIONS:
        args[1] = [-1]
    elif n.target in _ROW_SOFTMAX:
        args[1] = -1
    return _call(g, n.target, tuple(args), dict(n.kwargs))
