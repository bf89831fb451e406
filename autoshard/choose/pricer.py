"""Each region's strategies priced under a stream layout, from a few whole-graph simulations.

One simulation per variant (all regions sharded, heads replicated or gathered, all replicated)
gives every node's placement; compute, communication and memory are then charged to the region
that owns each node (the residual stream owns the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoshard.choose.boundaries import region_boundaries, entries, loss_parallel_nodes, seq_dim, sharded_outputs
from autoshard.choose.params import region_params, replicated_used_on_shards
from autoshard.cost.activation import saved_activations
from autoshard.cost.estimate import comm_events, comm_summary, compute_times, estimate_record
from autoshard.cost.hardware import HardwareProfile
from autoshard.cost.recompute import recompute_prices
from autoshard.cost.memory import MemoryBreakdown, activation_memory, plan_memory, state_memory
from autoshard.cost.strategies import LayoutCosts, Option
from autoshard.graph.label import Candidate
from autoshard.schema.plan import REPLICATED_STREAM, SP_STREAM, Plan


@dataclass
class _Priced:
    compute: dict            # owner -> seconds
    comm: dict               # owner -> seconds
    comm_bytes: dict         # owner -> {collective: bytes}
    memory: dict             # owner -> MemoryBreakdown


class Pricer:
    """Prices the regions' strategies under a layout from a few whole-graph simulations."""

    STREAM = -1

    def __init__(self, analysis, simulator, regions, params, profile, tp, expert_parallel: bool | None = None):
        self.analysis, self.simulator, self.regions, self.params = analysis, simulator, regions, params
        self.profile, self.tp = profile, tp
        # expert parallel: offered beside expert tensor parallel (None), instead of it (True), never (False)
        self.expert_parallel = expert_parallel
        self.ep_regions = [c for c in regions if c.expert_block is not None and expert_parallel is not False
                           and c.expert_block.experts % tp == 0]
        self.ep_ids = {id(c) for c in self.ep_regions}
        self.saved = saved_activations(analysis, profile.device_type)
        self.owner: dict[str, int] = {}
        for i, c in enumerate(regions):
            for n in list(c.nodes) + c.column_nodes + c.row_nodes + list(c.expert_block.nodes if c.expert_block else ()):
                self.owner[n] = i
        self.param_owner = {}
        for ph, fqn in analysis.captured.param_fqns.items():
            users = sorted(analysis.nodes[ph].users, key=lambda u: u.name)
            self.param_owner[fqn] = next((self.owner[u.name] for u in users if u.name in self.owner), self.STREAM)
        self.region_params = [region_params(analysis, c) for c in regions]
        self.units = _coupled(analysis, self.region_params)

    def layout(self, layout: str) -> LayoutCosts:
        costs = LayoutCosts(layout)
        if layout == SP_STREAM:
            why = self._sp_unavailable()
            if why:
                return LayoutCosts(layout, viable=False, why=why)
        ep = {id(c): Option("ep", True) for c in self.ep_regions}
        # forced: every MoE block expert parallel (its router reads each rank's own tokens, so a
        # sequence-sharded stream stays split through it, where expert tensor parallel's cannot yet)
        self.ep_only = bool(self.expert_parallel)
        all_sharded = {id(c): Option("sharded", True) for c in self.regions} | (ep if self.ep_only else {})
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
        if self.ep_regions and not self.ep_only:
            variants["ep"] = self._price(all_sharded | ep, layout)
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
        if id(c) in self.ep_ids and self.ep_only:
            return [("ep", True, "sharded")]
        if id(c) in self.ep_ids:
            return [*self._option_names_etp(c, layout), ("ep", True, "ep")]
        return self._option_names_etp(c, layout)

    def _option_names_etp(self, c: Candidate, layout: str):
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
        exits = [e for c in self.regions for e in (c.row_nodes if c.kind == "column_row" else c.column_nodes if c.kind == "embedding" else [])]
        if not exits:
            return "no region to leave on sequence shards"
        if all(seq_dim(self.analysis, e) is None for e in exits):
            return "no sequence dimension to split (a sequence of 1 is specialised by export): sequence parallel would only add collectives"
        return ""

    def _price(self, picked: dict, layout: str):
        params = {}
        for i, c in enumerate(self.regions):
            if picked[id(c)].sharded and picked[id(c)].name != "ep":
                params.update(self.region_params[i])
        params = {f: p for f, p in self.params.items() if f in params}
        ep = [c for c in self.regions if picked[id(c)].name == "ep"]
        for c in ep:
            params.update(region_params(self.analysis, c, "ep"))
        boundaries = region_boundaries(self.analysis, self.regions, picked, layout)
        sim = self.simulator.run(params, boundaries, sharded_outputs=sharded_outputs(self.regions, picked),
                                 expert_parallel=[c.expert_block for c in ep])
        grad_reduce = set(replicated_used_on_shards(self.analysis, sim))
        events = comm_events(self.analysis, sim, grad_reduce)
        comm_owner = dict(self.owner)
        for i, c in enumerate(self.regions):
            for x in entries(self.analysis, c, layout):
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
        for node, b in activation_memory(self.saved, sim, loss_parallel_nodes(self.analysis, sim)).items():
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
    "ep": "expert parallel: experts split over ranks, each rank routes its tokens, rows to their expert's rank and back by all-to-all",
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


def estimate_plan(analysis, sim, plan: Plan, profile: HardwareProfile, tp: int, saved) -> dict:
    """plan.estimate: step time (compute / communication) and per-rank memory, from the final plan."""
    grad_reduce = [f for f, p in plan.params.items() if p.grad_reduce]
    events = comm_events(analysis, sim, grad_reduce)
    compute = sum(compute_times(analysis, sim, profile).values())
    comm = sum(e.time(profile, tp) for e in events)
    mem = plan_memory(analysis, sim, saved, set(plan.loss_parallel))
    record = estimate_record(profile, tp, compute, comm, mem, comm_summary(events))
    # what each activation-checkpointing kind keeps and recomputes (autoshard(activation_checkpointing=))
    prices = recompute_prices(analysis, sim, saved, set(plan.loss_parallel), profile, tp, events)
    record["recompute"] = {k: {"activations": p.activations, "recompute_s": p.recompute_s} for k, p in prices.items()}
    return record
