"""Pass 4 — choose: each region's strategy by estimated step time and per-rank memory.

The label pass says which regions *can* run sharded. Here every legal region gets its strategies
(`cost/strategies.py`: replicate, tensor parallel, sequence parallel; vocab-parallel or
replicated embedding; loss-parallel, gathered or replicated LM head) under each residual-stream
layout, priced with the placement simulator (exact collectives, forward and backward), a
roofline per node on the hardware profile, and per-rank memory (parameters, gradients, Adam
state, activations autograd saves). The exact solver then picks the fastest plan within the
memory budget.

Default budget (no `memory_budget`): the smallest per-rank memory any legal plan reaches —
parameters at ~1/tp as autoparallel defaults to, and activations as sharded as the model allows —
within the profile's device memory; among plans at that memory, the fastest. On a decoder that
is Megatron TP + SP (TP alone where the sequence cannot be split). `memory_budget=` (bytes, or a
string like "24GiB"; "device" = the profile's device memory; "none" = no limit) trades memory for
speed: a tiny model on a high-latency link is then replicated, a decode step (seq 1) skips SP.
"""

from __future__ import annotations

import math
import time

from torch.distributed.tensor import Replicate
from torch.distributed.tensor.placement_types import Placement

from autoshard.choose.assemble import assemble
from autoshard.choose.boundaries import region_boundaries, sharded_outputs
from autoshard.choose.budget import budget_error, layout_note, resolve_budget, resolve_hardware
from autoshard.choose.params import expert_parallel_params, param_placements, reconcile_ties, region_params, unused_parameter_splits
from autoshard.choose.pricer import Pricer, estimate_plan
from autoshard.cost.strategies import LayoutCosts, expert_parallel_decided, solve, solve_subset
from autoshard.graph.label import Candidate, Labels
from autoshard.graph.simulate import PlacementSimulator
from autoshard.schema.errors import MemoryBudgetError, PlanError
from autoshard.schema.plan import REPLICATED_STREAM, SP_STREAM, STREAM_TEXT, Plan, placement_str

REPLICATE = Replicate()


def select_candidates(labels: Labels) -> list[Candidate]:
    """Every legal candidate, first come first served on shared linears (groups before singles)."""
    taken: set[str] = set()
    chosen = []
    for c in labels.candidates:
        names = set(c.column_nodes) | set(c.row_nodes)
        if c.legal and not names & taken:
            chosen.append(c)
            taken |= names
    return chosen


def choose(labels: Labels, simulator: PlacementSimulator, mesh_info: dict, sequence_parallel: bool | None = None, *,
           hardware=None, memory_budget=None, pinned: dict[str, str] | None = None, expert_parallel: bool | None = None) -> Plan:
    """Pick each region's strategy and the stream layout; return the Plan with its estimate.

    `hardware`: a profile name ("h100", "cpu-gloo", ...), a JSON path from `autoshard calibrate`, or a
    HardwareProfile (default: cpu-gloo for CPU meshes, h100-sxm otherwise). `memory_budget`: see
    the module docstring. `sequence_parallel`: True/False forces the stream layout. `pinned`:
    parameter FQN -> placement text of parameters already distributed (a module planned for other
    inputs): each region keeps only the strategies that leave its parameters where they are.
    `expert_parallel`: None weighs it against expert tensor parallel per MoE block (under the
    default budget each block takes it alone, where it is faster than ETP and holds no more
    memory; under a budget the solver weighs it with the rest); True runs every MoE block it can
    expert parallel; False never.
    """
    started = time.perf_counter()
    analysis = labels.analysis
    regions = select_candidates(labels)
    params, reasons, notes = param_placements(analysis, regions)
    params, tie_notes, demoted = reconcile_ties(analysis, params, reasons, regions)
    notes += tie_notes
    regions = [c for c in regions if id(c) not in demoted]
    profile = resolve_hardware(hardware, mesh_info)
    layouts = [REPLICATED_STREAM] if sequence_parallel is False else [SP_STREAM] if sequence_parallel else [SP_STREAM, REPLICATED_STREAM]
    pricer = Pricer(analysis, simulator, regions, params, profile, mesh_info["tp"], expert_parallel)
    priced = [pricer.layout(layout) for layout in layouts]
    viable = [c for c in priced if c.viable]
    if not viable:  # sequence_parallel=True asked for what the model cannot do: say so, plan the replicated stream
        notes.append("sequence parallel not used (sequence_parallel=True asked for it): " + "; ".join(c.why for c in priced))
        layouts = [REPLICATED_STREAM]
        priced = viable = [pricer.layout(REPLICATED_STREAM)]
    if pinned:
        for layout_costs in viable:
            _pin(layout_costs, pricer.region_params, params, pinned)
    default_ep = expert_parallel is None and memory_budget is None   # the default: EP per block where it wins alone
    decided = {c.layout: expert_parallel_decided(c) if default_ep else c for c in viable}
    budget = resolve_budget(memory_budget, list(decided.values()), profile)
    solve_started = time.perf_counter()
    solutions = [(solve_subset(c, decided[c.layout], budget["bytes"]), c) for c in viable]
    unconstrained = [(solve(c, math.inf), c) for c in viable]
    solve_s = time.perf_counter() - solve_started
    feasible = [(s, c) for s, c in solutions if s is not None]
    if not feasible:
        raise MemoryBudgetError(budget_error(budget, viable))
    order = {layout: i for i, layout in enumerate(layouts)}
    sol, costs = min(feasible, key=lambda x: (x[0].time_s, x[0].memory, order[x[0].layout]))
    fastest = min((s.time_s for s, _ in unconstrained if s), default=sol.time_s)
    budget["binding"] = fastest < sol.time_s * (1 - 1e-9)
    picked = {id(c): costs.options[i][sol.choice[i]] for i, c in enumerate(regions)}

    final_params = {}
    for c in regions:
        if picked[id(c)].sharded and picked[id(c)].name != "ep":
            final_params.update(region_params(analysis, c))
    final_params = {f: p for f, p in params.items() if f in final_params}
    ep = [c for c in regions if picked[id(c)].name == "ep"]
    for c in ep:
        placed, why = expert_parallel_params(c.expert_block, c.expert_block.experts, mesh_info["tp"])
        final_params.update(placed)
        reasons.update(why)
    unused, unused_reasons = unused_parameter_splits(analysis, mesh_info["tp"])
    final_params.update(unused)
    reasons.update(unused_reasons)
    boundaries = region_boundaries(analysis, regions, picked, sol.layout)
    kept_sharded = sharded_outputs(regions, picked)
    sim = simulator.run(final_params, boundaries, sharded_outputs=kept_sharded, expert_parallel=[c.expert_block for c in ep])
    for layout_costs in priced:
        if not layout_costs.viable:
            notes.append(f"{STREAM_TEXT[layout_costs.layout]} stream not used: {layout_costs.why}")
    if len(viable) > 1:
        notes.append(layout_note(sol, feasible, unconstrained, budget))
    if pricer.saved.untraced:
        notes.append(pricer.saved.untraced + "; strategies priced on parameters, gradients and communication")
    plan = assemble(analysis, labels, regions, picked, final_params, reasons, notes, sol.layout, sim, mesh_info, kept_sharded, costs, sol, priced)
    plan.expert_parallel = {c.expert_block.name: boundaries[c.expert_block.block_in].dim for c in ep}
    plan.estimate = estimate_plan(analysis, sim, plan, profile, mesh_info["tp"], pricer.saved)
    plan.estimate["budget"] = budget
    plan.estimate["solver"] = {"seconds": solve_s, "pricing_seconds": solve_started - started,
                               "layouts": {s.layout: {"time_s": s.time_s, "memory_bytes": s.memory} for s, _ in feasible}}
    return plan


def _pin(costs: LayoutCosts, owned: list[dict], params: dict[str, Placement], pinned: dict[str, str]) -> None:
    """Drop the options that would move a pinned parameter: a region whose parameters are sharded
    (with the placement this graph would give them) must stay sharded, a replicated one replicated."""
    for i, own in enumerate(owned):
        mine = [f for f in own if f in pinned]
        if not mine:
            continue
        sharded = any(pinned[f] != placement_str(REPLICATE) for f in mine)
        same = all(placement_str(params.get(f, REPLICATE)) == pinned[f] for f in mine)
        keep = [o for o in costs.options[i] if o.sharded == sharded] if (same or not sharded) else []
        if keep:
            costs.options[i] = keep
