"""Graph clean-ups right after capture: rewrite what export recorded into the same computation
in a form the sharding passes can place. Each keeps every value the graph computes."""

from __future__ import annotations

import operator

import torch

from autoshard.graph.cut_hoist import cuts_before_channel_ops
from autoshard.graph.depthwise_conv import depthwise_conv_as_taps
from autoshard.graph.einsum_forms import einsum_as_matmul
from autoshard.graph.head_folds import unfold_batch_heads, zero_started_baddbmm_as_bmm
from autoshard.graph.row_folds import unflatten_rows
from autoshard.graph.statistics import spreads_as_means
from autoshard.graph.linear_forms import (addmm_as_linear, chunk_before_transpose, contiguous_linear_inputs, matmul_as_linear,
                                          heads_picked_as_split, parts_before_unsqueeze, same_value_casts_dropped,
                                          slices_as_split, view_parts_as_chunk)

__all__ = ["simplify", "addmm_as_linear", "matmul_as_linear", "view_parts_as_chunk", "chunk_before_transpose",
           "slices_as_split", "heads_picked_as_split", "parts_before_unsqueeze", "unfold_batch_heads", "depthwise_conv_as_taps", "contiguous_linear_inputs", "same_value_casts_dropped",
           "spreads_as_means", "cuts_before_channel_ops", "einsum_as_matmul", "zero_started_baddbmm_as_bmm", "unflatten_rows",
           "batched_triangles_as_masks"]

aten = torch.ops.aten


def simplify(gm: torch.fx.GraphModule, constants: dict | None = None) -> None:
    """`constants`: placeholder name -> value of the lifted tensor constants (an index a rewrite reads)."""
    changed = inline_no_grad_regions(gm)
    changed |= drop_self_copies(gm)
    changed |= drop_empty_cat_inputs(gm)
    changed |= log_sigmoid_as_softplus(gm)
    changed |= out_of_place_updates(gm)
    changed |= addmm_as_linear(gm)
    changed |= matmul_as_linear(gm)
    changed |= zero_started_baddbmm_as_bmm(gm)
    changed |= unfold_batch_heads(gm)
    changed |= unflatten_rows(gm)
    changed |= view_parts_as_chunk(gm)
    changed |= slices_as_split(gm)
    changed |= heads_picked_as_split(gm, constants)
    changed |= parts_before_unsqueeze(gm)
    changed |= chunk_before_transpose(gm)
    changed |= depthwise_conv_as_taps(gm)
    changed |= cuts_before_channel_ops(gm)
    changed |= batched_triangles_as_masks(gm)
    changed |= einsum_as_matmul(gm)
    changed |= same_value_casts_dropped(gm)
    changed |= contiguous_linear_inputs(gm)
    changed |= spreads_as_means(gm)
    changed |= slice_fills_as_cat(gm)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


_VALUE_PRESERVING = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device, torch.ops.aten._to_copy.default,
                     torch.ops.aten.alias.default, torch.ops.aten.detach.default, torch.ops.aten.clone.default,
                     torch.ops.aten.contiguous.default}


def drop_self_copies(gm: torch.fx.GraphModule) -> bool:
    """Erase `copy_(state, f(state))` where `f` keeps every value (a `.to()` to the dtype and
    device the tensor already has): a model's `self.freqs_cis = self.freqs_cis.to(h.device)` is
    captured as a buffer write of the buffer's own values — a no-op that would bump the version
    of a tensor autograd saved."""
    erased = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.copy_.default or node.users:
            continue
        dst, src = node.args[:2]
        dst_val = dst.meta.get("val")
        while isinstance(src, torch.fx.Node) and src is not dst and src.op == "call_function" and src.target in _VALUE_PRESERVING:
            val = src.meta.get("val")
            if not isinstance(val, torch.Tensor) or not isinstance(dst_val, torch.Tensor) or val.dtype != dst_val.dtype:
                break
            src = src.args[0]
        if src is dst:
            gm.graph.erase_node(node)
            erased = True
    return erased


def drop_empty_cat_inputs(gm: torch.fx.GraphModule) -> bool:
    """`torch.cat` skips 1-D empty tensors whatever the other operands' rank (a legacy rule): a
    cache that starts as `torch.tensor([])` (XLM's, built even with `use_cache=False`) is captured
    as `cat([empty, k])`. DTensor has no such rule and would try to shard the empty tensor like
    `k`; without the operand the op computes the same and places like `k`."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        tensors = node.args[0]
        keep = [t for t in tensors if not _legacy_empty(t)]
        if keep and len(keep) < len(tensors):
            node.args = (keep, *node.args[1:])
            changed = True
    return changed


def _legacy_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.ndim == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0


def inline_no_grad_regions(gm: torch.fx.GraphModule) -> bool:
    """Inline `with torch.no_grad():` bodies (export's `wrap_with_set_grad_enabled(False, ...)`)
    into the graph, detaching what they return: the same values, and no gradient flows through
    them, as before. Left wrapped, a body fed a sharded parameter (Marian's sinusoidal position
    table) would be one opaque op the placement passes cannot see into."""
    changed = False
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.higher_order.wrap_with_set_grad_enabled
                and node.args[0] is False and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr"):
            continue
        body = getattr(gm, node.args[1].target)
        if any(n.op == "get_attr" for n in body.graph.nodes):
            continue  # constants of its own: leave the region as it is
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            out = graph.graph_copy(body.graph, dict(zip(inputs, node.args[2:])))
            operands = {a for a in node.args[2:] if isinstance(a, torch.fx.Node)}
            results = [r if _returns_self(r, operands) else _detached(graph, r) for r in (out if isinstance(out, (tuple, list)) else (out,))]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(results[0] if not isinstance(out, (tuple, list)) else tuple(results))
        graph.erase_node(node)
        changed = True
    if changed:
        gm.delete_all_unused_submodules()
    return changed


_RETURN_SELF = {aten.to.dtype, aten.to.dtype_layout, aten.to.device}


def _returns_self(value, inputs: set) -> bool:
    """Is `value` (an inlined body node) the very tensor of one of the region's operands?"""
    while isinstance(value, torch.fx.Node) and value not in inputs:
        if value.op != "call_function" or value.target not in _RETURN_SELF:
            return False
        src = value.args[0]
        a, b = value.meta.get("val"), getattr(src, "meta", {}).get("val")
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device):
            return False
        value = src
    return isinstance(value, torch.fx.Node)


def _detached(graph: torch.fx.Graph, value):
    if not isinstance(value, torch.fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
        return value
    new = graph.call_function(aten.detach.default, (value,))
    new.meta = {**value.meta, "val": value.meta["val"].detach()}
    return new


def log_sigmoid_as_softplus(gm: torch.fx.GraphModule) -> bool:
    """`log_sigmoid(x)` as `-softplus(-x)`: DTensor has no rule for its backward (whose CPU kernel
    takes a buffer the forward fills), and the two agree to float rounding, with the same
    derivative `sigmoid(-x)` everywhere."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.log_sigmoid.default:
            with gm.graph.inserting_before(node):
                neg = gm.graph.call_function(aten.neg.default, (node.args[0],))
                soft = gm.graph.call_function(aten.softplus.default, (neg,))
                out = gm.graph.call_function(aten.neg.default, (soft,))
            for n in (neg, soft, out):
                n.meta = dict(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            changed = True
    return changed


def slice_fills_as_cat(gm: torch.fx.GraphModule) -> bool:
    """`e = x.new_empty(shape); e[..., :a].copy_(u); e[..., a:].copy_(w)` (DeepSeek's MLA key:
    per-head nope part next to the rope part shared by all heads) as `cat([u, w], -1)`: the same
    tensor, made by one op whose placement DTensor knows (heads split alike), where writes into
    a fresh whole buffer would gather the heads. Only where the copies fill the buffer exactly,
    in order, with values of its shape and dtype, and nothing reads it before the last one."""
    changed = False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.new_empty.default, aten.empty.memory_format):
            continue
        val = node.meta.get("val")
        fills = _fills(node, val)
        if fills is None:
            continue
        last = max(order[c] for _, c, _ in fills)
        readers = [u for u in node.users if u.target is not aten.slice.Tensor]
        if any(order[u] < last for u in readers) or not readers:
            continue
        copies = [c for _, c, _ in fills]
        with gm.graph.inserting_after(max(copies, key=order.__getitem__)):
            cat = gm.graph.call_function(aten.cat.default, ([src for _, _, src in fills], val.ndim - 1))
        cat.meta = dict(node.meta)
        for u in readers:
            u.replace_input_with(node, cat)
        for sl, c, _ in fills:
            gm.graph.erase_node(c)
            gm.graph.erase_node(sl)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _fills(buffer, val):
    """[(slice, copy_, source)] in order when every slice of `buffer` (last dim) is copied into once,
    back to back from 0 to its width with sources of the slices' shapes and its dtype; else None."""
    if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
        return None
    fills = []
    for sl in (u for u in buffer.users if u.target is aten.slice.Tensor):
        dim, start, end = (list(sl.args[1:]) + [0, None, None])[:3]
        users = list(sl.users)
        if dim % val.ndim != val.ndim - 1 or len(users) != 1 or users[0].target is not aten.copy_.default or users[0].users:
            return None
        src = users[0].args[1]
        sv = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if users[0].args[0] is not sl or not isinstance(sv, torch.Tensor) or sv.dtype != val.dtype or _dims(src) != _dims(sl):
            return None
        fills.append((start, min(end, val.shape[-1]), sl, users[0], src))
    fills.sort(key=lambda f: f[0])
    edges = [0] + [e for _, e, *_ in fills]
    if not fills or any(f[0] != e for f, e in zip(fills, edges)) or edges[-1] != val.shape[-1]:
        return None
    return [(sl, c, src) for _, _, sl, c, src in fills]


def _is_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default)


def _dims(node: torch.fx.Node) -> list[str]:
    return [str(d) for d in node.meta["val"].shape]


def out_of_place_updates(gm: torch.fx.GraphModule) -> bool:
    """`x += y` on a tensor the graph made (Gemma3n's AltUp `corrected += predictions`) as
    `x = x + y`: DTensor runs an in-place op only where the result keeps `x`'s placement, and
    `y` may be partial or sharded otherwise. Done only where nothing reads `x`'s storage
    afterwards through another alias (its base, or another view of it), so the values agree."""
    changed = False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        pure = _out_of_place(node)
        if pure is None:
            continue
        target = node.args[0]
        root = view_root(target)
        if root.op != "call_function":
            continue  # model state or an input: a real write, left to the rewrite's checks
        aliases = _aliases(root)
        if any(order[u] > order[node] for a in aliases if a is not target for u in a.users):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(pure, node.args, dict(node.kwargs))
        new.meta = dict(node.meta)
        for user in [u for u in target.users if order.get(u, -1) > order[node]]:
            user.replace_input_with(target, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _out_of_place(node):
    """The functional overload of an in-place aten op (`add_.Tensor` -> `add.Tensor`), if any."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    schema = node.target._schema
    name = node.target._opname
    if not name.endswith("_") or name.startswith("_") or not schema.arguments:
        return None
    first = schema.arguments[0].alias_info
    if first is None or not first.is_write or not isinstance(node.args[0], torch.fx.Node):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


def batched_triangles_as_masks(gm: torch.fx.GraphModule) -> bool:
    """`tril(x, k)` / `triu(x, k)` of a batch of matrices (the gated delta rule's per-head chunk
    attention) as `x.masked_fill(mask, 0)` with the 2-D mask of the entries they zero: the same
    values, but a pointwise op that runs on head shards, where DTensor runs `tril` only whole."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.tril.default, aten.triu.default) or node.kwargs:
            continue
        x, k = node.args[0], node.args[1] if len(node.args) > 1 else 0
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(xv, torch.Tensor) or xv.ndim < 3 or not isinstance(k, int):
            continue
        shape = [d if isinstance(d, int) else d.node.maybe_as_int() for d in xv.shape[-2:]]
        if None in shape:
            continue
        zeroed, at = (aten.triu.default, k + 1) if node.target is aten.tril.default else (aten.tril.default, k - 1)
        with gm.graph.inserting_before(node):
            ones = gm.graph.call_function(aten.new_ones.default, (x, shape), {"dtype": torch.bool})
            mask = gm.graph.call_function(zeroed, (ones, at))
            new = gm.graph.call_function(aten.masked_fill.Scalar, (x, mask, 0))
        ones.meta["val"] = xv.new_ones(shape, dtype=torch.bool)
        mask.meta["val"] = zeroed(ones.meta["val"], at)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return changed


def is_view(node: torch.fx.Node) -> bool:
    """Does the op return a view of its first argument (`permute`, `view`, `slice`, ...)?"""
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.arguments and schema.arguments[0].alias_info is not None
                and not schema.arguments[0].alias_info.is_write and schema.returns and schema.returns[0].alias_info is not None)


def view_root(value):
    """The tensor `value` is a view of, through any chain of view ops (itself if none)."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function" and is_view(value):
        value = value.args[0]
    return value


def _aliases(root: torch.fx.Node) -> list:
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(u for u in n.users if u.op == "call_function" and is_view(u) and u.args and u.args[0] is n)
    return out
