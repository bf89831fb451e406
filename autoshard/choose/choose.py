"""Pass 4 — choose: each region's strategy by estimated step time and per-rank memory.

The label pass says which regions *can* run sharded. Here every legal region gets its strategies
(`cost_models/strategies.py`: replicate, tensor parallel, sequence parallel; vocab-parallel or
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
import os
import re
import time
from dataclasses import asdict, dataclass

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement

from autoshard.cost.activation import saved_activations
from autoshard.cost.estimate import CommEvent, comm_events, compute_times, comm_summary, estimate_record
from autoshard.cost.hardware import HardwareProfile, get_profile
from autoshard.cost.memory import MemoryBreakdown, activation_memory, plan_memory, state_memory
from autoshard.cost.strategies import LayoutCosts, Option, min_memory, solve
from autoshard.schema.errors import PlanError
from autoshard.graph.analyse import GraphAnalysis, Role
from autoshard.graph.label import Candidate, Labels
from autoshard.graph.simulate import PlacementSimulator, Simulation
from autoshard.schema.plan import PLAN_FORMAT, BoundaryPlan, ParamPlan, Plan, RegionPlan, model_fingerprint, placement_str
from autoshard.schema.units import format_bytes

REPLICATE = Replicate()
# the two layouts of the residual stream: split on the sequence dim, or whole on every rank
SP_STREAM, REPLICATED_STREAM = "sequence_parallel", "replicated"


def select_candidates(labels: Labels) -> list[Candidate]:
    """Every legal candidate, first come first served on shared linears (groups before singles)."""
    taken: set[str] = set()
    chosen = []
    for c in labels.candidates:
        names = set(c.column) | set(c.row)
        if c.legal and not names & taken:
            chosen.append(c)
            taken |= names
    return chosen


def choose(labels: Labels, simulator: PlacementSimulator, mesh_info: dict, sequence_parallel: bool | None = None, *,
           hardware=None, memory_budget=None, pinned: dict[str, str] | None = None) -> Plan:
    """Pick each region's strategy and the stream layout; return the Plan with its estimate.

    `hardware`: a profile name ("h100", "cpu-gloo", ...), a JSON path from `autoshard calibrate`, or a
    HardwareProfile (default: cpu-gloo for CPU meshes, h100-sxm otherwise). `memory_budget`: see
    the module docstring. `sequence_parallel`: True/False forces the stream layout. `pinned`:
    parameter FQN -> placement text of parameters already distributed (a module planned for other
    inputs): each region keeps only the strategies that leave its parameters where they are.
    """
    started = time.perf_counter()
    analysis = labels.analysis
    regions = select_candidates(labels)
    params, reasons, notes = _param_placements(analysis, regions)
    params, tie_notes = _reconcile_ties(analysis, params, reasons, regions)
    notes += tie_notes
    regions = [c for c in regions if not getattr(c, "_demoted", False)]
    profile = resolve_hardware(hardware, mesh_info)
    layouts = [REPLICATED_STREAM] if sequence_parallel is False else [SP_STREAM] if sequence_parallel else [SP_STREAM, REPLICATED_STREAM]
    pricer = Pricer(analysis, simulator, regions, params, profile, mesh_info["tp"])
    priced = [pricer.layout(layout) for layout in layouts]
    viable = [c for c in priced if c.viable]
    if not viable:  # sequence_parallel=True asked for what the model cannot do: say so, plan the replicated stream
        notes.append("sequence parallel not used (sequence_parallel=True asked for it): " + "; ".join(c.why for c in priced))
        layouts = [REPLICATED_STREAM]
        priced = viable = [pricer.layout(REPLICATED_STREAM)]
    if pinned:
        for layout_costs in viable:
            _pin(layout_costs, pricer.region_params, params, pinned)
    budget = resolve_budget(memory_budget, viable, profile)
    solve_started = time.perf_counter()
    solutions = [(solve(c, budget["bytes"]), c) for c in viable]
    unconstrained = [(solve(c, math.inf), c) for c in viable]
    solve_s = time.perf_counter() - solve_started
    feasible = [(s, c) for s, c in solutions if s is not None]
    if not feasible:
        raise PlanError(_budget_error(budget, viable))
    order = {layout: i for i, layout in enumerate(layouts)}
    sol, costs = min(feasible, key=lambda x: (x[0].time_s, x[0].memory, order[x[0].layout]))
    fastest = min((s.time_s for s, _ in unconstrained if s), default=sol.time_s)
    budget["binding"] = fastest < sol.time_s * (1 - 1e-9)
    picked = {id(c): costs.options[i][sol.choice[i]] for i, c in enumerate(regions)}

    final_params = {}
    for c in regions:
        if picked[id(c)].sharded:
            final_params.update(_region_params(analysis, c))
    final_params = {f: p for f, p in params.items() if f in final_params}
    boundaries = _boundaries(analysis, regions, picked, sol.layout)
    sharded_outputs = _sharded_outputs(regions, picked)
    sim = simulator.run(final_params, boundaries, sharded_outputs=sharded_outputs)
    for layout_costs in priced:
        if not layout_costs.viable:
            notes.append(f"{_LAYOUT_TEXT[layout_costs.layout]} stream not used: {layout_costs.why}")
    if len(viable) > 1:
        notes.append(_layout_note(sol, feasible, unconstrained, budget))
    if pricer.saved.untraced:
        notes.append(pricer.saved.untraced + "; strategies priced on parameters, gradients and communication")
    plan = _assemble(analysis, labels, regions, picked, final_params, reasons, notes, sol.layout, sim, mesh_info, sharded_outputs, costs, sol, priced)
    plan.estimate = estimate_plan(analysis, sim, plan, profile, mesh_info["tp"], pricer.saved)
    plan.estimate["budget"] = budget
    plan.estimate["solver"] = {"seconds": solve_s, "pricing_seconds": solve_started - started,
                               "layouts": {s.layout: {"time_s": s.time_s, "memory_bytes": s.memory} for s, _ in feasible}}
    return plan


_LAYOUT_TEXT = {SP_STREAM: "sequence-parallel", REPLICATED_STREAM: "replicated"}


def _pin(costs: LayoutCosts, region_params: list[dict], params: dict[str, Placement], pinned: dict[str, str]) -> None:
    """Drop the options that would move a pinned parameter: a region whose parameters are sharded
    (with the placement this graph would give them) must stay sharded, a replicated one replicated."""
    for i, own in enumerate(region_params):
        mine = [f for f in own if f in pinned]
        if not mine:
            continue
        sharded = any(pinned[f] != placement_str(REPLICATE) for f in mine)
        same = all(placement_str(params.get(f, REPLICATE)) == pinned[f] for f in mine)
        keep = [o for o in costs.options[i] if o.sharded == sharded] if (same or not sharded) else []
        if keep:
            costs.options[i] = keep


# ---- hardware and budget ----------------------------------------------------------------------------
def resolve_hardware(hardware, mesh_info: dict) -> HardwareProfile:
    if hardware is None:
        hardware = "cpu-gloo" if mesh_info.get("device_type", "cpu") == "cpu" else "h100-sxm"
    try:
        return get_profile(hardware)
    except (TypeError, ValueError, OSError) as e:
        raise PlanError(f"hardware={hardware!r}: {e}") from None


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> float:
    """`memory_budget` as bytes: a number, "24GiB" / "500 MB", "none" (no limit), "device"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise PlanError(f"memory_budget must be positive, got {value}")
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"memory_budget={value!r}: give bytes (int), a size like '24GiB' or '500MB', 'device' or 'none'")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def resolve_budget(memory_budget, costs: list[LayoutCosts], profile: HardwareProfile) -> dict:
    smallest = min(min_memory(c) for c in costs)
    device = profile.device_memory_bytes
    if memory_budget is None:
        return {"policy": "default", "bytes": smallest, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": "default: the smallest per-rank memory a legal plan reaches (parameters ~1/tp, activations as "
                       "sharded as the model allows), within the device memory; the fastest plan at that memory"}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() in ("none", "inf", "unlimited"):
        return {"policy": "none", "bytes": math.inf, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": "memory_budget='none': no memory limit, the fastest plan"}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "device":
        return {"policy": "device", "bytes": device, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": f"memory_budget='device': the {profile.name} profile's {device / 2**30:.1f} GiB per rank"}
    limit = parse_bytes(memory_budget)
    return {"policy": "user", "bytes": limit, "smallest_feasible_bytes": smallest, "device_bytes": device,
            "why": f"memory_budget={_fmt_bytes(limit)} per rank"}


def _budget_error(budget: dict, costs: list[LayoutCosts]) -> str:
    best = min(costs, key=min_memory)
    smallest = min_memory(best)
    limit = budget["bytes"]
    what = "the device memory of the hardware profile" if budget["policy"] in ("default", "device") else "memory_budget"
    return (f"no plan fits {what} ({_fmt_bytes(limit)} per rank): the smallest per-rank memory any legal plan reaches is "
            f"{_fmt_bytes(smallest)} ({smallest} bytes: every shardable region sharded, {_LAYOUT_TEXT[best.layout]} stream). "
            "Raise memory_budget, shard over more ranks, or shorten the sequence / batch")


def _fmt_bytes(n: float) -> str:
    return format_bytes(n, digits=2)


def _layout_note(sol, feasible, unconstrained, budget) -> str:
    parts = []
    for s, c in feasible:
        parts.append(f"{_LAYOUT_TEXT[s.layout]}: {s.time_s * 1e3:.3f} ms, {_fmt_bytes(s.memory)}/rank")
    missing = {c.layout for s, c in unconstrained if s} - {s.layout for s, _ in feasible}
    for layout in missing:
        parts.append(f"{_LAYOUT_TEXT[layout]}: over the budget")
    return f"residual stream {_LAYOUT_TEXT[sol.layout]} (best plans per stream layout — " + "; ".join(parts) + f"; budget: {budget['why']})"


# ---- pricing ----------------------------------------------------------------------------------------
@dataclass
class _Priced:
    compute: dict            # owner -> seconds
    comm: dict               # owner -> seconds
    comm_bytes: dict         # owner -> {collective: bytes}
    memory: dict             # owner -> MemoryBreakdown


class Pricer:
    """Prices the regions' strategies under a layout from a few whole-graph simulations."""

    STREAM = -1

    def __init__(self, analysis, simulator, regions, params, profile, tp):
        self.analysis, self.simulator, self.regions, self.params = analysis, simulator, regions, params
        self.profile, self.tp = profile, tp
        self.saved = saved_activations(analysis, profile.device_type)
        self.owner: dict[str, int] = {}
        for i, c in enumerate(regions):
            for n in list(c.nodes) + c.column + c.row:
                self.owner[n] = i
        self.param_owner = {}
        for ph, fqn in analysis.captured.param_fqns.items():
            users = sorted(analysis.nodes[ph].users, key=lambda u: u.name)
            self.param_owner[fqn] = next((self.owner[u.name] for u in users if u.name in self.owner), self.STREAM)
        self.region_params = [_region_params(analysis, c) for c in regions]
        self.units = _coupled(analysis, self.region_params)

    def layout(self, layout: str) -> LayoutCosts:
        costs = LayoutCosts(layout)
        if layout == SP_STREAM:
            why = self._sp_unavailable()
            if why:
                return LayoutCosts(layout, viable=False, why=why)
        all_sharded = {id(c): Option("sharded", True) for c in self.regions}
        shard = self._price(all_sharded, layout)
        if layout == SP_STREAM and shard[1].communication(planned=False):
            r = shard[1].communication(planned=False)[0]
            return LayoutCosts(layout, viable=False, why=f"DTensor would add {r.collective} at {r.consumer} ({r.src} -> {r.dst})")
        variants = {"sharded": shard}
        heads = [c for c in self.regions if c.kind == "column_output"]
        if layout == REPLICATED_STREAM:
            variants["replicate"] = self._price({id(c): Option("replicate", False) for c in self.regions}, layout)
        elif heads:
            variants["replicate"] = self._price({**all_sharded, **{id(c): Option("replicate", False) for c in heads}}, layout)
        if any(c.loss_nodes for c in heads):
            variants["gather"] = self._price({**all_sharded, **{id(c): Option("gather", True) for c in heads if c.loss_nodes}}, layout)
        priced = shard[0]
        costs.stream_compute_s = priced.compute.get(self.STREAM, 0.0)
        costs.stream_comm_s = priced.comm.get(self.STREAM, 0.0)
        costs.stream_time_s = costs.stream_compute_s + costs.stream_comm_s
        costs.stream_memory = priced.memory.get(self.STREAM, MemoryBreakdown())
        for i, c in enumerate(self.regions):
            opts = []
            for name, sharded, variant in self._option_names(c, layout):
                if variant not in variants:
                    continue
                p = variants[variant][0]
                comp, comm = p.compute.get(i, 0.0), p.comm.get(i, 0.0)
                opts.append(Option(name, sharded, comp + comm, comp, comm, p.memory.get(i, MemoryBreakdown()), p.comm_bytes.get(i, {}),
                                   note=_OPTION_TEXT[name]))
            costs.options.append(opts)
        costs.units = self.units
        return costs

    def _option_names(self, c: Candidate, layout: str):
        if c.kind == "column_row":
            return [("replicate", False, "replicate"), ("tp", True, "sharded")] if layout == REPLICATED_STREAM else [("tp_sp", True, "sharded")]
        if c.kind == "embedding":
            return [("replicate", False, "replicate"), ("vocab_parallel", True, "sharded")] if layout == REPLICATED_STREAM else [("vocab_parallel", True, "sharded")]
        sharded = ("loss_parallel" if c.loss_nodes else "column_gather_output", True, "sharded")
        out = [("replicate", False, "replicate"), sharded]
        if c.loss_nodes:
            out.append(("column_gather", True, "gather"))
        return out

    def _sp_unavailable(self) -> str:
        exits = [e for c in self.regions for e in (c.row if c.kind == "column_row" else c.column if c.kind == "embedding" else [])]
        if not exits:
            return "no region to leave on sequence shards"
        if all(seq_dim(self.analysis, e) is None for e in exits):
            return "no sequence dimension to split (a sequence of 1 is specialised by export): sequence parallel would only add collectives"
        return ""

    def _price(self, picked: dict, layout: str):
        params = {}
        for i, c in enumerate(self.regions):
            if picked[id(c)].sharded:
                params.update(self.region_params[i])
        params = {f: p for f, p in self.params.items() if f in params}
        boundaries = _boundaries(self.analysis, self.regions, picked, layout)
        sim = self.simulator.run(params, boundaries, sharded_outputs=_sharded_outputs(self.regions, picked))
        grad_reduce = set(_replicated_used_on_shards(self.analysis, sim))
        events = comm_events(self.analysis, sim, grad_reduce)
        comm_owner = dict(self.owner)
        for i, c in enumerate(self.regions):
            for x in _entries(self.analysis, c, layout):
                comm_owner[x] = i
        out = _Priced({}, {}, {}, {})
        for node, t in compute_times(self.analysis, sim, self.profile).items():
            o = self.owner.get(node, self.STREAM)
            out.compute[o] = out.compute.get(o, 0.0) + t
        for e in events:
            if e.why.startswith("Partial gradients"):
                o = self.param_owner.get(e.node, self.STREAM)
            else:
                o = comm_owner.get(e.node, self.STREAM)
            out.comm[o] = out.comm.get(o, 0.0) + e.time(self.profile, self.tp)
            per = out.comm_bytes.setdefault(o, {})
            per[e.collective] = per.get(e.collective, 0) + e.nbytes
        for node, b in activation_memory(self.saved, sim, _loss_parallel(self.analysis, sim)).items():
            o = self.owner.get(node, self.STREAM)
            out.memory.setdefault(o, MemoryBreakdown()).activations += b
        for fqn, mem in _param_state(self.analysis, sim).items():
            o = self.param_owner.get(fqn, self.STREAM)
            out.memory[o] = out.memory.get(o, MemoryBreakdown()) + mem
        return out, sim


_OPTION_TEXT = {
    "replicate": "replicated: every rank computes the whole region, no communication",
    "tp": "tensor parallel: all-reduce after the row linear (backward: all-reduce at the column input)",
    "tp_sp": "tensor + sequence parallel: all-gather in, reduce-scatter out (backward: the reverse)",
    "vocab_parallel": "vocab-parallel table: masked lookup, partial rows reduced",
    "loss_parallel": "column-parallel LM head with loss parallel: logits never gathered",
    "column_gather": "column-parallel LM head, logits all-gathered before a replicated loss",
    "column_gather_output": "column-parallel LM head, logits gathered for the caller",
}


def _param_state(analysis, sim) -> dict[str, MemoryBreakdown]:
    out = {}
    for ph, fqn in analysis.captured.param_fqns.items():
        single = _SingleParam(analysis, ph)
        out[fqn] = state_memory(single, sim)
    return out


class _SingleParam:
    """A view of the analysis with one parameter, so `state_memory` prices parameters one by one."""

    def __init__(self, analysis, ph):
        self.nodes, self.roles = analysis.nodes, analysis.roles
        self.captured = type("C", (), {"param_fqns": {ph: analysis.captured.param_fqns[ph]}, "tied": analysis.captured.tied})


def _coupled(analysis, region_params: list[dict]) -> list[list[int]]:
    """Regions sharing a parameter (a tied embedding / LM head) must be sharded together."""
    tied = analysis.captured.tied
    canon = [{tied.get(f, f) for f in ps} for ps in region_params]
    units: list[list[int]] = []
    for i, names in enumerate(canon):
        hit = [u for u in units if any(canon[j] & names for j in u)]
        merged = [i] + [j for u in hit for j in u]
        units = [u for u in units if u not in hit] + [sorted(merged)]
    return sorted(units)


def _loss_parallel(analysis, sim) -> set[str]:
    return {n.name for n in analysis.of_role(Role.LOSS) if _vocab_sharded(analysis, sim, n)}


def _region_params(analysis, c: Candidate) -> dict[str, Placement]:
    params, _, _ = _param_placements(analysis, [c])
    return params


def estimate_plan(analysis, sim, plan: Plan, profile: HardwareProfile, tp: int, saved) -> dict:
    """plan.estimate: step time (compute / communication) and per-rank memory, from the final plan."""
    grad_reduce = [f for f, p in plan.params.items() if p.grad_reduce]
    events = comm_events(analysis, sim, grad_reduce)
    compute = sum(compute_times(analysis, sim, profile).values())
    comm = sum(e.time(profile, tp) for e in events)
    mem = plan_memory(analysis, sim, saved, set(plan.loss_parallel))
    return estimate_record(profile, tp, compute, comm, mem, comm_summary(events))


# ---- parameters -----------------------------------------------------------------------------------
def _param_placements(analysis: GraphAnalysis, chosen: list[Candidate]):
    params: dict[str, Placement] = {}
    reasons: dict[str, tuple[str, str | None]] = {}
    for c in chosen:
        name = region_name(analysis, c)
        for n in c.column:
            node = analysis.nodes[n]
            if c.kind == "embedding":
                _set(params, reasons, analysis.param_of(node.args[0]), Shard(0), "vocab-parallel table: rows (vocab) split over tp", name)
                continue
            why = "column-parallel LM head, logits vocab-sharded" if c.kind == "column_output" else "column-parallel: output features split over tp"
            _set(params, reasons, analysis.param_of(node.args[1]), Shard(0), why, name)
            if len(node.args) > 2 and analysis.param_of(node.args[2]):
                _set(params, reasons, analysis.param_of(node.args[2]), Shard(0), "bias of a column-parallel linear", name)
        for n in c.row:
            node = analysis.nodes[n]
            _set(params, reasons, analysis.param_of(node.args[1]), Shard(1), "row-parallel: input features split, partial sums reduced after", name)
            if len(node.args) > 2 and analysis.param_of(node.args[2]):
                _set(params, reasons, analysis.param_of(node.args[2]), REPLICATE, "bias of a row-parallel linear, added once after the reduction", name)
    return params, reasons, []


def _set(params, reasons, fqn, placement, why, region):
    params[fqn] = placement
    reasons[fqn] = (why, region)


def _reconcile_ties(analysis, params, reasons, chosen):
    """Tied parameters share one tensor, so all their uses need the same placement."""
    notes = []
    groups: dict[str, list[str]] = {}
    for fqn, canon in analysis.captured.tied.items():
        groups.setdefault(canon, [canon]).append(fqn)
    in_graph = {fqn for ph, fqn in analysis.captured.param_fqns.items() if analysis.nodes[ph].users}
    for canon, names in groups.items():
        # an alias whose placeholder is unused (export reads the tied tensor once) follows canon
        placements = {placement_str(params.get(n, REPLICATE)) for n in names if n in in_graph}
        if len(placements) > 1:
            for c in chosen:
                touched = {analysis.param_of(analysis.nodes[x].args[0 if c.kind == "embedding" else 1]) for x in c.column + c.row}
                if touched & set(names):
                    c._demoted = True
                    for fqn in touched:
                        params.pop(fqn, None)
                        reasons.pop(fqn, None)
            notes.append(f"tied parameters {', '.join(names)} need one placement ({' vs '.join(sorted(placements))}); their regions stay replicated")
    # A table sharded by another region (a tied LM head) but looked up by an embedding that is
    # not vocab-parallel would be indexed as if it were whole: keep those regions replicated.
    looked_up = {c.column[0] for c in chosen if c.kind == "embedding" and not getattr(c, "_demoted", False)}
    for node in analysis.of_role(Role.EMBEDDING):
        fqn = analysis.param_of(node.args[0])
        if node.name in looked_up or fqn not in params:
            continue
        for c in chosen:
            touched = {analysis.param_of(analysis.nodes[x].args[0 if c.kind == "embedding" else 1]) for x in c.column + c.row}
            if fqn in touched:
                c._demoted = True
                for f in touched:
                    params.pop(f, None)
                    reasons.pop(f, None)
        notes.append(f"{fqn} is also an embedding table that cannot be vocab-parallel here; the regions sharding it stay replicated")
    return params, notes


def seq_dim(analysis: GraphAnalysis, name: str) -> int | None:
    val = analysis.nodes[name].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    symbols = analysis.captured.seq_dim_symbols
    for i, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & symbols:
            return i
    return None


def _share_tied_placements(analysis: GraphAnalysis, param_plans: dict[str, ParamPlan]) -> None:
    """All names of one tied tensor carry the placement of the name the graph actually reads."""
    captured = analysis.captured
    used = {fqn for ph, fqn in captured.param_fqns.items() if analysis.nodes[ph].users}
    groups: dict[str, list[str]] = {}
    for fqn, canon in captured.tied.items():
        groups.setdefault(canon, [canon]).append(fqn)
    for canon, names in groups.items():
        source = next((n for n in names if n in used and n in param_plans), canon)
        if source not in param_plans:
            continue
        for n in names:
            if n != source or n not in param_plans:
                param_plans[n] = ParamPlan(**{**asdict(param_plans[source]), "fqn": n})
            param_plans[n].tied_to = captured.tied.get(n)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _covered(c: Candidate, chosen: list[Candidate]) -> bool:
    return any(set(c.column) <= set(x.column) for x in chosen)


def _vocab_sharded(analysis, sim, node) -> bool:
    spec = sim.specs.get(node.args[0].name)
    return isinstance(spec, DTensorSpec) and spec.placements[0].is_shard(len(spec.tensor_meta.shape) - 1)


def _replicated_used_on_shards(analysis: GraphAnalysis, sim: Simulation) -> dict[str, str]:
    """Replicated parameters that meet sharded activations: their gradients are partial sums."""
    out = {}
    for ph, fqn in analysis.captured.param_fqns.items():
        spec = sim.specs.get(ph)
        if not (isinstance(spec, DTensorSpec) and spec.placements[0].is_replicate()):
            continue
        for user in analysis.nodes[ph].users:
            others = [sim.specs.get(a.name) for a in user.all_input_nodes if a.name != ph]
            if any(isinstance(s, DTensorSpec) and not s.placements[0].is_replicate() for s in others):
                out[fqn] = fqn.rsplit(".", 1)[0]
                break
    return out


def _replicated_reason(fqn: str, grad_reduce: dict, stream: str) -> str:
    if fqn in grad_reduce:
        where = "sequence shards" if stream == "sequence_parallel" else "sharded activations"
        return f"replicated, applied to {where}: gradient summed over tp after backward"
    return "replicated: not part of any shardable region"


def _boundary_plans(analysis: GraphAnalysis, sim: Simulation, regions: list[Candidate], picked: dict, layout: str) -> list[BoundaryPlan]:
    roles = {}
    for c in regions:
        name = region_name(analysis, c)
        for x in c.inputs:
            roles.setdefault(_entry_node(analysis, x, layout), f"enter {name}: column linears read the whole activation")
        for e in c.row:
            roles[e] = f"leave {name}: reduce the row linear's partial sums"
        if c.kind == "embedding":
            roles[c.column[0]] = "vocab-parallel lookup: sum the masked partial rows"
        if picked[id(c)].name in ("gather", "column_gather"):
            for n in c.column:
                roles[n] = "logits gathered before the loss"
    out = []
    for r in sim.redistributions:
        if not r.planned:
            continue
        if r.consumer == "output":
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                    reason="output: gathered for the caller", kind="output"))
        else:
            out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                    reason=roles.get(r.source, "region boundary")))
    for r in sim.op_collectives:
        out.append(BoundaryPlan(node=r.source, src=r.src, dst=r.dst, collective=r.collective, bytes=r.nbytes,
                                reason="loss parallel: one value per row reduced across the vocab shards", kind="loss"))
    return out
# ---- boundaries -----------------------------------------------------------------------------------
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
    return c.row if c.kind == "column_row" else c.column if c.kind == "embedding" else []


def _entries(analysis, c: Candidate, layout: str) -> list[str]:
    """Nodes whose boundary collectives belong to region `c`."""
    out = list(_exits(c))
    if c.kind != "embedding":
        out += [_entry_node(analysis, x, layout) for x in c.inputs]
    if c.kind == "column_output":
        out += c.column
    return out


def _boundaries(analysis: GraphAnalysis, regions: list[Candidate], picked: dict, layout: str) -> dict[str, Placement]:
    boundaries: dict[str, Placement] = {}
    for c in regions:
        opt = picked[id(c)]
        if c.kind == "column_output":
            if opt.sharded or layout == SP_STREAM:  # a replicated head on the sequence-parallel stream still reads it whole
                for x in c.inputs:
                    boundaries[_entry_node(analysis, x, layout)] = REPLICATE
            if opt.name in ("gather", "column_gather"):
                for n in c.column:
                    boundaries[n] = REPLICATE  # logits gathered before the (replicated) loss
            continue
        if not opt.sharded:
            continue
        for e in _exits(c):
            d = seq_dim(analysis, e) if layout == SP_STREAM else None
            boundaries[e] = Shard(d) if d is not None else REPLICATE
        if c.kind != "embedding":
            for x in c.inputs:
                boundaries[_entry_node(analysis, x, layout)] = REPLICATE  # column linears read the whole activation
    return boundaries


def _sharded_outputs(regions: list[Candidate], picked: dict) -> set[str]:
    return {o for c in regions if c.loss_nodes and picked[id(c)].sharded and picked[id(c)].name not in ("gather", "column_gather")
            for o in c.outputs if o not in c.loss_nodes}


# ---- assembly -------------------------------------------------------------------------------------
def region_name(analysis: GraphAnalysis, c: Candidate) -> str:
    fqns = []
    for n in c.column + c.row:
        node = analysis.nodes[n]
        fqn = analysis.param_of(node.args[0] if c.kind == "embedding" else node.args[1])
        if c.kind == "embedding":  # a tied table is named after the embedding, not the LM head
            fqn = analysis.captured.tied.get(fqn, fqn)
        fqns.append(fqn.rsplit(".", 1)[0])
    prefix = os.path.commonprefix([f.split(".") for f in fqns])
    return ".".join(prefix) if prefix else fqns[0]


def _assemble(analysis, labels, regions, picked, params, reasons, notes, stream, sim, mesh_info, sharded_outputs, costs, sol, priced) -> Plan:
    captured = analysis.captured
    param_plans: dict[str, ParamPlan] = {}
    grad_reduce = _replicated_used_on_shards(analysis, sim)
    for ph, fqn in captured.param_fqns.items():
        val = analysis.nodes[ph].meta["val"]
        placement = params.get(fqn, REPLICATE)
        if fqn in params:
            why, region = reasons[fqn]
        elif fqn in reasons:
            region = reasons[fqn][1]
            why = f"replicated: region {region} runs replicated (the cost model's choice; explain('{region}'))"
        else:
            why, region = _replicated_reason(fqn, grad_reduce, stream), grad_reduce.get(fqn)
        param_plans[fqn] = ParamPlan(
            fqn=fqn, placement=placement_str(placement), shape=[int(s) for s in val.shape], dtype=str(val.dtype).replace("torch.", ""),
            region=region, reason=why, grad_reduce=fqn in grad_reduce, tied_to=captured.tied.get(fqn),
        )
    _share_tied_placements(analysis, param_plans)

    index = {id(c): i for i, c in enumerate(regions)}
    region_plans = []
    for c in _region_reps(labels, regions):
        i = index.get(id(c))
        region_plans.append(_region_plan(analysis, labels, c, i, costs, sol, priced))
    attention = {n.name: placement_str(sim.specs[n.name].placements[0]) for n in analysis.of_role(Role.ATTENTION) if isinstance(sim.specs.get(n.name), DTensorSpec)}
    loss_parallel = [n.name for n in analysis.of_role(Role.LOSS) if _vocab_sharded(analysis, sim, n)]
    fingerprint = model_fingerprint(captured.model_name, {f: (p.shape, p.dtype) for f, p in param_plans.items()})
    for c in labels.candidates:
        if not c.legal and id(c) not in index and not _covered(c, regions):
            notes.append(f"replicated {region_name(analysis, c)}: {c.reason}")
    return Plan(
        format=PLAN_FORMAT, model=captured.model_name, fingerprint=fingerprint, mesh=mesh_info, stream=stream,
        params=param_plans, regions=region_plans, boundaries=_boundary_plans(analysis, sim, regions, picked, stream),
        attention=attention, loss_parallel=loss_parallel, sharded_outputs=sorted(sharded_outputs),
        implicit=[asdict(r) for r in sim.communication(planned=False)], notes=_dedupe(notes),
    )


def _region_reps(labels: Labels, regions: list[Candidate]) -> list[Candidate]:
    """One entry per region: each priced candidate, or the first failed one that nothing covers."""
    ids = {id(c) for c in regions}
    reps, seen = [], set()
    for c in labels.candidates:
        key = tuple(c.column)
        if id(c) in ids or (not c.legal and not any(set(c.column) & set(x.column) for x in regions) and key not in seen):
            reps.append(c)
            seen.add(key)
    return reps


def _verdict(o: Option, best: Option, budget_bytes: float, total_mem: int) -> str:
    if o is best:
        return "chosen"
    dt, dm = o.time_s - best.time_s, o.memory.total - best.memory.total
    if dt < 0 and dm > 0:
        return f"lost: {-dt * 1e3:.3f} ms faster but {_fmt_bytes(dm)} more per rank, over the memory budget"
    if dt > 0:
        more = f", {_fmt_bytes(-dm)} less memory (not needed)" if dm < 0 else f", and {_fmt_bytes(dm)} more memory" if dm > 0 else ""
        return f"lost: {dt * 1e3:.3f} ms slower per step{more}"
    if dm > 0:
        return f"lost: as fast, {_fmt_bytes(dm)} more memory"
    return "lost: tie (identical cost); the first listed wins"


def _region_plan(analysis, labels, c: Candidate, i, costs, sol, priced) -> RegionPlan:
    fq = lambda n, k: analysis.param_of(analysis.nodes[n].args[k])  # noqa: E731
    col_idx = 0 if c.kind == "embedding" else 1
    options: list[dict] = []
    strategy, reason, loss_parallel = "replicated", c.reason, False
    if i is not None:
        opts = costs.options[i]
        best = opts[sol.choice[i]]
        strategy = "sharded" if best.sharded else "replicated"
        loss_parallel = best.name == "loss_parallel"
        why = "the only option on this stream" if len(opts) == 1 else "fastest option within the memory budget"
        reason = f"{c.reason}; {best.name}: {best.note} — {why}"
        for o in opts:
            options.append(_option_dict(o, costs.layout, _verdict(o, best, 0, sol.memory), True, o is best))
        for other in priced:
            if other.layout != costs.layout and other.viable and i < len(other.options):
                for o in other.options[i]:
                    options.append(_option_dict(o, other.layout, f"lost: needs the {_LAYOUT_TEXT[other.layout]} stream, not chosen "
                                                f"for the whole model (see the notes)", True, False))
    for o in labels.candidates:
        if not o.legal and set(o.column) & set(c.column):
            options.append({"strategy": "sharded", "legal": False, "reason": o.reason, "column": [fq(n, col_idx) for n in o.column]})
    if i is None:
        options.append({"strategy": "replicated", "legal": True, "reason": "always legal: every rank computes the whole region", "column": []})
    return RegionPlan(
        name=region_name(analysis, c), kind=c.kind, strategy=strategy,
        column=[fq(n, col_idx) for n in c.column], row=[fq(n, 1) for n in c.row], nodes=sorted(c.nodes),
        reason=reason, loss_parallel=loss_parallel, candidates=options,
    )


def _option_dict(o: Option, layout: str, verdict: str, legal: bool, chosen: bool) -> dict:
    return {
        "strategy": o.name, "layout": layout, "legal": legal, "chosen": chosen, "reason": f"{o.note}. {verdict}",
        "column": [], "time_s": o.time_s, "compute_s": o.compute_s, "comm_s": o.comm_s,
        "memory_bytes": o.memory.total, "memory": o.memory.as_dict(), "comm_bytes": dict(o.comm),
    }
