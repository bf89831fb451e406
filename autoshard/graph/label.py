"""Pass 3 — label: find the regions that can run sharded, from dataflow alone.

A *column group* is a set of linears (parameter weights) that read the same activation. Starting
from their outputs sharded on the feature dim (weights `Shard(0)`), the region grows through the
graph in topological order; each node joins only if DTensor's sharding propagation runs it on the
shards with no communication. Growth stops at
- a linear reading the sharded features: a *row* linear (weight `Shard(1)`, output `Partial`),
- the loss on vocab-sharded logits (loss parallel), or a graph output (gathered at the end).
Anything else that would need communication makes the candidate illegal, with the node and the
reason recorded. A group that fails as a whole is retried linear by linear: that is how attention
whose K/V projections cannot be split keeps Q sharded and K/V replicated.

Embedding tables are vocab-parallel (`Shard(0)`, masked partial output) when the propagator agrees.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.graph.analyse import ASSERT_OPS, GraphAnalysis, Role
from autoshard.graph.grouped import fused_chunk, part_sizes
from autoshard.graph.experts import ExpertBlock, analysis_expert_blocks
from autoshard.graph.simulate import PlacementSimulator, Simulation
from autoshard.schema.fused_parts import StridedParts
from autoshard.schema.units import chunk_block

REPLICATE = Replicate()


@dataclass
class Candidate:
    """A region that may run sharded, and whether it can."""

    kind: str                          # "column_row" | "column_output" | "embedding"
    column_nodes: list[str]            # linear (or embedding) node names
    inputs: list[str]                  # activations the column nodes read (must be replicated)
    row_nodes: list[str] = field(default_factory=list)  # row linear node names
    nodes: set[str] = field(default_factory=set)   # interior nodes running on shards
    outputs: list[str] = field(default_factory=list)  # interior nodes returned by the graph
    loss_nodes: list[str] = field(default_factory=list)
    reduces: list[str] = field(default_factory=list)  # interior statistics (one per token) all-reduced
    gathers: list[str] = field(default_factory=list)  # fused parts made whole inside (K/V of a fused qkv, too few heads)
    failed_at: str | None = None       # the node that would need communication (an illegal candidate)
    legal: bool = True
    reason: str = ""
    placements: dict[str, Placement] = field(default_factory=dict)  # parameter FQN -> placement in the region
    expert_block: ExpertBlock | None = None   # an MoE region expert parallel can also run (`graph/experts.py`)


@dataclass
class Labels:
    analysis: GraphAnalysis
    candidates: list[Candidate]

    def legal(self) -> list[Candidate]:
        return [c for c in self.candidates if c.legal]


def label(analysis: GraphAnalysis, simulator: PlacementSimulator) -> Labels:
    order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    candidates: list[Candidate] = []
    rows: set[str] = set()

    groups: dict[str, list[fx.Node]] = {}
    for lin in analysis.linears():
        groups.setdefault(lin.args[0].name, []).append(lin)
    failed = []
    for x_name in sorted(groups, key=order.__getitem__):
        group = [n for n in groups[x_name] if n.name not in rows]
        if not group:
            continue
        found = _label_group(analysis, simulator, order, group, stats=False)
        candidates.extend(found)
        rows.update(r for c in found if c.legal for r in c.row_nodes)
        if not found[0].legal:
            failed.append(group)
    # Second, a group that failed may shard with a norm over its sharded width reducing its
    # statistic (OLMo-2's q/k norm), unless that would make a row of a linear that is itself a
    # column elsewhere (MLA's q_b_proj: heads split beats a low-rank q_a_proj split with q_b as row)
    # (a linear that `_join_at_attention` will make a column counts: MLA's kv_b_proj, cut off at
    # the attention q_b_proj's region shards, is not to become the row of a split kv_a_proj)
    at = _attention_regions(analysis, candidates)
    starts = {n for c in candidates if c.legal or c.failed_at in at for n in c.column_nodes}
    for group in failed:
        group = [n for n in group if n.name not in rows]
        if not group:  # all of it became rows of a region found in this pass
            continue
        singles = [c for c in candidates if c.legal and set(c.column_nodes) <= {n.name for n in group}]
        if singles:  # some linears shard alone (Gemma3n's up_proj): only the whole group with a statistic replaces them
            whole = _grow(analysis, simulator, order, group, stats=True)
            found = [whole] if whole.legal and (whole.reduces or whole.gathers) else []
        else:
            found = [c for c in _label_group(analysis, simulator, order, group, stats=True) if c.legal and (c.reduces or c.gathers)]
        found = [c for c in found if not set(c.row_nodes) & starts]
        if found and singles:
            for c in singles:
                candidates.remove(c)
                rows.difference_update(c.row_nodes)
        candidates.extend(found)
        rows.update(r for c in found for r in c.row_nodes)
    _join_at_attention(analysis, simulator, order, candidates)
    blocks = analysis_expert_blocks(analysis)
    for c in candidates:
        if c.legal and c.kind == "column_row" and isinstance(blocks.get(c.column_nodes[0]), ExpertBlock):
            c.expert_block = blocks[c.column_nodes[0]]
    candidates.sort(key=lambda c: min(order[n] for n in c.column_nodes))  # layer by layer, as the graph runs
    candidates.extend(_embedding_candidate(analysis, simulator, n) for n in analysis.of_role(Role.EMBEDDING))
    return Labels(analysis, candidates)


def _join_at_attention(analysis, simulator, order, candidates: list[Candidate]) -> None:
    """Linears with different inputs whose outputs meet in one attention (MLA: q from q_b_proj, k
    and v from kv_b_proj, each behind its own low-rank norm) shard as one region: a column group
    whose K/V would be gathered at an attention another region shards is grown together with it."""
    at = _attention_regions(analysis, candidates)
    for b in [c for c in candidates if not c.legal and c.failed_at in at]:
        a = at[b.failed_at]
        if a not in candidates or set(b.column_nodes) & set(a.column_nodes):
            continue
        group = [analysis.nodes[n] for n in a.column_nodes + b.column_nodes]
        joined = _grow(analysis, simulator, order, group, stats=bool(a.reduces))
        if joined.legal:
            candidates[candidates.index(a)] = joined
            at.update({n: joined for n, c in at.items() if c is a})


def _attention_regions(analysis: GraphAnalysis, candidates: list[Candidate]) -> dict[str, Candidate]:
    """Each attention node a legal column-row region shards -> that region."""
    return {n: c for c in candidates if c.legal and c.kind == "column_row" for n in c.nodes if analysis.roles[n] is Role.ATTENTION}


def _label_group(analysis, simulator, order, group: list[fx.Node], stats: bool) -> list[Candidate]:
    """A column group's candidate; if it fails as a whole, also each linear alone."""
    tried = _grow(analysis, simulator, order, group, stats)
    if tried.legal or len(group) == 1:
        return [tried]
    singles = [_grow(analysis, simulator, order, [lin], stats) for lin in group]
    tried.reason = f"{tried.reason}; split per linear: {sum(c.legal for c in singles)} of {len(group)} legal alone"
    return [tried] + singles


def _grow(analysis: GraphAnalysis, sim: PlacementSimulator, order: dict[str, int], group: list[fx.Node], stats: bool = False,
          gathered: frozenset[str] = frozenset()) -> Candidate:
    """Grow a column group's region; with `stats`, a norm's statistic over the sharded width is
    reduced inside it and a fused part whose heads tp cannot split (the K/V of a fused qkv) is
    gathered where it is cut off (`gathered`, found by growing again)."""
    cand = Candidate(kind="column_row", column_nodes=[n.name for n in group], inputs=sorted({n.args[0].name for n in group}))
    params = {}
    for lin in group:
        w, bias = analysis.weight(lin), analysis.bias_of(lin)
        packed = packed_parts(lin, direct=not analysis.weight_views(lin))
        params[w.fqn] = _column(w.out_dim, packed)
        if bias:
            params[bias] = _column(0, packed)
    region: set[str] = set()
    heap = [(order[n.name], n.name) for n in group]
    heapq.heapify(heap)
    seen = {n.name for n in group}
    result = Simulation()
    while heap:
        _, name = heapq.heappop(heap)
        node = analysis.nodes[name]
        role = analysis.roles[name]
        if role is Role.OUTPUT:
            cand.outputs.extend(n.name for n in node.all_input_nodes if n.name in region)
            continue
        is_row = role is Role.LINEAR and name not in cand.column_nodes
        if is_row:
            if node.args[0].name not in region:
                return _illegal(cand, f"{name} reads a sharded value as its weight or bias")
            w = analysis.weight(node)
            params[w.fqn] = Shard(w.in_dim)
        region.add(name)
        if role is Role.LINEAR:  # its weight's transposes run on the weight's shards too
            for view in analysis.weight_views(node):
                region.add(view.name)
                sim.step(result, view, params, nodes=region)
        before = len(result.redistributions)
        spec = sim.step(result, node, params, boundaries={name: REPLICATE} if name in gathered else None, nodes=region)
        if name in gathered:
            cand.gathers.append(name)
            before = len(result.redistributions)
        moved = [r for r in result.redistributions[before:] if r.collective]
        failed = result.unsupported.get(name)
        culprit = moved[0].source if moved else node.args[0].name if failed and node.args and isinstance(node.args[0], fx.Node) else None
        part = _fused_part_behind(analysis, result, culprit, region) if culprit and stats else None
        if part is not None and part not in gathered:
            return _grow(analysis, sim, order, group, stats, gathered | {part})
        if failed:
            return _illegal(cand, f"{name} ({node.target}): {failed}")
        if moved:
            r = moved[0]
            cand.failed_at = name
            return _illegal(cand, f"{name} ({node.target}) would need {r.collective} of {r.source} ({r.src} -> {r.dst})")
        if is_row:
            if not (isinstance(spec, DTensorSpec) and spec.placements[0].is_partial()):
                return _illegal(cand, f"{name} does not reduce the sharded features")
            cand.row_nodes.append(name)
            continue
        if role is Role.LOSS:
            cand.loss_nodes.append(name)
        if isinstance(spec, DTensorSpec) and spec.placements[0].is_partial():
            if not (stats and _per_token_statistic(analysis, node, result, sim.mesh.size(), region, set(cand.column_nodes))):
                # a product over a fused part's features that all heads share (Mamba-2's B and C
                # of one group): that part gathered whole
                parts = [_fused_part_behind(analysis, result, a.name, region) for a in node.all_input_nodes] if stats else []
                part = next((p for p in parts if p is not None and p not in gathered), None)
                if part is not None:
                    return _grow(analysis, sim, order, group, stats, gathered | {part})
                return _illegal(cand, f"{name} ({node.target}) produces a partial sum outside a row linear")
            # an RMSNorm over the sharded width: its mean square, one value per token, is reduced
            # across tp (a planned all-reduce) and the normalisation stays on the shards
            cand.reduces.append(name)
            sim.step(result, node, params, boundaries={name: REPLICATE}, nodes=region)
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            continue  # a size read off a sharded value: its users read the size, not the shards
        for user in node.users:
            if user.name not in seen and analysis.roles[user.name] is not Role.ASSERT:
                seen.add(user.name)
                heapq.heappush(heap, (order[user.name], user.name))
    cand.nodes = region - set(cand.row_nodes)
    cand.placements = dict(params)
    if not cand.row_nodes:
        cand.kind = "column_output"
        if not cand.outputs and not cand.loss_nodes:
            return _illegal(cand, "the sharded features never reach a row linear, a loss or an output")
    cand.reason = _why(cand, result)
    return cand


_SHAPE_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
              torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.slice.Tensor,
              torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default}


_CHANNEL_OPS = {torch.ops.aten.repeat_interleave.self_int, torch.ops.aten.constant_pad_nd.default, torch.ops.aten.pad.default,
                torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def _keeps_channels(node: fx.Node) -> bool:
    """A shape op, or one whose first operand's channels each feed their own output (a cast, a
    pad, a repeat, a pointwise op: a depthwise conv's taps and activation)."""
    return node.target in _SHAPE_OPS or node.target in _CHANNEL_OPS or torch.Tag.pointwise in getattr(node.target, "tags", ())


def _fused_part_behind(analysis: GraphAnalysis, sim: Simulation, name: str, region: set[str]) -> str | None:
    """The part of a fused output (a piece of a cut laid out part by part) that `name` is, or is
    reshaped from inside the region, else None: the value to gather when its heads cannot split."""
    node = analysis.nodes.get(name)
    while node is not None and node.name in region:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].args:
            cut = node.args[0]
            return node.name if fused_chunk(cut, sim.specs.get(cut.args[0].name)) else None
        if not _keeps_channels(node) or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _per_token_statistic(analysis: GraphAnalysis, node: fx.Node, sim: Simulation, tp: int, region: set[str], columns: set[str]) -> bool:
    """A mean over the sharded last dim, kept as a size-1 dim, of a width tp divides (the local
    means of equal shards average to the global one): an RMSNorm's mean square over all heads at
    once (OLMo-2's q/k norm, BitNet's norm of the attention output). Only of values the region
    computes from its column outputs, tables and masks: not of a column output added to the
    residual stream, which would shard the stream on its features."""
    if node.target is not torch.ops.aten.mean.dim or not isinstance(node.args[0], fx.Node):
        return False
    src = sim.specs.get(node.args[0].name)
    if not isinstance(src, DTensorSpec) or not src.placements[0].is_shard():
        return False
    ndim, dims = len(src.tensor_meta.shape), node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    width = src.tensor_meta.shape[-1]
    shape_ok = (keepdim and [d % ndim for d in dims] == [ndim - 1] and src.placements[0].dim % ndim == ndim - 1
                and width % tp == 0)
    # the dataflow walk (graph ancestors) last: only for a mean that is otherwise a statistic
    return bool(shape_ok) and not _reads_outside_activation(analysis, node.args[0], region, columns)


def _reads_outside_activation(analysis: GraphAnalysis, start: fx.Node, region: set[str], columns: set[str]) -> bool:
    """Does `start` depend, inside the region and short of its column linears, on a value from
    outside that is itself computed from parameters and inputs (an activation: not a rotary
    table or mask, nor a function of parameters alone)?"""
    seen, todo = set(), [start]
    while todo:
        x = todo.pop()
        if x.name in seen or x.name in columns:
            continue
        seen.add(x.name)
        for a in x.all_input_nodes:
            if a.name in region:
                todo.append(a)
            elif analysis.roles[a.name] is not Role.PARAM:
                roles = {analysis.roles[n] for n in nx.ancestors(analysis.dag, a.name)}
                if Role.PARAM in roles and Role.INPUT in roles:  # not a value of parameters alone (Mamba's A = -exp(A_log))
                    return True
    return False


def _column(dim: int, packed: tuple[int, ...]) -> Placement:
    """A column weight's placement: its output features split, each of its `packed` parts (gate |
    up or q | k | v, fused in one weight) split on its own so every rank holds a slice of each."""
    if len(packed) < 2:
        return Shard(dim)
    if len(set(packed)) == 1:
        return _StridedShard(dim, split_factor=len(packed))
    return StridedParts(dim, packed)


_SAME_VALUE_OPS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default}


def packed_parts(linear: fx.Node, direct: bool = True) -> tuple[int, ...]:
    """The part widths when the linear's output is only ever cut into parts on the feature dim (a
    fused gate|up or q|k|v projection read part by part: `chunk`, `split`, `split_with_sizes`),
    else (). Unequal parts only of a weight used as stored (`direct`): DTensor's own transpose
    rule would rebuild their layout as equal parts."""
    node = linear
    while len(node.users) == 1 and next(iter(node.users)).target in _SAME_VALUE_OPS:
        node = next(iter(node.users))
    ndim = node.meta["val"].ndim
    users = [u for u in node.users if u.target not in ASSERT_OPS and not _size_of_other_dim(u, ndim)]
    parts = part_sizes(users[0]) if len(users) == 1 else None
    if parts is None or parts[1] != ndim - 1 or not direct and len(set(parts[0])) > 1:
        return ()
    return parts[0]


def _size_of_other_dim(node: fx.Node, ndim: int) -> bool:
    """`x.shape[d]` for d not the feature dim (Mamba's sequence length, read off in_proj's output)."""
    return node.target is torch.ops.aten.sym_size.int and node.args[1] % ndim != ndim - 1


def _why(c: Candidate, _sim: Simulation) -> str:
    if c.kind == "column_row":
        return f"{len(c.column_nodes)} column linear(s) reach {len(c.row_nodes)} row linear(s) through {len(c.nodes)} shard-local ops"
    ends = " and ".join(x for x in ("loss parallel" if c.loss_nodes else "", "graph output" if c.outputs else "") if x)
    return f"column linear feeding {ends} through {len(c.nodes)} shard-local ops"


def _illegal(c: Candidate, reason: str) -> Candidate:
    c.legal = False
    c.reason = reason
    return c


def _embedding_candidate(analysis: GraphAnalysis, sim: PlacementSimulator, node: fx.Node) -> Candidate:
    cand = Candidate(kind="embedding", column_nodes=[node.name], inputs=[node.args[1].name])
    fqn = analysis.param_of(node.args[0])
    vocab, tp = int(node.args[0].meta["val"].shape[0]), sim.mesh.size()
    if chunk_block(vocab, tp) * (tp - 1) >= vocab:
        # torch.chunk's layout leaves the last rank(s) no rows, and a lookup in an empty table
        # fails on those ranks only (the others then wait in a collective)
        return _illegal(cand, f"vocab of {vocab} rows over tp={tp} leaves a rank an empty shard (chunks of {chunk_block(vocab, tp)})")
    step = sim.run({fqn: Shard(0)}, nodes={node.name})
    spec = step.specs.get(node.name)
    if step.unsupported.get(node.name) or step.communication():
        return _illegal(cand, f"vocab-parallel lookup not supported here: {step.unsupported.get(node.name, 'needs communication')}")
    if not (isinstance(spec, DTensorSpec) and spec.placements[0].is_partial()):
        return _illegal(cand, "the lookup on a vocab-sharded table does not give a masked partial sum")
    cand.nodes = {node.name}
    cand.placements = {fqn: Shard(0)}
    cand.reason = "vocab-parallel table: each rank looks up its vocab range, out-of-range ids masked"
    return cand
