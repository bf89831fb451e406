"""Parameter placements of the chosen regions: column / row / vocab splits, tied tensors, replicated reasons."""

from __future__ import annotations

import os
from dataclasses import asdict

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.graph.analyse import GraphAnalysis, Role, is_grouped_mm
from autoshard.graph.label import Candidate
from autoshard.graph.simulate import Simulation
from autoshard.schema.plan import SP_STREAM, ParamPlan, placement_str

REPLICATE = Replicate()


def param_placements(analysis: GraphAnalysis, chosen: list[Candidate]):
    params: dict[str, Placement] = {}
    reasons: dict[str, tuple[str, str | None]] = {}
    for c in chosen:
        name = region_name(analysis, c)
        for n in c.column_nodes:
            node = analysis.nodes[n]
            if c.kind == "embedding":
                _set(params, reasons, analysis.param_of(node.args[0]), Shard(0), "vocab-parallel table: rows (vocab) split over tp", name)
                continue
            w, bias = analysis.weight(node), analysis.bias_of(node)
            placement = c.placements[w.fqn]
            why = "column-parallel LM head, logits vocab-sharded" if c.kind == "column_output" else "column-parallel: output features split over tp"
            if isinstance(placement, _StridedShard):
                widths = " | ".join(map(str, getattr(placement, "sizes", ())))
                why += (f" in each of its {placement.split_factor} fused parts (the output is cut into "
                        + (f"parts of {widths} features)" if widths else f"{placement.split_factor} equal parts)"))
                if c.gathers:
                    parts = ", ".join(str(analysis.nodes[g].args[1]) for g in c.gathers)
                    why += (f"; part(s) {parts} (from 0) gathered whole inside the region: their heads do not split "
                            "over tp (K/V replicated), stored split all the same")
            if w.out_dim != 0:
                why += _stored(analysis, node, w.out_dim)
            _set(params, reasons, w.fqn, placement, why, name)
            if bias:
                _set(params, reasons, bias, c.placements[bias], "bias of a column-parallel linear", name)
        for n in c.row_nodes:
            node = analysis.nodes[n]
            w, bias = analysis.weight(node), analysis.bias_of(node)
            why = "row-parallel: input features split, partial sums reduced after"
            if w.in_dim != 1:
                why += _stored(analysis, node, w.in_dim)
            _set(params, reasons, w.fqn, c.placements[w.fqn], why, name)
            if bias:
                _set(params, reasons, bias, REPLICATE, "bias of a row-parallel linear, added once after the reduction", name)
    return params, reasons, []


def _stored(analysis: GraphAnalysis, node, dim: int) -> str:
    """Where the split dim lies in a weight not stored `[out, in]`."""
    if not is_grouped_mm(node.target):
        return f"; dim {dim} of the weight, stored [in, out] (as GPT-2's Conv1D)"
    return f"; dim {dim} of the per-expert weights [experts, ...]"


def _weights(analysis: GraphAnalysis, c: Candidate) -> set[str]:
    """The tables / weights a region's column and row nodes multiply by."""
    return {analysis.param_of(analysis.nodes[x].args[0]) if c.kind == "embedding" else analysis.weight(analysis.nodes[x]).fqn
            for x in c.column_nodes + c.row_nodes}


def _set(params, reasons, fqn, placement, why, region):
    params[fqn] = placement
    reasons[fqn] = (why, region)


def unused_parameter_splits(analysis: GraphAnalysis, tp: int) -> tuple[dict[str, Placement], dict[str, tuple[str, None]]]:
    """Parameters no op of this program reads (a decoder-only call's cross-attention, a text-only
    call's vision tower) hold 1/tp each: split on their largest dim tp divides. They change no
    value; a later call that reads them is re-planned with them where they are (and refused,
    naming the parameter, if it needs them split another way)."""
    captured = analysis.captured
    tied = set(captured.tied) | set(captured.tied.values())
    params, reasons = {}, {}
    for ph, fqn in captured.param_fqns.items():
        node = analysis.nodes[ph]
        if node.users or fqn in tied:
            continue
        shape = [int(s) for s in node.meta["val"].shape]
        dims = [d for d in range(len(shape)) if shape[d] >= tp and shape[d] % tp == 0]
        if not dims:
            continue
        d = max(dims, key=lambda i: (shape[i], -i))
        params[fqn] = Shard(d)
        reasons[fqn] = (f"unused by this program (no op reads it): split on dim {d} so each rank holds 1/tp of it", None)
    return params, reasons


def region_params(analysis, c: Candidate, option: str = "") -> dict[str, Placement]:
    """The placements a sharded region gives its parameters (`option` "ep": its experts split over ranks)."""
    if option == "ep":
        return expert_parallel_params(c.expert_block, c.expert_block.experts)[0]
    params, _, _ = param_placements(analysis, [c])
    return params


def expert_parallel_params(block, experts: int, tp: int | None = None) -> tuple[dict, dict]:
    """Expert parallel's placements and reasons: every expert tensor `Shard(0)` (rank r holds
    experts [r·E/tp, (r+1)·E/tp) whole), the router and the rest of the block whole."""
    share = f"{experts // tp} of the {experts} experts" if tp else f"1/tp of the {experts} experts"
    params, reasons = {}, {}
    for f in block.params:
        if f in block.expert_params:
            params[f] = Shard(0)
            reasons[f] = (f"expert parallel: each rank holds {share} whole; rows reach their expert's rank by all-to-all", None)
        else:
            reasons[f] = ("whole on every rank inside an expert-parallel block (the router): it reads that rank's tokens, "
                          "its gradient is summed across ranks", None)
    return params, reasons


def reconcile_ties(analysis, params, reasons, chosen) -> tuple[dict, list[str], set[int]]:
    """Tied parameters share one tensor, so all their uses need the same placement. Returns the
    parameters left sharded, notes, and the ids of the candidates that must stay replicated."""
    notes: list[str] = []
    demoted: set[int] = set()
    groups: dict[str, list[str]] = {}
    for fqn, canon in analysis.captured.tied.items():
        groups.setdefault(canon, [canon]).append(fqn)
    in_graph = {fqn for ph, fqn in analysis.captured.param_fqns.items() if analysis.nodes[ph].users}
    for canon, names in groups.items():
        # an alias whose placeholder is unused (export reads the tied tensor once) follows canon
        placements = {placement_str(params.get(n, REPLICATE)) for n in names if n in in_graph}
        if len(placements) > 1:
            for c in chosen:
                touched = _weights(analysis, c)
                if touched & set(names):
                    demoted.add(id(c))
                    for fqn in touched:
                        params.pop(fqn, None)
                        reasons.pop(fqn, None)
            notes.append(f"tied parameters {', '.join(names)} need one placement ({' vs '.join(sorted(placements))}); their regions stay replicated")
    # A table sharded by another region (a tied LM head) but looked up by an embedding that is
    # not vocab-parallel would be indexed as if it were whole: keep those regions replicated.
    looked_up = {c.column_nodes[0] for c in chosen if c.kind == "embedding" and id(c) not in demoted}
    for node in analysis.of_role(Role.EMBEDDING):
        fqn = analysis.param_of(node.args[0])
        if node.name in looked_up or fqn not in params:
            continue
        for c in chosen:
            touched = _weights(analysis, c)
            if fqn in touched:
                demoted.add(id(c))
                for f in touched:
                    params.pop(f, None)
                    reasons.pop(f, None)
        notes.append(f"{fqn} is also an embedding table that cannot be vocab-parallel here; the regions sharding it stay replicated")
    return params, notes, demoted


def share_tied_placements(analysis: GraphAnalysis, param_plans: dict[str, ParamPlan]) -> None:
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


def replicated_used_on_shards(analysis: GraphAnalysis, sim: Simulation) -> dict[str, str]:
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


def replicated_reason(fqn: str, grad_reduce: dict, stream: str, illegal: str | None = None) -> str:
    if fqn in grad_reduce:
        where = "sequence shards" if stream == SP_STREAM else "sharded activations"
        return f"replicated, applied to {where}: gradient summed over tp after backward"
    if illegal:  # the label pass tried to split it and found what stops it
        return f"replicated: cannot be split: {illegal}"
    return "replicated: not part of any shardable region"


def illegal_reasons(analysis: GraphAnalysis, labels) -> dict[str, str]:
    """For each parameter of an illegal candidate only: why it cannot split (the narrowest try's)."""
    out: dict[str, tuple[int, str]] = {}
    legal = {analysis.param_of(analysis.nodes[n].args[0]) if c.kind == "embedding" else analysis.weight(analysis.nodes[n]).fqn
             for c in labels.legal() for n in c.column_nodes + c.row_nodes}
    for c in labels.candidates:
        if c.legal or c.kind == "embedding":
            continue
        for n in c.column_nodes:
            fqn = analysis.weight(analysis.nodes[n]).fqn
            if fqn not in legal and (fqn not in out or len(c.column_nodes) < out[fqn][0]):
                out[fqn] = (len(c.column_nodes), c.reason)
    return {f: why for f, (_, why) in out.items()}


def region_name(analysis: GraphAnalysis, c: Candidate) -> str:
    fqns = []
    for n in c.column_nodes + c.row_nodes:
        node = analysis.nodes[n]
        fqn = analysis.param_of(node.args[0]) if c.kind == "embedding" else analysis.weight(node).fqn
        if c.kind == "embedding":  # a tied table is named after the embedding, not the LM head
            fqn = analysis.captured.tied.get(fqn, fqn)
        fqns.append(fqn.rsplit(".", 1)[0])
    prefix = os.path.commonprefix([f.split(".") for f in fqns])
    return ".".join(prefix) if prefix else fqns[0]
