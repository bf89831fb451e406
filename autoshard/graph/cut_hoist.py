"""A fused projection's cut moved up to the projection, through the per-channel ops before it.

Qwen3.5's gated delta net runs `in_proj_qkv` channels first through its depthwise causal conv
and SiLU and only then cuts q | k | v; Kimi-Linear and the other linear-attention hybrids
`cat` separately projected q, k, v for that conv and cut them again. Every op between the
projection and the cut reads channel c only for output channel c, so cutting first and running
the ops part by part (the conv's filter cut the same way) gives the same values, with the cut
where the labeler reads fused parts: right after the linear, or cancelled against the `cat`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from autoshard.graph.fx_nodes import tensor_value as _val
from autoshard.graph.grouped import part_sizes

aten = torch.ops.aten
_ASSERTS = (aten._assert_tensor_metadata.default,)
_SAME_VALUE = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default)


def cuts_before_channel_ops(gm: fx.GraphModule) -> bool:
    """Move every cut that reaches a linear's features (or a `cat` of the same parts) through
    the per-channel ops above it; repeated until none moves (a conv's taps are cut one by one
    and merged where they read one padded input)."""
    changed = False
    moved = True
    while moved:
        moved = False
        for node in list(gm.graph.nodes):
            if not getattr(node, "_erased", False) and _is_cut(node) and _reaches_projection(node.args[0], part_sizes(node)[1]):
                moved |= _hoist(gm, node)
        changed |= moved
    return changed


def _is_cut(node: fx.Node) -> bool:
    return node.op == "call_function" and part_sizes(node) is not None and bool(node.users) and \
        all(u.target is operator.getitem for u in node.users)


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in _ASSERTS]


def _reaches_projection(x, dim: int, depth: int = 0) -> bool:
    """Whether some chain of per-channel ops above `x` (split on `dim`) starts at a linear's
    features or at a `cat` on `dim`."""
    if not isinstance(x, fx.Node) or depth > 64 or _val(x) is None:
        return False
    if x.target is aten.linear.default:
        return dim == _val(x).ndim - 1
    if x.target is aten.cat.default:
        return (x.args[1] if len(x.args) > 1 else 0) % _val(x).ndim == dim
    if _part_of_cut(x, dim) is not None:
        return _reaches_projection(x.args[0].args[0], dim, depth + 1)
    return any(_reaches_projection(a, d, depth + 1) for a, d in (_operand_dims(x, dim) or []) if d is not None)


def _part_of_cut(x: fx.Node, dim: int) -> fx.Node | None:
    """The cut on `dim` whose part `x` is (Mamba-2's xBC, itself cut into x | B | C), else None."""
    outer = x.args[0] if x.target is operator.getitem and isinstance(x.args[0], fx.Node) else None
    return outer if outer is not None and _is_cut(outer) and part_sizes(outer)[1] == dim else None


def _operand_dims(node: fx.Node, dim: int) -> list[tuple[object, int | None]] | None:
    """For an op whose output channel on `dim` reads only that channel of its inputs: each
    argument with the dim it is cut on (None: read whole by every part, a broadcast or a
    non-tensor); None if the op mixes channels on `dim`."""
    if node.op != "call_function" or node.kwargs and node.target not in _SAME_VALUE:
        return None
    out, t, args = _val(node), node.target, node.args
    if out is None:
        return None
    n = out.ndim
    if t is aten.transpose.int:
        a, b = (d % n for d in args[1:3])
        return [(args[0], b if dim == a else a if dim == b else dim)] + [(v, None) for v in args[1:]]
    if t is aten.permute.default:
        return [(args[0], list(args[1])[dim] % n), (args[1], None)]
    if t is aten.constant_pad_nd.default:
        padded = {n - 1 - i // 2 for i, p in enumerate(args[1]) if p != 0}
        return None if dim in padded else [(args[0], dim)] + [(v, None) for v in args[1:]]
    if t is aten.slice.Tensor:
        return None if args[1] % n == dim else [(args[0], dim)] + [(v, None) for v in args[1:]]
    if t is aten.select.int:
        d = args[1] % (n + 1)
        return [(args[0], dim if dim < d else dim + 1)] + [(v, None) for v in args[1:]]
    if t is aten.unsqueeze.default:
        d = args[1] % n
        return None if d == dim else [(args[0], dim if dim < d else dim - 1)] + [(v, None) for v in args[1:]]
    if t in _SAME_VALUE or torch.Tag.pointwise in getattr(t, "tags", ()):
        dims = []
        for a in args:
            v = _val(a) if isinstance(a, fx.Node) else None
            if not isinstance(a, fx.Node):
                dims.append((a, None))
            elif v is None:
                return None
            elif dim - (n - v.ndim) < 0 or v.shape[dim - (n - v.ndim)] == 1:
                dims.append((a, None))
            elif v.shape[dim - (n - v.ndim)] == out.shape[dim]:
                dims.append((a, dim - (n - v.ndim)))
            else:
                return None
        return dims
    return None


def _hoist(gm: fx.GraphModule, cut: fx.Node) -> bool:
    """Move `cut` one op up (or cancel it against a `cat`); False if it cannot move."""
    sizes, dim = part_sizes(cut)
    x = cut.args[0]
    users = _users(x)
    if x.op != "call_function" or any(not (_is_cut(u) and part_sizes(u) == (sizes, dim)) for u in users):
        return False
    if len(users) > 1:  # equal cuts of one value (the taps of a conv) become one, right after it
        with gm.graph.inserting_after(x):
            merged = _split(gm, x, sizes, dim)
        for other in users:
            other.replace_all_uses_with(merged)
            gm.graph.erase_node(other)
        cut = merged
    outer = _part_of_cut(x, dim)
    if outer is not None:  # a part cut again: the outer cut into the finer parts
        _refine(gm, outer, x.args[1], cut)
        return True
    if x.target is aten.cat.default:
        parts = list(x.args[0])
        if [_val(p).shape[dim] for p in parts] != list(sizes):
            return False
        _replace_parts(gm, cut, parts)
    else:
        operands = _operand_dims(x, dim)
        if operands is None or x.target is aten.linear.default:
            return False
        with gm.graph.inserting_before(x):
            cut_operands = [_split(gm, a, sizes, d) if d is not None else None for a, d in operands]
            parts = []
            for i in range(len(sizes)):
                args = tuple(a if c is None else _getitem(gm, c, i) for (a, _), c in zip(operands, cut_operands))
                part = gm.graph.call_function(x.target, args, dict(x.kwargs))
                part.meta = {**x.meta, "val": x.target(*[_val(a) if isinstance(a, fx.Node) else a for a in args], **x.kwargs)}
                parts.append(part)
        _replace_parts(gm, cut, parts)
    for a in [u for u in x.users if u.target in _ASSERTS]:
        gm.graph.erase_node(a)
    if not x.users:
        gm.graph.erase_node(x)
    return True


def _refine(gm: fx.GraphModule, outer: fx.Node, i: int, inner: fx.Node) -> None:
    """Replace `outer` (cut into parts) and `inner` (its part i, cut again) by one cut into the
    finer parts."""
    (sizes, dim), (sub, _) = part_sizes(outer), part_sizes(inner)
    with gm.graph.inserting_before(outer):
        cut = _split(gm, outer.args[0], list(sizes[:i]) + list(sub) + list(sizes[i + 1:]), dim)
        parts = [_getitem(gm, cut, j) for j in range(len(sizes) + len(sub) - 1)]
    part = inner.args[0]
    _replace_parts(gm, inner, parts[i:i + len(sub)])
    for a in list(part.users):  # only its metadata asserts read it now
        gm.graph.erase_node(a)
    gm.graph.erase_node(part)
    _replace_parts(gm, outer, parts[:i] + [None] + parts[i + len(sub):])


def _split(gm: fx.GraphModule, x: fx.Node, sizes, dim: int) -> fx.Node:
    node = gm.graph.call_function(aten.split_with_sizes.default, (x, list(sizes), dim))
    node.meta["val"] = _val(x).split(list(sizes), dim)
    return node


def _getitem(gm: fx.GraphModule, cut: fx.Node, i: int) -> fx.Node:
    node = gm.graph.call_function(operator.getitem, (cut, i))
    node.meta["val"] = cut.meta["val"][i]
    return node


def _replace_parts(gm: fx.GraphModule, cut: fx.Node, parts: list[fx.Node]) -> None:
    for g in list(cut.users):
        g.replace_all_uses_with(parts[g.args[1]])
        gm.graph.erase_node(g)
    gm.graph.erase_node(cut)
