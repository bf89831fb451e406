"""Ops rewritten into the forms the labeling pass reads: products with a model weight as
`linear`, a fused projection's parts as a `chunk` or `split_with_sizes` of its last dim. Each
keeps every value."""

from __future__ import annotations

import operator

import torch

from autoshard.graph.fx_nodes import tensor_value as _val

aten = torch.ops.aten


def addmm_as_linear(gm: torch.fx.GraphModule) -> bool:
    """`addmm(b, x, W)` with a model weight `W` stored `[in, out]` (GPT-2's `Conv1D`) as
    `linear(x, W.t(), b)`: the same product, in the form whose weight and feature dims the
    passes know (the transpose runs on the weight's shards). Conv1D's fold of the batch dims
    around it (`view(-1, in)` ... `view(*lead, out)`) goes too: `linear` takes N-d input, and the
    features then stay the last dim all the way (where a fused output is cut into q, k, v)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs:
            continue
        bias, x, w = node.args[:3]
        if len(node.args) > 3 or not (isinstance(w, torch.fx.Node) and w.op == "placeholder"):
            continue  # beta/alpha given, or a product of two activations: left as it is
        wv, bv = w.meta.get("val"), getattr(bias, "meta", {}).get("val")
        if not (isinstance(wv, torch.Tensor) and wv.ndim == 2 and isinstance(bv, torch.Tensor) and bv.ndim == 1):
            continue
        result = node
        unfold = next(iter(node.users)) if len(node.users) == 1 else None
        if _is_view(x) and _is_view(unfold) and _dims(unfold) == _dims(x.args[0])[:-1] + _dims(node)[-1:]:
            x, result = x.args[0], unfold
        with gm.graph.inserting_before(node):
            wt = gm.graph.call_function(aten.t.default, (w,))
            new = gm.graph.call_function(aten.linear.default, (x, wt, bias))
        wt.meta = {**w.meta, "val": wv.t()}
        _replace(gm, node, result, new)
        changed = True
    return changed


_TRANSPOSES = (aten.numpy_T.default, aten.t.default)


def matmul_as_linear(gm: torch.fx.GraphModule) -> bool:
    """`x @ W.T (+ b)` with a 2-D model weight (Falcon's `FalconLinear`, hand-written models) as
    `linear(x, W, b)`, and `x @ W` with `W` stored `[in, out]` as `linear(x, W.t())`: the same
    product in the form whose weight and feature dims the passes know. A bias added right after
    (`+ b`, 1-D, the product's only user) becomes the linear's bias, split with its features."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.matmul.default or node.kwargs:
            continue
        x, w = node.args
        xv, wv = _val(x), _val(w)
        if xv is None or wv is None or wv.ndim != 2 or xv.ndim < 2:
            continue
        if w.op == "call_function" and w.target in _TRANSPOSES and _is_placeholder(w.args[0]):
            weight, drop = w.args[0], w
        elif _is_placeholder(w):
            weight, drop = None, None
        else:
            continue
        result, bias = node, None
        add = next(iter(node.users)) if len(node.users) == 1 else None
        if (add is not None and add.target is aten.add.Tensor and not add.kwargs and len(add.args) == 2
                and add.args[0] is node and _is_placeholder(add.args[1]) and getattr(_val(add.args[1]), "ndim", 0) == 1):
            result, bias = add, add.args[1]
        with gm.graph.inserting_before(node):
            if weight is None:  # stored [in, out]: the transpose runs on the weight's shards
                weight = gm.graph.call_function(aten.t.default, (w,))
                weight.meta = {**w.meta, "val": wv.t()}
            new = gm.graph.call_function(aten.linear.default, (x, weight, bias) if bias is not None else (x, weight))
        _replace(gm, node, result, new)
        if drop is not None and not drop.users:
            gm.graph.erase_node(drop)
        changed = True
    return changed


def view_parts_as_chunk(gm: torch.fx.GraphModule) -> bool:
    """`h.view(*lead, k, -1)` read only as `[..., i, :]` for every i (Moshi's gate|up MLP) as
    `h.chunk(k, -1)`: the same k parts of the last dim, in the form a fused projection's
    part-by-part split is recognised by (each rank then holds a slice of every part)."""
    changed = False
    for node in list(gm.graph.nodes):
        if not _is_view(node) or not isinstance(node.args[0], torch.fx.Node):
            continue
        src, out = _val(node.args[0]), _val(node)
        if src is None or out is None or out.ndim != src.ndim + 1 or _dims(node)[:-2] != _dims(node.args[0])[:-1]:
            continue
        k = out.shape[-2]
        users = list(node.users)
        picks = sorted((u.args[2], u) for u in users if u.target is aten.select.int and u.args[1] % out.ndim == out.ndim - 2
                       and isinstance(u.args[2], int))
        if not isinstance(k, int) or k < 2 or len(picks) != len(users) or [i for i, _ in picks] != list(range(k)):
            continue
        with gm.graph.inserting_before(node):
            chunk = gm.graph.call_function(aten.chunk.default, (node.args[0], k, -1))
            parts = [gm.graph.call_function(operator.getitem, (chunk, i)) for i in range(k)]
        chunk.meta["val"] = src.chunk(k, -1)
        for i, (_, sel) in enumerate(picks):
            parts[i].meta = dict(sel.meta)
            sel.replace_all_uses_with(parts[i])
            gm.graph.erase_node(sel)
        gm.graph.erase_node(node)
        changed = True
    return changed


def slices_as_split(gm: torch.fx.GraphModule) -> bool:
    """A linear's output read only as slices of its last dim that tile it (Phi-3's
    `qkv[..., :q]`, `qkv[..., q:q + kv]`, `qkv[..., q + kv:]`) as `split_with_sizes`: the same
    parts, in the form a fused projection's part-by-part split is recognised by."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default or len(node.users) < 2:
            continue
        val = _val(node)
        width = val.shape[-1] if val is not None else None
        cuts = [(_slice_span(u, val.ndim, width), u) for u in node.users] if isinstance(width, int) else [(None, None)]
        if any(span is None for span, _ in cuts):
            continue
        cuts.sort(key=lambda c: c[0])
        spans = [span for span, _ in cuts]
        if spans[0][0] != 0 or spans[-1][1] != width or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            continue
        sizes = [b - a for a, b in spans]
        with gm.graph.inserting_before(cuts[0][1]):
            split = gm.graph.call_function(aten.split_with_sizes.default, (node, sizes, val.ndim - 1))
            parts = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(sizes))]
        split.meta["val"] = val.split(sizes, -1)
        for part, (_, user) in zip(parts, cuts):
            part.meta = dict(user.meta)
            user.replace_all_uses_with(part)
            gm.graph.erase_node(user)
        changed = True
    return changed


def _slice_span(node: torch.fx.Node, ndim: int, width: int, at: int = -1) -> tuple[int, int] | None:
    """(start, end) of `x[..., start:end]` (step 1, static bounds) on dim `at` of `ndim` dims, else None."""
    if node.op != "call_function" or node.target is not aten.slice.Tensor or node.kwargs:
        return None
    given = list(node.args[1:])
    dim, start, end, step = given + [0, None, None, 1][len(given):]
    start = 0 if start is None else start
    end = width if end is None else end
    if not all(isinstance(v, int) for v in (dim, start, end, step)) or step != 1 or dim % ndim != at % ndim:
        return None
    start, end = max(0, start + width if start < 0 else start), min(width, end + width if end < 0 else end)
    return (start, end) if start < end else None


def chunk_before_transpose(gm: torch.fx.GraphModule) -> bool:
    """`h.transpose(-1, -2).chunk(k, -2)` (LFM2's short conv: in_proj's B, C, x read channels
    first) as `[c.transpose(-1, -2) for c in h.chunk(k, -1)]`: the same parts, cut where the
    projection's fused features are the last dim."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.chunk.default or len(node.args) < 3:
            continue
        t = node.args[0]
        if not (isinstance(t, torch.fx.Node) and t.target is aten.transpose.int and _val(t) is not None):
            continue
        nd = _val(t).ndim
        a, b, d = (x % nd for x in (t.args[1], t.args[2], node.args[2]))
        if a == b or d not in (a, b) or any(u.target is not operator.getitem for u in node.users):
            continue
        h = t.args[0]
        with gm.graph.inserting_before(node):
            chunk = gm.graph.call_function(aten.chunk.default, (h, node.args[1], b if d == a else a))
        chunk.meta["val"] = _val(h).chunk(node.args[1], b if d == a else a)
        for user in list(node.users):
            _part_then(gm, chunk, user.args[1], user, aten.transpose.int, t.args[1], t.args[2])
        gm.graph.erase_node(node)
        changed = True
    return changed


def heads_picked_as_split(gm: torch.fx.GraphModule, constants: dict | None = None) -> bool:
    """`h.view(*lead, H, D)` of a linear's output read only as ranges of its H heads that tile them
    — `[..., a:b, :]`, or `[..., [i], :]` with a constant index (Falcon's multi-query
    `query_key_value`: the query heads, then one K and one V head) — as `split_with_sizes` of `h`
    into those ranges, each viewed `[*lead, n, D]`: the same values, cut where the fused features
    are the last dim. `constants`: placeholder name -> value of the graph's lifted constants."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (_is_view(node) and isinstance(node.args[0], torch.fx.Node) and node.args[0].target is aten.linear.default):
            continue
        h, out = _val(node.args[0]), _val(node)
        if h is None or out is None or out.ndim != h.ndim + 1 or _dims(node)[:-2] != _dims(node.args[0])[:-1]:
            continue
        heads, d = out.shape[-2], out.shape[-1]
        if not (isinstance(heads, int) and isinstance(d, int)):
            continue
        picks = [(_heads_span(u, out.ndim, heads, constants or {}), u) for u in node.users]
        if not picks or any(span is None for span, _ in picks):
            continue
        picks.sort(key=lambda c: c[0])
        spans = [span for span, _ in picks]
        if spans[0][0] != 0 or spans[-1][1] != heads or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            continue
        sizes, lead = [(b - a) * d for a, b in spans], list(node.args[1])[:-2]
        with gm.graph.inserting_before(node):
            split = gm.graph.call_function(aten.split_with_sizes.default, (node.args[0], sizes, h.ndim - 1))
        split.meta["val"] = h.split(sizes, -1)
        for i, ((a, b), user) in enumerate(picks):
            _part_then(gm, split, i, user, aten.view.default, lead + [b - a, d])
        gm.graph.erase_node(node)
        changed = True
    return changed


def _heads_span(node: torch.fx.Node, ndim: int, heads: int, constants: dict) -> tuple[int, int] | None:
    """The heads `node` reads of a `[..., H, D]` value: a slice of dim -2, or an `index` there by
    one constant head (`[..., [-2], :]`)."""
    if node.target is aten.slice.Tensor:
        return _slice_span(node, ndim, heads, at=-2)
    if node.target is not aten.index.Tensor or len(node.args) != 2 or node.kwargs:
        return None
    idx = list(node.args[1])
    if len(idx) != ndim - 1 or any(i is not None for i in idx[:-1]):
        return None
    c = idx[-1]
    if isinstance(c, torch.fx.Node) and c.target is aten.lift_fresh_copy.default:
        c = c.args[0]
    value = constants.get(c.name) if isinstance(c, torch.fx.Node) else None
    if not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()):
        return None
    head = int(value.reshape(())) % heads
    return head, head + 1


_CUTS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


def parts_before_unsqueeze(gm: torch.fx.GraphModule) -> bool:
    """`h.unsqueeze(d).split(sizes, dim)` (GPT-BigCode's multi-query `c_attn`: q | k | v cut after
    an unsqueeze) as `[p.unsqueeze(d) for p in h.split(sizes, dim')]`: the same parts, cut where
    the projection's fused features are the last dim."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CUTS or len(node.args) < 3 or not isinstance(node.args[2], int):
            continue
        u = node.args[0]
        if not (isinstance(u, torch.fx.Node) and u.target is aten.unsqueeze.default and len(u.users) == 1 and _val(u) is not None):
            continue
        nd = _val(u).ndim
        d, dim = u.args[1] % nd, node.args[2] % nd
        if d == dim or any(user.target is not operator.getitem for user in node.users):
            continue
        h, inner = u.args[0], dim if dim < d else dim - 1
        with gm.graph.inserting_before(node):
            cut = gm.graph.call_function(node.target, (h, node.args[1], inner))
        cut.meta["val"] = node.target(_val(h), node.args[1], inner)
        for user in list(node.users):
            _part_then(gm, cut, user.args[1], user, aten.unsqueeze.default, d)
        gm.graph.erase_node(node)
        gm.graph.erase_node(u)
        changed = True
    return changed


def contiguous_linear_inputs(gm: torch.fx.GraphModule) -> bool:
    """A linear of a non-contiguous N-d input (RecurrentGemma's and Mamba's out_proj after a
    channels-first conv, transposed back) reads a contiguous copy: eager `linear` makes the same
    copy to fold the batch dims, but DTensor folds its local shard with a `view`, which fails."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x = node.args[0]
        xv = _val(x)
        if xv is None or xv.ndim < 3 or xv.is_contiguous():
            continue
        with gm.graph.inserting_before(node):
            c = gm.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        c.meta = {**x.meta, "val": xv.clone(memory_format=torch.contiguous_format)}
        node.replace_input_with(x, c)
        changed = True
    return changed


def same_value_casts_dropped(gm: torch.fx.GraphModule) -> bool:
    """`x.to(device)` / `x.to(dtype=, layout=, device=)` that changes nothing returns `x` itself;
    DTensor has no rule for those overloads (Gemma3n's AltUp, RecurrentGemma's RG-LRU), so the
    graph reads `x` directly."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.to.device, aten.to.dtype_layout):
            continue
        x, out = node.args[0], _val(node)
        xv = _val(x)
        if xv is None or out is None or (xv.dtype, xv.device, xv.layout) != (out.dtype, out.device, out.layout):
            continue
        if node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (None, torch.preserve_format) or \
                (node.target is aten.to.device and len(node.args) > 3 and node.args[3]):
            continue
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _part_then(gm: torch.fx.GraphModule, cut: torch.fx.Node, i: int, user: torch.fx.Node, op, *args) -> None:
    """`user` (which read a part the old way) becomes `op(cut[i], *args)`: part i of the new cut,
    then the op that leaves it in the shape `user` had."""
    with gm.graph.inserting_before(user):
        part = gm.graph.call_function(operator.getitem, (cut, i))
        new = gm.graph.call_function(op, (part, *args))
    part.meta["val"] = cut.meta["val"][i]
    new.meta = dict(user.meta)
    user.replace_all_uses_with(new)
    gm.graph.erase_node(user)


def _replace(gm: torch.fx.GraphModule, node: torch.fx.Node, result: torch.fx.Node, new: torch.fx.Node) -> None:
    """`new` (a linear) takes the place of `result`: the product `node`, or the op after it that
    the linear absorbed (an unfold view, a bias add); both go."""
    new.meta = dict(result.meta)
    result.replace_all_uses_with(new)
    if result is not node:
        gm.graph.erase_node(result)
    gm.graph.erase_node(node)


def _is_placeholder(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


def _is_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default)


def _dims(node: torch.fx.Node) -> list[str]:
    return [str(d) for d in node.meta["val"].shape]
