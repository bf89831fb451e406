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
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from autoshard.schema.errors import PlanError
from autoshard.ops.layout import stride_order
from autoshard.graph.analyse import ATTENTION_OPS, ASSERT_OPS
from autoshard.graph.capture import Captured, retarget_devices
from autoshard.graph.simulate import PlacementSimulator
from autoshard.graph.simplify import view_root
from autoshard.schema.plan import Plan, parse_placement
from autoshard.execute.dtensor_ops import ConsistentGrad, LocalAttention, LocalMatmul, Redistribute, ReplicatedLocal, ToFull, ToReplicate, VocabParallelLoss

aten = torch.ops.aten
# ops whose backward views the gradient of their output: DTensor checks such a view on global
# strides, so the gradient must arrive with local strides that agree (`ConsistentGrad`)
GRAD_VIEWING_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.linear.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default, aten.reshape_as.default, aten.matmul.default,
})


def rewrite_graph(captured: Captured, plan: Plan, simulator: PlacementSimulator, mesh: DeviceMesh) -> fx.GraphModule:
    """The runnable graph: placeholders (params, buffers, constants, user inputs) in export order."""
    sim = simulator.run(plan.placements(), plan.boundary_placements(), sharded_outputs=set(plan.sharded_outputs))
    _reject_mutations(captured, sim)
    gm = copy.deepcopy(captured.program.graph_module)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    counter = [0]

    def add_module(mod: torch.nn.Module, prefix: str) -> str:
        counter[0] += 1
        name = f"_autoshard_{prefix}_{counter[0]}"
        gm.add_module(name, mod)
        return name

    for sub in gm.modules():  # the main graph and higher-order-op bodies (rotary tables)
        if isinstance(sub, fx.GraphModule):
            for node in list(sub.graph.nodes):
                if node.op == "call_function" and node.target in ASSERT_OPS:
                    sub.graph.erase_node(node)
    # capture ran on meta or on fake tensors of the mesh's device type (fake CUDA tensors say
    # `cuda:0`): point factory ops at the mesh's device, on this rank's current device
    device = torch.device(mesh.device_type)
    retarget_devices(gm, device, only=("meta", device.type))  # recompiles every graph

    # plain tensors meeting DTensors
    promoted: dict[str, fx.Node] = {}
    for name in sorted(sim.mixed, key=lambda n: _order(graph, n)):
        node = nodes[name]
        for arg in node.all_input_nodes:
            if sim.specs.get(arg.name) is None and isinstance(arg.meta.get("val"), torch.Tensor):
                if arg.name not in promoted:
                    with graph.inserting_after(arg):
                        promoted[arg.name] = graph.call_module(add_module(ToReplicate(mesh), "replicate"), (arg,))
                node.replace_input_with(arg, promoted[arg.name])

    for name, placement in plan.boundary_placements().items():
        node = nodes.get(name)
        if node is None:
            raise PlanError(f"plan boundary {name!r} is not a node of this graph: the plan was made for another model or inputs")
        users = list(node.users)
        with graph.inserting_after(node):
            moved = graph.call_module(add_module(Redistribute(mesh, (placement,)), "redistribute"), (node,))
        for u in users:
            u.replace_input_with(node, moved)

    # a replicated value DTensor slices to meet sequence shards (a replicated MoE block's output
    # added to the sequence-parallel residual) gets its gradient back sharded, and the replicated
    # computation behind it would run its backward on shards (views of uneven shards fail there).
    # An explicit slice makes the backward all-gather it, as a replicated forward needs.
    for move in sim.redistributions:
        src, consumer = nodes.get(move.source), nodes.get(move.consumer)
        if move.planned or src is None or consumer is None or src.op != "call_function" or src is consumer:
            continue
        if move.src != "Replicate()" or not move.dst.startswith("Shard(") or not _carries_gradient(src):
            continue
        with graph.inserting_before(consumer):
            sliced = graph.call_module(add_module(Redistribute(mesh, (parse_placement(move.dst),)), "redistribute"), (src,))
        consumer.replace_input_with(src, sliced)

    for name, placement in plan.attention.items():
        node = nodes[name]
        q, k, v, *rest = node.args
        mask = rest[0] if rest else node.kwargs.get("attn_mask")
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ != "attn_mask"}
        for key, val in zip(("dropout_p", "is_causal"), rest[1:]):
            kwargs[key] = val
        with graph.inserting_before(node):
            val = node.meta.get("val")
            layout = stride_order(val) if isinstance(val, torch.Tensor) else None
            new = graph.call_module(add_module(LocalAttention(parse_placement(placement), kwargs, layout), "attention"), (q, k, v, mask))
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    present = set(graph.nodes)
    for name in sim.unsupported:  # ops DTensor cannot run at all: whole, on every rank
        node = nodes.get(name)
        if node not in present or node.op != "call_function" or isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        if node.target in ATTENTION_OPS or name in plan.loss_parallel:
            continue
        with graph.inserting_before(node):
            new = graph.call_module(add_module(ReplicatedLocal(node.target), "replicated_local"), tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)  # the same value as the op it runs (the lowering reads its shape)
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    for node in list(graph.nodes):  # batched matmuls the simulation runs on batch/head shards
        if node.op == "call_function" and node.target is aten.matmul.default:
            spec = sim.specs.get(node.name)
            if isinstance(spec, DTensorSpec) and spec.placements[0].is_shard():
                with graph.inserting_before(node):
                    new = graph.call_module(add_module(LocalMatmul(spec.placements[0]), "matmul"), tuple(node.args[:2]))
                node.replace_all_uses_with(new)
                graph.erase_node(node)

    for name in plan.loss_parallel:
        node = nodes[name]
        if node.target is not aten.cross_entropy_loss.default:
            raise PlanError(f"loss parallel is implemented for cross_entropy_loss, not {node.target}")
        logits, target, *rest = node.args
        opts = dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), rest))
        opts.update(node.kwargs)
        with graph.inserting_before(node):
            new = graph.call_module(add_module(VocabParallelLoss(**opts), "loss_parallel"), (logits, target))
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    output = next(n for n in graph.nodes if n.op == "output")
    for arg in list(output.all_input_nodes):
        if isinstance(sim.specs.get(arg.name), DTensorSpec) and arg.name not in plan.sharded_outputs:
            with graph.inserting_before(output):
                full = graph.call_module(add_module(ToFull(), "to_full"), (arg,))
            output.replace_input_with(arg, full)

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in GRAD_VIEWING_OPS and isinstance(sim.specs.get(node.name), DTensorSpec):
            users = list(node.users)
            with graph.inserting_after(node):
                new = graph.call_module(add_module(ConsistentGrad(), "consistent_grad"), (node,))
            new.meta = dict(node.meta)
            for u in users:
                u.replace_input_with(node, new)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _carries_gradient(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _order(graph: fx.Graph, name: str) -> int:
    for i, n in enumerate(graph.nodes):
        if n.name == name:
            return i
    return -1


def _reject_mutations(captured: Captured, sim) -> None:
    """Forward may write a buffer it owns (gpt-fast's `KVCache.update`) when what it writes is the
    same on every rank: each rank then updates its own whole copy. Anything else that writes model
    state or inputs in place is refused here, before anything runs."""
    kinds = {s.kind.name for s in captured.program.graph_signature.output_specs}
    if kinds - {"USER_OUTPUT"}:
        raise PlanError(
            f"{captured.model_name}.forward mutates buffers or inputs in place ({sorted(kinds - {'USER_OUTPUT'})}); "
            "autoshard shards functional forwards only — move state updates out of forward"
        )
    state = {**captured.param_fqns, **captured.buffer_fqns, **{n: f"input {n!r}" for n in captured.user_input_placeholders}}
    for node in captured.program.graph.nodes:
        written = _written_placeholder(node)
        if written is None or written.name not in state:
            continue
        sharded = [a.name for a in node.all_input_nodes if a is not written and _is_split(sim.specs.get(a.name))]
        if written.name in captured.buffer_fqns and not sharded:
            continue
        what = f"values sharded over tp ({', '.join(sharded)})" if sharded else "it"
        raise PlanError(
            f"{captured.model_name}.forward writes {state[written.name]} in place ({node.target}) with {what}; "
            "autoshard keeps module state written in forward whole on every rank, so the values written must be "
            "replicated (a KV cache of K/V heads split over tp is not sharded yet) — run the model without the cache"
        )


def _is_split(spec) -> bool:
    return isinstance(spec, DTensorSpec) and not all(p.is_replicate() for p in spec.placements)


def written_buffers(captured: Captured) -> set[str]:
    """FQNs of the buffers forward writes in place."""
    out = set()
    for node in captured.program.graph.nodes:
        written = _written_placeholder(node)
        if written is not None and written.name in captured.buffer_fqns:
            out.add(captured.buffer_fqns[written.name])
    return out


def _written_placeholder(node: fx.Node) -> fx.Node | None:
    """The graph input an in-place op writes (through views of it), if any."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = view_root(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
            if isinstance(value, fx.Node) and value.op == "placeholder":
                return value
    return None
