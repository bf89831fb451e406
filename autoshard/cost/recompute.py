"""The price of activation checkpointing per decoder layer: activations kept, forward recomputed.

Mirrors `execute/recompute.py` on the graph the cost model reads. With `full`, a layer keeps only
its inputs (the tensors its stage receives), so what its own ops save is dropped and its forward
runs again in backward, collectives included. With `selective`, a layer also keeps what its
matmuls, attention and collectives produce (torch's selective checkpoint saves those outputs),
and recomputes the rest: norms, activations, rotary, elementwise — their time is the price.

    >>> prices = recompute_prices(analysis, sim, saved, loss_parallel, profile, events)
    >>> prices["selective"].activations, prices["selective"].recompute_s
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoshard.cost.activation import SavedActivations, SavedTensor
from autoshard.cost.estimate import node_compute
from autoshard.cost.memory import activation_memory, boundary_sources, local_fraction, tensor_bytes
from autoshard.graph.analyse import GraphAnalysis, Role
from autoshard.graph.units import layer_units, segments, spans

aten = torch.ops.aten
KINDS = ("none", "full", "selective")
_SAVED_ROLES = (Role.LINEAR, Role.ATTENTION)
_SAVED_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
              aten.linear.default, aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class RecomputePrice:
    activations: int      # bytes per rank a forward keeps for backward
    recompute_s: float    # forward seconds run again in backward, per step


def layer_membership(analysis: GraphAnalysis) -> dict[str, str]:
    """Node name -> the decoder layer whose stage runs it (nodes of the prologue/epilogue absent)."""
    fqns = analysis.captured.param_fqns
    nodes = list(analysis.graph.nodes)
    state = [(analysis.nodes[ph], fqn) for ph, fqn in fqns.items() if ph in analysis.nodes]
    ordered = spans(nodes, state, layer_units(fqns.values()))
    return {n.name: u for n, u in segments(nodes, ordered).items()}


def _is_saved_op(analysis: GraphAnalysis, name: str) -> bool:
    node = analysis.nodes.get(name)
    if node is None:
        return False
    target_name = getattr(node.target, "__name__", str(node.target))
    return (analysis.roles.get(name) in _SAVED_ROLES or node.target in _SAVED_OPS or "grouped_mm" in target_name
            or "scaled_dot_product" in target_name)


def _collective_at(sim) -> set[str]:
    """Producers whose consumers read a collective's output (an all-gather or a reduction)."""
    return {r.source for r in sim.redistributions if r.collective}


def recompute_prices(analysis: GraphAnalysis, sim, saved: SavedActivations, loss_parallel: set[str], profile,
                     tp: int, events=()) -> dict[str, RecomputePrice]:
    """Activations kept and forward time recomputed per step, for each kind in `KINDS`."""
    member = layer_membership(analysis)
    none = activation_memory(saved, sim, loss_parallel)
    out = {"none": RecomputePrice(sum(none.values()), 0.0)}
    if not member:
        return {k: out["none"] for k in KINDS}
    inputs = _stage_inputs(analysis, sim, member)
    collective = _collective_at(sim)
    forward_comm = sum(e.time(profile, tp) for e in events if e.phase == "forward" and e.node in member)
    times = {n.name: node_compute(analysis, sim, n, profile)[0] for n in analysis.graph.nodes if n.name in member}

    def outside(e: SavedTensor) -> bool:
        return e.consumer not in member

    full = activation_memory(saved, sim, loss_parallel, keep=outside)
    out["full"] = RecomputePrice(sum(full.values()) + sum(inputs.values()), sum(times.values()) + forward_comm)

    # torch's selective checkpoint caches the output of every op it must save, whether or not a
    # backward reads it (o_proj's output feeds an add that saves nothing): price outputs, not reads
    saved_ops = [n for n in analysis.graph.nodes if n.name in member and _is_saved_op(analysis, n.name)]
    outputs = sum(_output_bytes(sim, n) for n in saved_ops)
    internal = activation_memory(saved, sim, loss_parallel,
                                 keep=lambda e: e.internal and e.consumer in member and _is_saved_op(analysis, e.consumer))
    gathered = {(r.source, r.dst): int(r.nbytes / (tp if "Shard" in r.dst else 1))
                for r in sim.redistributions if r.collective and r.consumer in member}
    kept_nodes = {n.name for n in saved_ops}
    extra = sum(b for n, b in inputs.items() if n not in kept_nodes)
    cheap = sum(t for n, t in times.items() if not _is_saved_op(analysis, n))
    total = sum(full.values()) + outputs + sum(internal.values()) + sum(gathered.values()) + extra
    out["selective"] = RecomputePrice(total, cheap)
    return out


def _output_bytes(sim, node) -> int:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    spec = sim.specs.get(node.name)
    specs = spec if isinstance(spec, (tuple, list)) else [spec] * len(vals)
    return sum(int(tensor_bytes(v) * local_fraction(sp)) for v, sp in zip(vals, specs) if isinstance(v, torch.Tensor))


def _stage_inputs(analysis: GraphAnalysis, sim, member: dict[str, str]) -> dict[str, int]:
    """Per-rank bytes of the tensors each layer's stage receives from outside it (what a
    checkpointed layer keeps), each producer once; parameters and user inputs are not activations."""
    before = boundary_sources(sim)
    out: dict[str, int] = {}
    for n in analysis.graph.nodes:
        unit = member.get(n.name)
        if unit is None:
            continue
        for a in n.all_input_nodes:
            if a.op == "placeholder" or member.get(a.name) == unit or a.name in out or not isinstance(a.meta.get("val"), torch.Tensor):
                continue
            spec = before.get(a.name, sim.specs.get(a.name))
            out[a.name] = int(tensor_bytes(a.meta["val"]) * local_fraction(spec))
    return out

