"""Expert parallel: an MoE block run on each rank's tokens, its experts split over the ranks.

Rank r holds experts `[r·E/tp, (r+1)·E/tp)` whole (`Shard(0)` of every expert tensor) and its
slice of the tokens (`Shard(d)` of the block input). It routes its own tokens, sorts their
(token, expert) rows by expert — rows for rank s's experts are then one contiguous run — and

    dispatch: all-to-all of the rows (and of the per-expert counts, so each rank knows what comes)
    the expert chain on the rows received, regrouped by local expert (grouped matmuls on local experts)
    combine:  all-to-all of the result rows back, in the order they were sent

then weights, unsorts and sums its rows as the unsharded block does. Every gradient follows the
same path back (the all-to-alls' backward is the reverse all-to-all). The router's weight is whole
on every rank but reads only that rank's tokens: its gradient is a partial sum (`Partial`).

The block and its chain come from `graph.experts.ExpertBlock`; they are rebuilt here as two small
graphs of the exported nodes, run on local tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Partial, Shard
from torch._prims_common import make_contiguous_strides_for

from autoshard.execute.dtensor_ops import RuntimeOp
from autoshard.graph.experts import ExpertBlock

aten = torch.ops.aten


def _copy_nodes(src: fx.Graph, names, env: dict, dst: fx.Graph, skip=frozenset()) -> None:
    nodes = {n.name: n for n in src.nodes}
    for name in names:
        if name in skip:
            continue
        env[nodes[name]] = dst.node_copy(nodes[name], lambda a: env[a])


def chain_module(graph: fx.Graph, block: ExpertBlock, placeholders: dict[str, str]) -> fx.GraphModule:
    """The chain as its own graph: (rows, offsets, expert ids, *expert tensors) -> result rows."""
    nodes = {n.name: n for n in graph.nodes}
    g, env = fx.Graph(), {}
    for name in (block.rows, block.offsets) + ((block.expert_ids,) if block.expert_ids else ()):
        env[nodes[name]] = g.placeholder(name)
    for ph in _chain_params(graph, block, placeholders):
        env[nodes[ph]] = g.placeholder(ph)
    _copy_nodes(graph, block.chain, env, g)
    g.output(env[nodes[block.result]])
    return fx.GraphModule(nn.Module(), g)


def _chain_params(graph: fx.Graph, block: ExpertBlock, placeholders: dict[str, str]) -> list[str]:
    nodes = {n.name: n for n in graph.nodes}
    fqn_to_ph = {f: ph for ph, f in placeholders.items()}
    return [fqn_to_ph[f] for f in block.expert_params if fqn_to_ph[f] in {a.name for c in block.chain for a in nodes[c].all_input_nodes}]


class ExpertDispatch(RuntimeOp):
    """Dispatch, the chain on local experts, combine: `(rows, offsets, expert ids, *local experts)`
    -> result rows in the order given. `group`: the tensor-parallel process group."""

    def __init__(self, chain: fx.GraphModule, experts: int, group, with_ids: bool):
        super().__init__()
        self.chain, self.experts, self.group, self.with_ids = chain, experts, group, with_ids

    def forward(self, rows, offsets, *rest):
        ids, weights = (rest[0], rest[1:]) if self.with_ids else (None, rest)
        tp = dist.get_world_size(self.group)
        local = self.experts // tp
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))                     # rows per expert, this rank's tokens
        got = all_to_all_single(counts, None, None, self.group)                 # [src rank, local expert] rows coming
        got = got.wait() if hasattr(got, "wait") else got
        got = got.view(tp, local)
        send = counts.view(tp, local).sum(1).tolist()
        recv = got.sum(1).tolist()
        x = all_to_all_single_autograd(rows, recv, send, self.group)
        # received rows come source by source, each run by local expert: regroup them by expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(tp), got.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True)
        local_ends = torch.cumsum(got.sum(0), 0).to(offsets.dtype)
        args = [x[order], local_ends] + ([expert_of_row[order].to(ids.dtype)] if self.with_ids else [])
        y = self.chain(*args, *weights)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all_single_autograd(y[back], send, recv, self.group)


def block_module(graph: fx.Graph, block: ExpertBlock, placeholders: dict[str, str], group) -> fx.GraphModule:
    """The block as a graph on local tensors: (block input, *parameters, *buffers) -> block output,
    sizes read from its own input, the chain replaced by an `ExpertDispatch`."""
    nodes = {n.name: n for n in graph.nodes}
    fqn_to_ph = {f: ph for ph, f in placeholders.items()}
    root = nn.Module()
    g, env = fx.Graph(), {}
    x = env[nodes[block.block_in]] = g.placeholder(block.block_in)
    for f in block.params:
        env[nodes[fqn_to_ph[f]]] = g.placeholder(fqn_to_ph[f])
    for b in block.buffers:
        env[nodes[b]] = g.placeholder(b)
    for name, dim in block.sizes:
        env[nodes[name]] = g.call_function(aten.sym_size.int, (x, dim))
    chain = set(block.chain)
    root.dispatch = ExpertDispatch(chain_module(graph, block, placeholders), block.experts, group, block.expert_ids is not None)
    for name in block.nodes:
        if name == block.result:
            ins = [block.rows, block.offsets] + ([block.expert_ids] if block.expert_ids else []) + _chain_params(graph, block, placeholders)
            env[nodes[name]] = g.call_module("dispatch", tuple(env[nodes[i]] for i in ins))
        elif name not in chain:
            env[nodes[name]] = g.node_copy(nodes[name], lambda a: env[a])
    g.output(env[nodes[block.block_out]])
    return fx.GraphModule(root, g)


class ExpertParallelBlock(RuntimeOp):
    """The DTensor program's step for one expert-parallel MoE block: the block input arrives
    `Shard(d)` (each rank its tokens), expert tensors `Shard(0)`, everything else whole; the output
    leaves `Shard(d)`. The lowered program calls `body` on the local tensors directly."""

    def __init__(self, body: fx.GraphModule, dim: int, placements: list, mesh):
        super().__init__()
        self.body, self.dim, self.placements, self.mesh = body, dim, placements, mesh

    def forward(self, x, *params):
        if not isinstance(x, DTensor):
            return self.body(x, *params)
        # by hand rather than `local_map`: the token shards may be uneven, and only `from_local`
        # with the global shape says so
        local = [x.to_local(grad_placements=(Shard(self.dim),))]
        for p, a in zip(self.placements, params):
            whole = isinstance(a, DTensor) and a.placements[0].is_replicate()
            local.append(a.to_local(grad_placements=(Partial(),) if whole else None) if isinstance(a, DTensor) else a)
        out = self.body(*local)
        return DTensor.from_local(out, self.mesh, (Shard(self.dim),), run_check=False, shape=x.shape,
                                  stride=make_contiguous_strides_for(x.shape))

    def extra_repr(self) -> str:
        return f"tokens Shard({self.dim}), experts Shard(0)"



