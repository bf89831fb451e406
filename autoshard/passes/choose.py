"""Pass 4 — choose: turn legal candidates into a plan.

Strategy here: the Megatron plan, with sequence parallelism whenever it is legal (every legal
candidate sharded; the residual stream on sequence shards between regions). The cost model plugs
in at `select_candidates` / the stream choice. The chosen plan is simulated end to end; if the
sequence-parallel stream would make DTensor insert collectives on its own anywhere, the plain
TP stream (replicated residual) is used instead and the plan says why.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement

from autoshard.passes.analyse import GraphAnalysis, Role
from autoshard.passes.label import Candidate, Labels
from autoshard.passes.propagate import PlacementSimulator, Simulation
from autoshard.plan import PLAN_FORMAT, BoundaryPlan, ParamPlan, Plan, RegionPlan, model_fingerprint, placement_str

REPLICATE = Replicate()


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


def choose(labels: Labels, simulator: PlacementSimulator, mesh_info: dict, sequence_parallel: bool | None = None) -> Plan:
    analysis = labels.analysis
    chosen = select_candidates(labels)
    params, reasons, notes = _param_placements(analysis, chosen)
    params, tie_notes = _reconcile_ties(analysis, params, reasons, chosen)
    notes += tie_notes
    chosen = [c for c in chosen if not getattr(c, "_demoted", False)]
    sharded_outputs = {o for c in chosen if c.loss_nodes for o in c.outputs if o not in c.loss_nodes}

    streams = ["replicated"] if sequence_parallel is False else ["sequence_parallel", "replicated"]
    attempts: list[tuple[str, dict, Simulation]] = []
    for stream in streams:
        boundaries = _boundaries(analysis, chosen, stream)
        sim = simulator.run(params, boundaries, sharded_outputs=sharded_outputs)
        attempts.append((stream, boundaries, sim))
        if not sim.communication(planned=False):
            break
    stream, boundaries, sim = min(attempts, key=lambda a: (_implicit_bytes(a[2]), streams.index(a[0])))
    if stream != streams[0]:
        first = attempts[0][2].communication(planned=False)[0]
        notes.append(
            f"sequence parallel not used: DTensor would add {first.collective} at {first.consumer} "
            f"({first.src} -> {first.dst}); residual stream replicated instead"
        )
    return _assemble(analysis, labels, chosen, params, reasons, notes, stream, sim, mesh_info, sharded_outputs)


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
    return params, notes


# ---- boundaries -----------------------------------------------------------------------------------
def seq_dim(analysis: GraphAnalysis, name: str) -> int | None:
    val = analysis.nodes[name].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    symbols = analysis.captured.seq_dim_symbols
    for i, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & symbols:
            return i
    return None


def _boundaries(analysis: GraphAnalysis, chosen: list[Candidate], stream: str) -> dict[str, Placement]:
    boundaries: dict[str, Placement] = {}
    for c in chosen:
        exits = c.row if c.kind == "column_row" else (c.column if c.kind == "embedding" else [])
        for e in exits:
            d = seq_dim(analysis, e) if stream == "sequence_parallel" else None
            boundaries[e] = Shard(d) if d is not None else REPLICATE
    for c in chosen:
        if c.kind != "embedding":
            for x in c.inputs:
                boundaries[x] = REPLICATE  # column linears read the whole activation
    return boundaries


def _implicit_bytes(sim: Simulation) -> int:
    return sum(r.nbytes for r in sim.communication(planned=False))


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


def _assemble(analysis, labels, chosen, params, reasons, notes, stream, sim, mesh_info, sharded_outputs) -> Plan:
    captured = analysis.captured
    chosen_ids = {id(c) for c in chosen}
    param_plans: dict[str, ParamPlan] = {}
    grad_reduce = _replicated_used_on_shards(analysis, sim)
    for ph, fqn in captured.param_fqns.items():
        val = analysis.nodes[ph].meta["val"]
        placement = params.get(fqn, REPLICATE)
        why, region = reasons.get(fqn, (None, None))
        if why is None:
            why = _replicated_reason(fqn, grad_reduce, stream)
            region = grad_reduce.get(fqn)
        param_plans[fqn] = ParamPlan(
            fqn=fqn, placement=placement_str(placement), shape=[int(s) for s in val.shape], dtype=str(val.dtype).replace("torch.", ""),
            region=region, reason=why, grad_reduce=fqn in grad_reduce, tied_to=captured.tied.get(fqn),
        )
    _share_tied_placements(analysis, param_plans)

    regions = [_region_plan(analysis, labels, c, id(c) in chosen_ids, sim) for c in _region_reps(labels, chosen)]
    attention = {n.name: placement_str(sim.specs[n.name].placements[0]) for n in analysis.of_role(Role.ATTENTION) if isinstance(sim.specs.get(n.name), DTensorSpec)}
    loss_parallel = [n.name for n in analysis.of_role(Role.LOSS) if _vocab_sharded(analysis, sim, n)]
    fingerprint = model_fingerprint(captured.model_name, {f: (p.shape, p.dtype) for f, p in param_plans.items()})
    for c in labels.candidates:
        if not c.legal and id(c) not in chosen_ids and not _covered(c, chosen):
            notes.append(f"replicated {region_name(analysis, c)}: {c.reason}")
    return Plan(
        format=PLAN_FORMAT, model=captured.model_name, fingerprint=fingerprint, mesh=mesh_info, stream=stream,
        params=param_plans, regions=regions, boundaries=_boundary_plans(analysis, sim, chosen),
        attention=attention, loss_parallel=loss_parallel, sharded_outputs=sorted(sharded_outputs),
        implicit=[asdict(r) for r in sim.communication(planned=False)], notes=_dedupe(notes),
    )


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


def _region_reps(labels: Labels, chosen: list[Candidate]) -> list[Candidate]:
    """One entry per region: the chosen candidate, or the first failed one that nothing covers."""
    reps, seen = [], set()
    for c in labels.candidates:
        key = tuple(c.column)
        if c in chosen or (not c.legal and not any(set(c.column) & set(x.column) for x in chosen) and key not in seen):
            reps.append(c)
            seen.add(key)
    return reps


def _region_plan(analysis, labels, c: Candidate, sharded: bool, sim: Simulation) -> RegionPlan:
    fq = lambda n, i: analysis.param_of(analysis.nodes[n].args[i])  # noqa: E731
    col_idx = 0 if c.kind == "embedding" else 1
    options = [
        {"strategy": "sharded", "legal": o.legal, "reason": o.reason, "column": [fq(n, col_idx) for n in o.column]}
        for o in labels.candidates if set(o.column) & set(c.column)
    ]
    options.append({"strategy": "replicated", "legal": True, "reason": "always legal: every rank computes the whole region", "column": []})
    return RegionPlan(
        name=region_name(analysis, c), kind=c.kind, strategy="sharded" if sharded else "replicated",
        column=[fq(n, col_idx) for n in c.column], row=[fq(n, 1) for n in c.row], nodes=sorted(c.nodes),
        reason=c.reason, loss_parallel=bool(c.loss_nodes) and sharded, candidates=options,
    )


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


def _boundary_plans(analysis: GraphAnalysis, sim: Simulation, chosen: list[Candidate]) -> list[BoundaryPlan]:
    roles = {}
    for c in chosen:
        for x in c.inputs:
            roles.setdefault(x, f"enter {region_name(analysis, c)}: column linears read the whole activation")
        for e in c.row:
            roles[e] = f"leave {region_name(analysis, c)}: reduce the row linear's partial sums"
        if c.kind == "embedding":
            roles[c.column[0]] = "vocab-parallel lookup: sum the masked partial rows"
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
