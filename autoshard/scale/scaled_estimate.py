"""The cost model's estimate of all `N` layers, from the graph of a `K`-layer truncation.

`plan.estimate` (`choose/pricer.py` `estimate_plan`) sums, over the graph, the compute time of each
node, the collectives moved at each node, the saved activations attributed to each node and the
parameter state of each parameter. In the truncation the template layer `T = K - 2` stands for
the middle layers T..N-2 (`expand.py`), so the estimate of the full model is the same sums with
every node and parameter of layer T counted `N - K + 1` times, and everything else once — the
per-layer parts times the layer count, with no second capture.

One part is not a per-node sum: the gradient all-reduces of replicated parameters, which are
bucketed (`estimate.gradient_reductions`: backward order, up to 25 MiB per bucket, one all-reduce
per bucket). Those buckets are packed again over the full model's parameter list.

    est = scaled_estimate(run, profile, names)   # run: the truncation's PlanRun; names: LayerNames for N
"""

from __future__ import annotations

from types import SimpleNamespace

from autoshard.cost.activation import SavedActivations, saved_activations
from autoshard.cost.estimate import BUCKET_CAP_BYTES, CommEvent, comm_events, comm_summary, compute_times, estimate_record
from autoshard.cost.memory import MemoryBreakdown, activation_memory, state_memory, tensor_bytes
from autoshard.scale.names import LayerNames
from autoshard.schema.units import pack_buckets

GRAD_REDUCE_WHY = "Partial gradients"  # prefix of the bucketed gradient all-reduce events


def scaled_estimate(run, profile, names: LayerNames, saved: SavedActivations | None = None) -> dict:
    """`plan.estimate` of the truncation (`run`: its PlanRun) grown to `names.n_layers` layers."""
    analysis, plan, sim = run.analysis, run.plan, run.simulation
    tp = plan.mesh["tp"]
    saved = saved if saved is not None else saved_activations(analysis, profile.device_type)
    copies = names.n_layers - names.captured + 1

    def weight(name: str) -> int:
        return copies if names.layer_of.get(name) == names.template else 1

    grad_reduce = {f for f, p in plan.params.items() if p.grad_reduce}
    events = comm_events(analysis, sim, grad_reduce)
    per_node = [(e, weight(e.node)) for e in events if not e.why.startswith(GRAD_REDUCE_WHY)]
    per_node += [(e, 1) for e in _gradient_buckets(analysis, sim, grad_reduce, names, copies)]
    comm = sum(e.time(profile, tp) * w for e, w in per_node)
    compute = sum(t * weight(n) for n, t in compute_times(analysis, sim, profile).items())

    mem = MemoryBreakdown()
    for ph, fqn in analysis.captured.param_fqns.items():
        one = state_memory(_OneParam(analysis, ph), sim)
        for _ in range(weight(ph)):
            mem = mem + one
    acts = activation_memory(saved, sim, set(plan.loss_parallel))
    mem.activations = sum(b * weight(n) for n, b in acts.items())
    return {
        **estimate_record(profile, tp, compute, comm, mem, _weighted_summary(per_node)),
        "scaled": {"captured_layers": names.captured, "n_layers": names.n_layers, "template_layer": names.template,
                   "how": f"per-node costs of the {names.captured}-layer truncation, layer {names.template} counted "
                          f"{copies} times (layers {names.template}..{names.n_layers - 2}); gradient buckets repacked"},
    }


class _OneParam:
    """The analysis seen with a single parameter, so `state_memory` prices one parameter."""

    def __init__(self, analysis, ph):
        self.nodes, self.roles = analysis.nodes, analysis.roles
        self.captured = SimpleNamespace(param_fqns={ph: analysis.captured.param_fqns[ph]}, tied=analysis.captured.tied)


def _gradient_buckets(analysis, sim, grad_reduce: set[str], names: LayerNames, copies: int) -> list[CommEvent]:
    """`estimate.gradient_reductions` over the full model: the truncation's replicated parameters in
    backward order, the template layer's repeated `copies` times in place, packed the same way."""
    if not grad_reduce:
        return []
    captured = analysis.captured
    order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    rows = []  # (first use, fqn, bytes, copies)
    for ph, fqn in captured.param_fqns.items():
        spec = sim.specs.get(ph)
        if fqn in captured.tied or spec is None or not hasattr(spec, "placements") or not spec.placements[0].is_replicate():
            continue
        node = analysis.nodes[ph]
        first = min((order[u.name] for u in node.users), default=-1)
        rows.append((first, fqn, tensor_bytes(node.meta["val"]), copies if names.layer_of.get(ph) == names.template else 1))
    rows.sort(key=lambda r: -r[0])
    # the template layer's parameters are contiguous in backward order: repeat the block in place
    sequence = []
    block = [r for r in rows if r[3] > 1]
    emitted = False
    for r in rows:
        if r[3] > 1:
            if not emitted:
                for i in range(copies):
                    sequence += [(f"{fqn}#{i}" if i else fqn, size, fqn) for _, fqn, size, _ in block]
                emitted = True
            continue
        sequence.append((r[1], r[2], r[1]))
    buckets = pack_buckets((((key, nbytes, fqn), nbytes) for key, nbytes, fqn in sequence), BUCKET_CAP_BYTES)
    out = []
    for b in buckets:
        members = [(k, n) for k, n, fqn in b if fqn in grad_reduce]
        if members:
            out.append(CommEvent(members[0][0], "backward", "all_reduce", sum(n for _, n in members),
                                 f"{GRAD_REDUCE_WHY} of {len(members)} replicated parameter(s)"))
    return out


def _weighted_summary(events: list[tuple[CommEvent, int]]) -> dict:
    out = comm_summary([])
    for e, w in events:
        phase = out[e.phase]
        phase["bytes"] += e.nbytes * w
        phase["counts"][e.collective] = phase["counts"].get(e.collective, 0) + w
    for phase in out.values():
        phase["counts"] = dict(sorted(phase["counts"].items()))
    return out
