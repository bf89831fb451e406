"""MoE blocks an expert-parallel plan can run: found from the grouped matmuls' dataflow.

transformers' grouped experts (and any MoE written the same way) sort each token's (token,
expert) pairs by expert, gather the rows (`hidden[perm // k]`), run grouped matmuls on them with
the per-expert offsets, weight the rows, unsort and sum over k. Every step but the sort is per
token, and the sort is undone before the sum: so the block run on any subset of the tokens gives
those tokens' rows of the whole block's output. Expert parallel runs it that way — each rank on
its own tokens, the expert chain (first grouped matmul to last, and what runs between them on the
rows) on the rank that holds the rows' expert, reached by all-to-all (`execute.expert_parallel`).

    >>> blocks = find_expert_blocks(graph, captured.param_fqns)
    >>> blocks["grouped_mm_fallback"].block_in, blocks["grouped_mm_fallback"].block_out
    ('mul_18', 'reshape_7')

A block this module cannot delimit exactly (its output meets a shared expert's before it returns
to the block input's shape, an intermediate value is read outside the block) maps to the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from autoshard.graph.analyse import ASSERT_OPS, is_grouped_mm

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_UNARY = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default, aten.contiguous.default}
_ROWWISE = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor}


@dataclass(frozen=True)
class ExpertBlock:
    """One MoE block: node names of the exported graph (plain data, plans refer to it by `name`)."""

    name: str                      # its first grouped matmul: the block's id
    block_in: str                  # the token activation the block reads
    block_out: str                 # its result, the same shape
    nodes: tuple[str, ...]         # everything the block runs, in graph order (block_out included)
    chain: tuple[str, ...]         # what runs on the expert's rank: grouped matmuls and the rows between
    rows: str                      # the chain's input rows (pairs sorted by expert)
    offsets: str                   # per-expert end offsets of the rows
    expert_ids: str | None         # each row's expert, where the chain indexes expert tensors by it
    result: str                    # the chain's output rows
    experts: int                   # E
    expert_params: tuple[str, ...]  # FQNs read in the chain: experts on dim 0
    params: tuple[str, ...]        # every parameter FQN the block reads, placeholder order
    sizes: tuple[tuple[str, int], ...]  # outside SymInt node -> the block input's dim it is
    buffers: tuple[str, ...] = ()  # buffer/constant placeholders the block reads (whole on every rank)


def find_expert_blocks(graph: fx.Graph, param_fqns: dict[str, str], buffers=frozenset()) -> dict[str, ExpertBlock | str]:
    """Every grouped-matmul MoE block of `graph`: id -> ExpertBlock, or the reason it is not one.
    `param_fqns`: placeholder -> parameter FQN; `buffers`: placeholders of buffers and constants
    (read whole by every rank: DeepSeek-V3's routing bias)."""
    by_offsets: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and is_grouped_mm(n.target) and isinstance(n.args[2], fx.Node):
            by_offsets.setdefault(n.args[2], []).append(n)
    out = {}
    for offs, gmms in by_offsets.items():
        try:
            out[gmms[0].name] = _block(graph, param_fqns, set(buffers), offs, gmms)
        except _NotABlock as e:
            out[gmms[0].name] = str(e)
        except Exception as e:  # noqa: BLE001 - a graph this reading does not know is no block, never a crash
            out[gmms[0].name] = f"not delimited ({type(e).__name__}: {e})"
    return out


class _NotABlock(Exception):
    pass


def _shape(n: fx.Node) -> str | None:
    v = n.meta.get("val")
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else None


def _users(n: fx.Node) -> list[fx.Node]:
    """Readers of a value; export's metadata asserts (erased before anything runs) do not count."""
    return [u for u in n.users if u.target not in ASSERT_OPS]


def _descendants(start: fx.Node) -> set[fx.Node]:
    out, todo = set(), [start]
    while todo:
        for u in _users(todo.pop()):
            if u not in out:
                out.add(u)
                todo.append(u)
    return out


def _ancestors(end: fx.Node) -> set[fx.Node]:
    out, todo = set(), [end]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in out:
                out.add(a)
                todo.append(a)
    return out


def _is_param(n: fx.Node, param_fqns) -> bool:
    return n.op == "placeholder" and n.name in param_fqns


def _supporting(nodes: set[fx.Node], keep_out: set[fx.Node], param_fqns, sym_inputs: set[fx.Node], buffers=frozenset()) -> set[fx.Node]:
    """Nodes outside `nodes` that only parameters, constants and sizes feed (a weight's transpose,
    `arange(2 * tokens)`): they join the block. An outside SymInt becomes a size input."""
    added, changed = set(), True
    while changed:
        changed = False
        for n in list(nodes | added):
            for a in n.all_input_nodes:
                if a in nodes or a in added or a in keep_out or a.op == "placeholder":
                    continue
                if isinstance(a.meta.get("val"), torch.SymInt) and not any(b in nodes for b in a.all_input_nodes):
                    if a.target is aten.sym_size.int or not a.all_input_nodes or all(b.op == "placeholder" for b in a.all_input_nodes):
                        sym_inputs.add(a)
                        continue
                ok = all(b.op == "placeholder" and (b.name in param_fqns or b.name in buffers or not isinstance(b.meta.get("val"), torch.Tensor))
                         or isinstance(b.meta.get("val"), torch.SymInt) or b in added for b in a.all_input_nodes)
                if ok and a.op == "call_function":
                    added.add(a)
                    changed = True
    return added


def _block(graph: fx.Graph, param_fqns, buffers: set[str], offs: fx.Node, gmms: list[fx.Node]) -> ExpertBlock:
    first, last = gmms[0], gmms[-1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    rows = first.args[0]
    # the chain: the grouped matmuls, what runs between them, and row-wise steps after the last
    # whose other operands are expert tensors gathered by row (gpt-oss's down-projection bias)
    chain = set(gmms) | (_descendants(first) & _ancestors(last))
    result = last
    while len(_users(result)) == 1:
        u = _users(result)[0]
        others = [a for a in u.all_input_nodes if a is not result]
        if u.target in _ROWWISE and others and all(_expert_gather(a, param_fqns) for a in others):
            chain.add(u)
            result = u
        else:
            break
    ids = None
    for n in list(chain):
        for a in n.all_input_nodes:
            if _expert_gather(a, param_fqns):
                chain.add(a)
                ids = ids or a.args[1][0]
                if a.args[1][0] is not ids:
                    raise _NotABlock(f"{a.name} indexes expert tensors by another row order than {ids.name}")
    sym_inputs: set[fx.Node] = set()
    chain |= _supporting(chain, {rows, offs} | ({ids} if ids else set()), param_fqns, sym_inputs)
    if sym_inputs:
        raise _NotABlock(f"{sorted(s.name for s in sym_inputs)[0]}: the expert chain reads a size from outside it")
    for n in chain:
        if n is not result and any(u not in chain for u in _users(n)):
            raise _NotABlock(f"{n.name} (inside the expert chain) is read outside it")
        for a in n.all_input_nodes:
            if a not in chain and a not in (rows, offs, ids) and not _is_param(a, param_fqns):
                raise _NotABlock(f"the expert chain reads {a.name} besides its rows, offsets and expert tensors")
    experts = [param_fqns[a.name] for n in chain for a in n.all_input_nodes if _is_param(a, param_fqns)]
    n_exp = {param_val(a).shape[0] for n in chain for a in n.all_input_nodes if _is_param(a, param_fqns)}
    if len(n_exp) != 1:
        raise _NotABlock(f"the expert tensors of {first.name} disagree on the expert count: {sorted(n_exp)}")

    # the block: from the token rows the first gather reads (before a flattening view) to the
    # first value after the chain with that shape again
    gather = rows
    while gather.target in _UNARY:
        gather = gather.args[0]
    if gather.target is not aten.index.Tensor or not isinstance(gather.args[0], fx.Node):
        raise _NotABlock(f"{first.name}'s rows are not gathered from the tokens (hidden[perm // k])")
    tokens = gather.args[0]
    block_in = tokens
    while block_in.target in _VIEWS and len(_users(block_in.args[0])) == 1 and block_in.args[0].op != "placeholder":
        block_in = block_in.args[0]
    want = _shape(block_in)
    block_out = result
    while _shape(block_out) != want:
        if len(_users(block_out)) != 1:
            raise _NotABlock(f"{block_out.name} is read {len(_users(block_out))} times before the block's output returns "
                             f"to the shape of {block_in.name} (a shared expert or router output meets it)")
        block_out = _users(block_out)[0]
    inside = (_descendants(block_in) & _ancestors(block_out)) | {block_out}
    sizes: set[fx.Node] = set()
    shared = _supporting(inside, {block_in}, param_fqns, sizes, buffers)   # recomputed in the block; may be read elsewhere too
    inside |= shared
    for n in inside:
        if n is not block_out and n not in shared and any(u not in inside for u in _users(n)):
            raise _NotABlock(f"{n.name} (inside the MoE block) is read outside it")
        for a in n.all_input_nodes:
            if a not in inside and a is not block_in and a not in sizes and not a.op == "placeholder":
                raise _NotABlock(f"the MoE block reads {a.name} from outside it")
            if a.op == "placeholder" and a.name not in param_fqns and a.name not in buffers and isinstance(a.meta.get("val"), torch.Tensor):
                raise _NotABlock(f"the MoE block reads the input or buffer {a.name}")
    linears = [n.name for n in inside if n.target is aten.linear.default]
    if len(linears) > 1:
        raise _NotABlock(f"the block's output meets {len(linears) - 1} more linear(s) than its router ({', '.join(sorted(linears)[:3])}: "
                         "a shared expert) before it returns to the stream; expert parallel would replicate them")
    if not chain <= inside:
        raise _NotABlock(f"{first.name}'s chain is not inside its block")
    dims = block_in.meta["val"].shape
    size_dims = []
    for s in sorted(sizes, key=order.__getitem__):
        d = next((i for i, v in enumerate(dims) if str(v) == str(s.meta["val"])), None)
        if d is None:
            raise _NotABlock(f"{s.name} ({s.meta['val']}) is no dim of the block input {block_in.name}")
        size_dims.append((s.name, d))
    nodes = sorted(inside, key=order.__getitem__)
    params = [param_fqns[a.name] for n in nodes for a in n.all_input_nodes if _is_param(a, param_fqns)]
    consts = [a.name for n in nodes for a in n.all_input_nodes if a.op == "placeholder" and a.name in buffers]
    return ExpertBlock(first.name, block_in.name, block_out.name, tuple(n.name for n in nodes),
                       tuple(n.name for n in sorted(chain, key=order.__getitem__)), rows.name, offs.name,
                       ids.name if ids is not None else None, result.name, n_exp.pop(),
                       tuple(dict.fromkeys(experts)), tuple(dict.fromkeys(params)), tuple(size_dims), tuple(dict.fromkeys(consts)))


def param_val(n: fx.Node) -> torch.Tensor:
    return n.meta["val"]


def _expert_gather(n: fx.Node, param_fqns) -> bool:
    """`w[ids]`: an expert tensor (a parameter, or a view of one) indexed by each row's expert."""
    if n.op != "call_function" or n.target is not aten.index.Tensor or len(n.args[1]) != 1:
        return False
    base = n.args[0]
    while base.op == "call_function" and base.target in _VIEWS | {aten.transpose.int, aten.t.default}:
        base = base.args[0]
    return _is_param(base, param_fqns) and isinstance(n.args[1][0], fx.Node)


def token_dim(block: ExpertBlock, graph_nodes: dict[str, fx.Node], seq_dim: int | None) -> int | None:
    """The dim of the block input each rank takes a slice of: the sequence's (where the stream is
    sequence-sharded already), else the first non-feature dim."""
    nd = graph_nodes[block.block_in].meta["val"].ndim
    if seq_dim is not None and seq_dim < nd - 1:
        return seq_dim
    return 0 if nd >= 2 else None




def expert_block_spec(simulator, sim, node: fx.Node, block: ExpertBlock):
    """The simulator's step for a node of an expert-parallel block. Inside, each rank works on its
    tokens (priced as `Shard(0)` of every value: a 1/tp share of the work and of what autograd
    saves), parameters keep their own placement; the output takes the block input's `Shard(d)`,
    and the block's all-to-alls (counts, rows out, rows back) are recorded as the op's own."""
    from autoshard.graph.simulate import Redistribution, nbytes

    val = node.meta.get("val")
    if node.name == block.block_out:
        src = sim.specs.get(block.block_in)
        place = src.placements[0] if isinstance(src, DTensorSpec) else Replicate()
        rows, result = simulator.analysis.nodes[block.rows], simulator.analysis.nodes[block.result]
        sizes = [("counts", 8 * block.experts * simulator.mesh.size())]  # rows per (rank, expert): int64
        sizes += [(what, nbytes(simulator._spec(n.meta["val"], Replicate()).tensor_meta)) for what, n in (("dispatch", rows), ("combine", result))]
        for what, size in sizes:
            sim.op_collectives.append(Redistribution(block.name, "expert_parallel", what, what, "all_to_all", size, planned=True))
        return simulator._spec(val, place if place.is_shard() else Replicate())
    if node.target is operator.getitem:
        src = sim.specs.get(node.args[0].name)
        return src[node.args[1]] if isinstance(src, (tuple, list)) else None
    ins = [sim.specs.get(a.name) for a in node.all_input_nodes]
    only_params = ins and all(isinstance(s, DTensorSpec) for s in ins) and all(a.op == "placeholder" or a.name in sim.specs and
                                                                               _param_derived(a) for a in node.all_input_nodes)

    def one(v):
        if not isinstance(v, torch.Tensor):
            return None
        if only_params:
            return simulator._spec(v, ins[0].placements[0])
        return simulator._spec(v, Shard(0) if v.ndim >= 1 else Replicate())
    return tuple(one(v) for v in val) if isinstance(val, (tuple, list)) else one(val)


def _param_derived(n: fx.Node) -> bool:
    while n.op == "call_function" and n.target in _VIEWS | {aten.transpose.int, aten.t.default}:
        n = n.args[0]
    return n.op == "placeholder"


def analysis_expert_blocks(analysis) -> dict[str, ExpertBlock]:
    """The blocks of an analysed graph that expert parallel can run (cached on the analysis)."""
    cached = getattr(analysis, "_expert_blocks", None)
    if cached is None:
        cap = analysis.captured
        found = find_expert_blocks(analysis.graph, cap.param_fqns, set(cap.buffer_fqns) | set(cap.constant_fqns))
        cached = analysis._expert_blocks = found
    return cached


def plan_expert_blocks(analysis, plan) -> list[ExpertBlock]:
    """The plan's expert-parallel blocks, found again in this graph."""
    if not plan.expert_parallel:
        return []
    blocks = analysis_expert_blocks(analysis)
    return [blocks[name] for name in plan.expert_parallel]
