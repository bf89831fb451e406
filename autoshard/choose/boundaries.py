"""Where the chosen regions meet the residual stream: the explicit redistributions of a plan."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement

from autoshard.choose.params import region_name
from autoshard.graph.analyse import GraphAnalysis, Role
from autoshard.graph.experts import token_dim
from autoshard.graph.label import Candidate
from autoshard.graph.simulate import Simulation
from autoshard.schema.plan import SP_STREAM, BoundaryPlan

REPLICATE = Replicate()


def seq_dim(analysis: GraphAnalysis, name: str) -> int | None:
    val = analysis.nodes[name].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    symbols = analysis.captured.seq_dim_symbols
    for i, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & symbols:
            return i
    return None


def _entry_node(analysis: GraphAnalysis, name: str, layout: str) -> str:
    """Where a region's input is gathered. On the sequence-parallel stream, before any chain of
    single-use views (HF's `logits_to_keep` slices): a slice's backward on sequence shards would
    make DTensor gather the gradient on its own."""
    if layout != SP_STREAM:
        return name
    node = analysis.nodes[name]
    while analysis.roles[node.name] is Role.VIEW and len(node.all_input_nodes) == 1:
        prev = node.all_input_nodes[0]
        if len(prev.users) != 1 or prev.op == "placeholder":
            break
        node = prev
    return node.name


def _exits(c: Candidate) -> list[str]:
    """Where a sharded region's partial sums are reduced: its row linears (or lookup), and the
    statistics it reduces and the fused parts it gathers inside (a norm over the sharded width; the
    K/V of a fused qkv with too few heads)."""
    inside = c.reduces + c.gathers
    return c.row_nodes + inside if c.kind == "column_row" else c.column_nodes if c.kind == "embedding" else inside


def entries(analysis, c: Candidate, layout: str) -> list[str]:
    """Nodes whose boundary collectives belong to region `c`."""
    out = list(_exits(c))
    if c.kind != "embedding":
        out += [_entry_node(analysis, x, layout) for x in c.inputs]
    if c.kind == "column_output":
        out += c.column_nodes
    if c.expert_block is not None:
        out += [c.expert_block.block_in, c.expert_block.block_out]
    return out


def region_boundaries(analysis: GraphAnalysis, regions: list[Candidate], picked: dict, layout: str) -> dict[str, Placement]:
    out: dict[str, Placement] = {}
    for c in regions:
        opt = picked[id(c)]
        if c.kind == "column_output":
            if opt.sharded or layout == SP_STREAM:  # a replicated head on the sequence-parallel stream still reads it whole
                for x in c.inputs:
                    out[_entry_node(analysis, x, layout)] = REPLICATE
            if opt.name in ("gather", "column_gather"):
                for n in c.column_nodes:
                    out[n] = REPLICATE  # logits gathered before the (replicated) loss
            if opt.sharded:
                out.update(dict.fromkeys(c.reduces + c.gathers, REPLICATE))
            continue
        if not opt.sharded:
            continue
        if opt.name == "ep":  # each rank its tokens in, the stream's layout out
            b = c.expert_block
            d = token_dim(b, analysis.nodes, seq_dim(analysis, b.block_in))
            out[b.block_in] = Shard(d)
            s = seq_dim(analysis, b.block_out) if layout == SP_STREAM else None
            out[b.block_out] = Shard(s) if s is not None else REPLICATE
            continue
        for e in _exits(c):
            d = seq_dim(analysis, e) if layout == SP_STREAM and e not in c.reduces + c.gathers else None
            out[e] = Shard(d) if d is not None else REPLICATE
        if c.kind != "embedding":
            for x in c.inputs:
                out[_entry_node(analysis, x, layout)] = REPLICATE  # column linears read the whole activation
    return out


def sharded_outputs(regions: list[Candidate], picked: dict) -> set[str]:
    return {o for c in regions if c.loss_nodes and picked[id(c)].sharded and picked[id(c)].name not in ("gather", "column_gather")
            for o in c.outputs if o not in c.loss_nodes}


def vocab_sharded(analysis, sim, node) -> bool:
    spec = sim.specs.get(node.args[0].name)
    return isinstance(spec, DTensorSpec) and spec.placements[0].is_shard(len(spec.tensor_meta.shape) - 1)


def loss_parallel_nodes(analysis, sim) -> set[str]:
    return {n.name for n in analysis.of_role(Role.LOSS) if vocab_sharded(analysis, sim, n)}


_EXPERT_MOVES = {"counts": "how many rows each rank sends each expert", "dispatch": "(token, expert) rows to their expert's rank",
                 "combine": "the experts' result rows back to their tokens' rank"}


def boundary_plans(analysis: GraphAnalysis, sim: Simulation, regions: list[Candidate], picked: dict, layout: str) -> list[BoundaryPlan]:
    roles = {}
    for c in regions:
        name = region_name(analysis, c)
        for x in c.inputs:
            roles.setdefault(_entry_node(analysis, x, layout), f"enter {name}: column linears read the whole activation")
        for e in c.row_nodes:
            roles[e] = f"leave {name}: reduce the row linear's partial sums"
        for e in c.reduces:
            roles[e] = f"inside {name}: a norm over the sharded width, its statistic (one value per token) averaged across tp"
        for e in c.gathers:
            roles[e] = f"inside {name}: a part of the fused projection whose heads tp cannot split, gathered whole (K/V replicated)"
        if c.kind == "embedding":
            roles[c.column_nodes[0]] = "vocab-parallel lookup: sum the masked partial rows"
        if picked[id(c)].name in ("gather", "column_gather"):
            for n in c.column_nodes:
                roles[n] = "logits gathered before the loss"
    out = []
    order = _graph_order(analysis)   # every unit in graph order: the fast planner grows them layer by layer
    moves = sorted([(r, False) for r in sim.redistributions] + [(r, True) for r in sim.op_collectives], key=lambda m: order(m[0]))
    for r, inside_op in moves:
        if r.consumer == "expert_parallel":
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes, kind="expert",
                                    reason=f"expert parallel {r.src}: " + _EXPERT_MOVES[r.src]))
        elif inside_op:
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                    reason="loss parallel: one value per row reduced across the vocab shards", kind="loss"))
        elif not r.planned:
            continue
        elif r.consumer == "output":
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                    reason="output: gathered for the caller", kind="output"))
        else:
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                    reason=roles.get(r.source, "region boundary")))
    return out


def _graph_order(analysis: GraphAnalysis):
    """Sort key of a recorded move: where the simulation met it (its consumer; an expert block's
    moves at the block), ties kept in recording order."""
    pos = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    return lambda r: pos.get(r.source if r.consumer == "expert_parallel" else r.consumer, len(pos))
