"""The Plan data from the solver's choice: parameters, regions with every candidate's price, boundaries."""

from __future__ import annotations

from dataclasses import asdict

from torch.distributed.tensor import Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from autoshard.choose.boundaries import boundary_plans, vocab_sharded
from autoshard.choose.budget import fmt_bytes
from autoshard.choose.params import illegal_reasons, region_name, replicated_reason, replicated_used_on_shards, share_tied_placements
from autoshard.cost.strategies import Option
from autoshard.graph.analyse import Role
from autoshard.graph.label import Candidate, Labels
from autoshard.schema.plan import PLAN_FORMAT, STREAM_TEXT, ParamPlan, Plan, RegionPlan, model_fingerprint, placement_str

REPLICATE = Replicate()


def assemble(analysis, labels, regions, picked, params, reasons, notes, stream, sim, mesh_info, sharded_outputs, costs, sol, priced) -> Plan:
    captured = analysis.captured
    param_plans: dict[str, ParamPlan] = {}
    grad_reduce = replicated_used_on_shards(analysis, sim)
    illegal = illegal_reasons(analysis, labels)
    for ph, fqn in captured.param_fqns.items():
        val = analysis.nodes[ph].meta["val"]
        placement = params.get(fqn, REPLICATE)
        if fqn in params:
            why, region = reasons[fqn]
        elif fqn in reasons:
            region = reasons[fqn][1]
            why = f"replicated: region {region} runs replicated (the cost model's choice; explain('{region}'))"
        else:
            why, region = replicated_reason(fqn, grad_reduce, stream, illegal.get(fqn)), grad_reduce.get(fqn)
        param_plans[fqn] = ParamPlan(
            fqn=fqn, placement=placement_str(placement), shape=[int(s) for s in val.shape], dtype=str(val.dtype).replace("torch.", ""),
            region=region, reason=why, grad_reduce=fqn in grad_reduce, tied_to=captured.tied.get(fqn),
        )
    share_tied_placements(analysis, param_plans)

    index = {id(c): i for i, c in enumerate(regions)}
    region_plans = []
    for c in _region_reps(labels, regions):
        i = index.get(id(c))
        region_plans.append(_region_plan(analysis, labels, c, i, costs, sol, priced))
    attention = {n.name: placement_str(sim.specs[n.name].placements[0]) for n in analysis.of_role(Role.ATTENTION) if isinstance(sim.specs.get(n.name), DTensorSpec)}
    loss_parallel = [n.name for n in analysis.of_role(Role.LOSS) if vocab_sharded(analysis, sim, n)]
    fingerprint = model_fingerprint(captured.model_name, {f: (p.shape, p.dtype) for f, p in param_plans.items()})
    for c in labels.candidates:
        if not c.legal and id(c) not in index and not _covered(c, regions):
            notes.append(f"replicated {region_name(analysis, c)}: {c.reason}")
    return Plan(
        format=PLAN_FORMAT, model=captured.model_name, fingerprint=fingerprint, mesh=mesh_info, stream=stream,
        params=param_plans, regions=region_plans, boundaries=boundary_plans(analysis, sim, regions, picked, stream),
        attention=attention, loss_parallel=loss_parallel, sharded_outputs=sorted(sharded_outputs),
        implicit=[asdict(r) for r in sim.communication(planned=False)], notes=_dedupe(notes),
    )


def _region_reps(labels: Labels, regions: list[Candidate]) -> list[Candidate]:
    """One entry per region: each priced candidate, or the first failed one that nothing covers."""
    ids = {id(c) for c in regions}
    reps, seen = [], set()
    for c in labels.candidates:
        key = tuple(c.column_nodes)
        if id(c) in ids or (not c.legal and not any(set(c.column_nodes) & set(x.column_nodes) for x in regions) and key not in seen):
            reps.append(c)
            seen.add(key)
    return reps


def _verdict(o: Option, best: Option, budget_bytes: float, total_mem: int) -> str:
    if o is best:
        return "chosen"
    dt, dm = o.time_s - best.time_s, o.memory.total - best.memory.total
    if dt < 0 and dm > 0:
        return f"lost: {-dt * 1e3:.3f} ms faster but {fmt_bytes(dm)} more per rank, over the memory budget"
    if dt > 0:
        more = f", {fmt_bytes(-dm)} less memory (not needed)" if dm < 0 else f", and {fmt_bytes(dm)} more memory" if dm > 0 else ""
        return f"lost: {dt * 1e3:.3f} ms slower per step{more}"
    if dm > 0:
        return f"lost: as fast, {fmt_bytes(dm)} more memory"
    return "lost: tie (identical cost); the first listed wins"


def _region_plan(analysis, labels, c: Candidate, i, costs, sol, priced) -> RegionPlan:
    def fq(n: str, k: int) -> str | None:
        # a linear's weight through its transposes (grouped expert matmuls read w.transpose(-2, -1))
        if analysis.roles.get(n) is Role.LINEAR:
            return analysis.weight(analysis.nodes[n]).fqn
        return analysis.param_of(analysis.nodes[n].args[k])

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
                    options.append(_option_dict(o, other.layout, f"lost: needs the {STREAM_TEXT[other.layout]} stream, not chosen "
                                                f"for the whole model (see the notes)", True, False))
    for o in labels.candidates:
        if not o.legal and set(o.column_nodes) & set(c.column_nodes):
            options.append({"strategy": "sharded", "legal": False, "reason": o.reason, "column": [fq(n, col_idx) for n in o.column_nodes]})
    if i is None:
        options.append({"strategy": "replicated", "legal": True, "reason": "always legal: every rank computes the whole region", "column": []})
    return RegionPlan(
        name=region_name(analysis, c), kind=c.kind, strategy=strategy,
        column=[fq(n, col_idx) for n in c.column_nodes], row=[fq(n, 1) for n in c.row_nodes], nodes=sorted(c.nodes),
        reason=reason, loss_parallel=loss_parallel, candidates=options,
    )


def _option_dict(o: Option, layout: str, verdict: str, legal: bool, chosen: bool) -> dict:
    return {
        "strategy": o.name, "layout": layout, "legal": legal, "chosen": chosen, "reason": f"{o.note}. {verdict}",
        "column": [], "time_s": o.time_s, "compute_s": o.compute_s, "comm_s": o.comm_s,
        "memory_bytes": o.memory.total, "memory": o.memory.as_dict(), "comm_bytes": dict(o.comm),
    }


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _covered(c: Candidate, chosen: list[Candidate]) -> bool:
    return any(set(c.column_nodes) <= set(x.column_nodes) for x in chosen)
