"""Pass 5 — rewrite: the exported graph becomes a DTensor program with explicit region boundaries.

On a copy of the exported graph:
- export's `_assert_tensor_metadata` nodes go (DTensor has no rule for them; nothing uses them);
- factory ops captured on `meta` are retargeted to the mesh's device;
- each boundary of the plan gets a `Redistribute` node right after its producer;
- plain tensors made in the graph (masks, rotary tables) are wrapped as `Replicate` DTensors
  where they meet DTensors;
- attention becomes a `local_map` region on local heads, and a loss on vocab-sharded logits
  the vocab-parallel cross-entropy;
- outputs are gathered to plain tensors unless the plan keeps them sharded.
Everything between boundaries is DTensor's own propagation on global shapes, which the plan
simulated: so uneven sequence shards and every view keep their global meaning.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.schema.errors import PlanError
from autoshard.ops.layout import stride_order
from autoshard.graph.analyse import ATTENTION_OPS, ASSERT_OPS, is_grouped_mm
from autoshard.graph.capture import Captured, retarget_devices
from autoshard.graph.experts import ExpertBlock, find_expert_blocks
from autoshard.execute.expert_parallel import ExpertParallelBlock, block_module
from autoshard.graph.grouped import fused_chunk, interleaved_part, part_sizes
from autoshard.graph.simulate import Simulation
from autoshard.graph.state_writes import LOCAL_WRITES, written_placeholder
from autoshard.schema.plan import Plan, parse_placement
from autoshard.execute.dtensor_ops import (ConsistentGrad, LocalAttention, LocalChunk, LocalGroupedMM, LocalLinear, LocalMatmul, LocalStateWrite, LocalStridedSlice, Redistribute, ReplicatedLocal,
                                           ToFull, ToReplicate, VocabParallelLoss)

aten = torch.ops.aten
# ops whose backward views the gradient of their output: DTensor checks such a view on global
# strides, so the gradient must arrive with local strides that agree (`ConsistentGrad`)
GRAD_VIEWING_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.linear.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default, aten.reshape_as.default, aten.matmul.default,
})


def rewrite_graph(captured: Captured, plan: Plan, sim: Simulation, mesh: DeviceMesh) -> fx.GraphModule:
    """The runnable graph: placeholders (params, buffers, constants, user inputs) in export order.
    `sim`: the plan's placements simulated (`simulate.simulate`). One function per rewrite, in order."""
    _reject_mutations(captured, sim)
    g = _Editing(copy.deepcopy(captured.program.graph_module), mesh)
    _drop_asserts(g)
    # capture ran on meta or on fake tensors of the mesh's device type (fake CUDA tensors say
    # `cuda:0`): point factory ops at the mesh's device, on this rank's current device
    device = torch.device(mesh.device_type)
    retarget_devices(g.gm, device, only=("meta", device.type))  # recompiles every graph
    _expert_parallel_blocks(g, captured, plan)
    _local_state_writes(g, captured, sim)
    _promote_plain_tensors(g, sim)
    _insert_boundaries(g, plan)
    _slice_replicated_values_for_shards(g, sim)
    _local_attention(g, plan)
    _whole_ops(g, plan, sim)
    _local_matmuls(g, sim)
    _local_experts(g, sim)
    _vocab_parallel_loss(g, plan)
    _gather_outputs(g, plan, sim)
    _guard_gradient_layouts(g, sim)
    g.graph.eliminate_dead_code()
    g.graph.lint()
    g.gm.recompile()
    return g.gm


class _Editing:
    """The graph being rewritten: its nodes by exported name, and runtime modules added by prefix."""

    def __init__(self, gm: fx.GraphModule, mesh: DeviceMesh):
        self.gm, self.graph, self.mesh = gm, gm.graph, mesh
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self._count = 0

    def add(self, mod: torch.nn.Module, prefix: str) -> str:
        self._count += 1
        name = f"_autoshard_{prefix}_{self._count}"
        self.gm.add_module(name, mod)
        return name

    def is_module(self, node: fx.Node, kinds) -> bool:
        return node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), kinds)


def _expert_parallel_blocks(g: _Editing, captured: Captured, plan: Plan) -> None:
    """Each expert-parallel MoE block becomes one `ExpertParallelBlock` node reading the block
    input and the block's parameters and buffers; what it replaces is erased."""
    if not plan.expert_parallel:
        return
    blocks = find_expert_blocks(g.graph, captured.param_fqns, set(captured.buffer_fqns) | set(captured.constant_fqns))
    fqn_to_ph = {f: ph for ph, f in captured.param_fqns.items()}
    placements = plan.placements()
    for name, dim in plan.expert_parallel.items():
        block = blocks.get(name)
        if not isinstance(block, ExpertBlock):
            raise PlanError(f"expert-parallel block {name!r}: {block or 'not in this graph'} (the plan was made for another model)")
        body = block_module(g.graph, block, captured.param_fqns, g.mesh.get_group())
        params = [placements.get(f, Replicate()) for f in block.params]
        mod = g.add(ExpertParallelBlock(body, dim, params, g.mesh), "experts")
        out = g.nodes[block.block_out]
        args = [g.nodes[block.block_in]] + [g.nodes[fqn_to_ph[f]] for f in block.params] + [g.nodes[b] for b in block.buffers]
        with g.graph.inserting_after(out):
            node = g.graph.call_module(mod, tuple(args))
        node.meta = dict(out.meta)
        out.replace_all_uses_with(node)
        g.nodes[block.block_out] = node
    g.graph.eliminate_dead_code()
    g.nodes = {n: v for n, v in g.nodes.items() if v.graph is g.graph and (v.op != "call_function" or v in set(g.graph.nodes))}


def _drop_asserts(g: _Editing) -> None:
    """Export's `_assert_tensor_metadata` nodes go: DTensor has no rule for them, nothing uses them."""
    for sub in g.gm.modules():  # the main graph and higher-order-op bodies (rotary tables)
        if isinstance(sub, fx.GraphModule):
            for node in list(sub.graph.nodes):
                if node.op == "call_function" and node.target in ASSERT_OPS:
                    sub.graph.erase_node(node)


def _promote_plain_tensors(g: _Editing, sim: Simulation) -> None:
    """Plain tensors made in the graph (masks, rotary tables) become Replicate DTensors where they meet DTensors."""
    promoted: dict[str, fx.Node] = {}
    for name in sorted(sim.mixed, key=lambda n: _order(g.graph, n)):
        node = g.nodes[name]
        for arg in node.all_input_nodes:
            if sim.specs.get(arg.name) is None and isinstance(arg.meta.get("val"), torch.Tensor):
                if arg.name not in promoted:
                    with g.graph.inserting_after(arg):
                        promoted[arg.name] = g.graph.call_module(g.add(ToReplicate(g.mesh), "replicate"), (arg,))
                node.replace_input_with(arg, promoted[arg.name])


def _insert_boundaries(g: _Editing, plan: Plan) -> None:
    """Each boundary of the plan: a `Redistribute` right after its producer, read by all its users."""
    for name, placement in plan.boundary_placements().items():
        node = g.nodes.get(name)
        if node is None:
            raise PlanError(f"plan boundary {name!r} is not a node of this graph: the plan was made for another model or inputs")
        users = list(node.users)
        with g.graph.inserting_after(node):
            moved = g.graph.call_module(g.add(Redistribute(g.mesh, (placement,)), "redistribute"), (node,))
        for u in users:
            u.replace_input_with(node, moved)


def _slice_replicated_values_for_shards(g: _Editing, sim: Simulation) -> None:
    """A replicated value DTensor slices to meet sequence shards (a replicated MoE block's output
    added to the sequence-parallel residual) gets its gradient back sharded, and the replicated
    computation behind it would run its backward on shards (views of uneven shards fail there).
    An explicit slice makes the backward all-gather it, as a replicated forward needs."""
    for move in sim.redistributions:
        src, consumer = g.nodes.get(move.source), g.nodes.get(move.consumer)
        if move.planned or src is None or consumer is None or src.op != "call_function" or src is consumer:
            continue
        if move.src != "Replicate()" or not move.dst.startswith("Shard(") or not _carries_gradient(src):
            continue
        with g.graph.inserting_before(consumer):
            sliced = g.graph.call_module(g.add(Redistribute(g.mesh, (parse_placement(move.dst),)), "redistribute"), (src,))
        consumer.replace_input_with(src, sliced)


def _local_attention(g: _Editing, plan: Plan) -> None:
    """Attention becomes a `local_map` region on local heads (or batch rows)."""
    for name, placement in plan.attention.items():
        node = g.nodes[name]
        q, k, v, *rest = node.args
        mask = rest[0] if rest else node.kwargs.get("attn_mask")
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ != "attn_mask"}
        for key, val in zip(("dropout_p", "is_causal"), rest[1:]):
            kwargs[key] = val
        with g.graph.inserting_before(node):
            val = node.meta.get("val")
            layout = stride_order(val) if isinstance(val, torch.Tensor) else None
            new = g.graph.call_module(g.add(LocalAttention(parse_placement(placement), kwargs, layout), "attention"), (q, k, v, mask))
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)


def _whole_ops(g: _Editing, plan: Plan, sim: Simulation) -> None:
    """Ops DTensor cannot run at all: whole, on every rank (`ReplicatedLocal`)."""
    present = set(g.graph.nodes)
    for name in sim.unsupported:
        node = g.nodes.get(name)
        if node not in present or node.op != "call_function" or isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        if node.target in ATTENTION_OPS or name in plan.loss_parallel:
            continue
        with g.graph.inserting_before(node):
            new = g.graph.call_module(g.add(ReplicatedLocal(node.target), "replicated_local"), tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)  # the same value as the op it runs (the lowering reads its shape)
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)


def _local_matmuls(g: _Editing, sim: Simulation) -> None:
    """Batched matmuls the simulation runs on batch/head shards run on the local shards."""
    for node in list(g.graph.nodes):
        if node.op == "call_function" and node.target is aten.matmul.default:
            spec = sim.specs.get(node.name)
            if isinstance(spec, DTensorSpec) and spec.placements[0].is_shard():
                with g.graph.inserting_before(node):
                    new = g.graph.call_module(g.add(LocalMatmul(spec.placements[0]), "matmul"), tuple(node.args[:2]))
                node.replace_all_uses_with(new)
                g.graph.erase_node(node)


def _local_experts(g: _Editing, sim: Simulation) -> None:
    """Grouped expert matmuls and fused linears on DTensors, and the parts of fused outputs, run
    on local shards (`graph.grouped`: DTensor has no rule that keeps their layout)."""
    local = []  # decided on the simulation's names first: a replaced node's new name has no spec
    for node in g.graph.nodes:
        if node.op != "call_function" or not isinstance(sim.specs.get(node.name), (DTensorSpec, tuple)):
            continue
        if is_grouped_mm(node.target):
            local.append((node, LocalGroupedMM(node.target), "grouped_mm"))
        elif node.target is aten.linear.default and isinstance(_placement(sim, node.args[1]), _StridedShard):
            local.append((node, LocalLinear(), "fused_linear"))
        elif node.args and fused_chunk(node, _spec(sim, node.args[0])):
            local.append((node, LocalChunk(*part_sizes(node)), "fused_parts"))
        elif node.args and (d := interleaved_part(node, _spec(sim, node.args[0]), g.mesh.size())) is not None:
            local.append((node, LocalStridedSlice(d, node.args[2], node.args[4]), "interleaved_part"))
    for node, mod, prefix in local:
        args, kwargs = ((node.args[0],), {}) if isinstance(mod, LocalChunk) else (tuple(node.args), dict(node.kwargs))
        with g.graph.inserting_before(node):
            new = g.graph.call_module(g.add(mod, prefix), args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)


def _spec(sim: Simulation, node):
    return sim.specs.get(node.name) if isinstance(node, fx.Node) else None


def _placement(sim: Simulation, node) -> Placement | None:
    spec = _spec(sim, node)
    return spec.placements[0] if isinstance(spec, DTensorSpec) else None


def _vocab_parallel_loss(g: _Editing, plan: Plan) -> None:
    """A cross-entropy on vocab-sharded logits: the vocab-parallel loss."""
    for name in plan.loss_parallel:
        node = g.nodes[name]
        if node.target is not aten.cross_entropy_loss.default:
            raise PlanError(f"loss parallel is implemented for cross_entropy_loss, not {node.target}")
        logits, target, *rest = node.args
        opts = dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), rest))
        opts.update(node.kwargs)
        with g.graph.inserting_before(node):
            new = g.graph.call_module(g.add(VocabParallelLoss(**opts), "loss_parallel"), (logits, target))
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)


def _gather_outputs(g: _Editing, plan: Plan, sim: Simulation) -> None:
    """Outputs come back to the caller as plain full tensors, unless the plan keeps them sharded."""
    output = next(n for n in g.graph.nodes if n.op == "output")
    for arg in list(output.all_input_nodes):
        # a boundary can be the last op (a row linear's reduction returned as is): a DTensor too
        boundary = g.is_module(arg, (Redistribute, ToReplicate))
        if (boundary or isinstance(sim.specs.get(arg.name), DTensorSpec)) and arg.name not in plan.sharded_outputs:
            with g.graph.inserting_before(output):
                full = g.graph.call_module(g.add(ToFull(), "to_full"), (arg,))
            output.replace_input_with(arg, full)


def _guard_gradient_layouts(g: _Editing, sim: Simulation) -> None:
    """`ConsistentGrad` after every op whose backward views its output's gradient (see GRAD_VIEWING_OPS)."""
    for node in list(g.graph.nodes):
        if node.op == "call_function" and node.target in GRAD_VIEWING_OPS and isinstance(sim.specs.get(node.name), DTensorSpec):
            users = list(node.users)
            with g.graph.inserting_after(node):
                new = g.graph.call_module(g.add(ConsistentGrad(), "consistent_grad"), (node,))
            new.meta = dict(node.meta)
            for u in users:
                u.replace_input_with(node, new)


def _carries_gradient(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _order(graph: fx.Graph, name: str) -> int:
    for i, n in enumerate(graph.nodes):
        if n.name == name:
            return i
    return -1


def _reject_mutations(captured: Captured, sim) -> None:
    """Forward may write a buffer it owns (a KV cache): the buffer then takes the placement of
    what is written into it (`graph/state_writes`), each rank updating its own shard or its own
    whole copy. Anything else that writes model state or inputs in place is refused here."""
    kinds = {s.kind.name for s in captured.program.graph_signature.output_specs}
    if kinds - {"USER_OUTPUT"}:
        raise PlanError(
            f"{captured.model_name}.forward mutates buffers or inputs in place ({sorted(kinds - {'USER_OUTPUT'})}); "
            "autoshard shards functional forwards only — move state updates out of forward"
        )
    state = {**captured.param_fqns, **captured.buffer_fqns, **{n: f"input {n!r}" for n in captured.user_input_placeholders}}
    for node in captured.program.graph.nodes:
        written = written_placeholder(node)
        if written is None or written.name not in state:
            continue
        if _placed_write(node, written, captured, sim):
            continue  # a placed buffer, written on local shards
        sharded = [a.name for a in node.all_input_nodes if a is not written and _is_split(sim.specs.get(a.name))]
        if written.name in captured.buffer_fqns and not sharded:
            continue
        what = f"values sharded over tp ({', '.join(sharded)})" if sharded else "it"
        raise PlanError(
            f"{captured.model_name}.forward writes {state[written.name]} in place ({node.target}) with {what}; "
            "autoshard shards module state written in forward only through index_copy_/index_put_ of values "
            "split on a dim the write does not index (a KV cache split by heads) or replicated ones — "
            "write the state that way, or run the model without it"
        )


def _local_state_writes(g: _Editing, captured: Captured, sim: Simulation) -> None:
    """A write into a placed buffer runs on each rank's local shards (DTensor has no rule for `index_copy_`)."""
    for node in list(g.graph.nodes):
        if not _placed_write(node, written_placeholder(node), captured, sim):
            continue
        with g.graph.inserting_before(node):
            new = g.graph.call_module(g.add(LocalStateWrite(node.target), "state_write"), node.args, dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)
        g.nodes[node.name] = new   # later passes find the write under its exported name,
        sim.specs[new.name] = sim.specs.get(node.name)   # and its placement under its new one


def _placed_write(node: fx.Node, written: fx.Node | None, captured: Captured, sim: Simulation) -> bool:
    """Does `node` write, on local shards, a buffer the simulation laid out (`graph/state_writes`)?"""
    return (written is not None and written.name in captured.buffer_fqns and node.target in LOCAL_WRITES
            and isinstance(sim.specs.get(written.name), DTensorSpec))


def state_placements(captured: Captured, sim: Simulation) -> dict[str, Placement]:
    """FQN -> placement of each buffer forward writes that the plan lays out (a KV cache)."""
    out = {}
    for name, fqn in captured.buffer_fqns.items():
        spec = sim.specs.get(name)
        if isinstance(spec, DTensorSpec):
            out[fqn] = spec.placements[0]
    return out


def _is_split(spec) -> bool:
    return isinstance(spec, DTensorSpec) and not all(p.is_replicate() for p in spec.placements)


def written_buffers(captured: Captured) -> set[str]:
    """FQNs of the buffers forward writes in place."""
    out = set()
    for node in captured.program.graph.nodes:
        written = written_placeholder(node)
        if written is not None and written.name in captured.buffer_fqns:
            out.add(captured.buffer_fqns[written.name])
    return out
