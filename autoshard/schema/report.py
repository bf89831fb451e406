"""Human-readable views of a Plan: the report table and `explain(name)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoshard.schema.fused_parts import parts_of
from autoshard.schema.placements import is_split, parse_placement
from autoshard.schema.units import format_bytes as _bytes, split_len

if TYPE_CHECKING:
    from autoshard.schema.plan import Plan


def text_table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows]


def render_report(plan: Plan) -> str:
    m = plan.mesh
    stream = "sequence parallel (activations between regions sharded on the sequence dim)" if plan.stream == "sequence_parallel" else "replicated (plain tensor parallel)"
    lines = [
        f"autoshard plan for {plan.model}  [fingerprint {plan.fingerprint}]",
        f"mesh {dict(zip(m['dim_names'] or ['dim0'], m['shape']))} on {m['device_type']}; sharding over '{m['tp_dim']}' (tp={m['tp']})",
        f"residual stream: {stream}",
        "",
        "Regions",
    ]
    rows = [[r.name, r.kind, r.strategy + (" + loss parallel" if r.loss_parallel else ""), r.reason] for r in plan.regions]
    lines += ["  " + line for line in text_table(rows, ["region", "kind", "strategy", "why"])]
    lines += ["", "Parameters"]
    rows = [[p.fqn, "x".join(map(str, p.shape)), p.placement, p.reason + (f" (tied to {p.tied_to})" if p.tied_to else "")] for p in plan.params.values()]
    lines += ["  " + line for line in text_table(rows, ["parameter", "shape", "placement", "why"])]
    lines += ["", "Boundaries (one forward at the example shape; backward runs the paired collective)"]
    rows = [[b.node, f"{b.src} -> {b.dst}", b.collective or "local", _bytes(b.bytes), b.reason] for b in plan.boundaries]
    lines += ["  " + line for line in text_table(rows, ["after node", "layout", "collective", "bytes", "why"])] if rows else ["  none"]
    counts = plan.collective_counts()
    lines += ["", "Collectives per forward: " + (", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none")]
    if plan.estimate:
        lines += ["", *_estimate_lines(plan.estimate)]
    if plan.estimate and plan.estimate.get("kv_cache"):
        lines += ["", *kv_cache_lines(plan.estimate["kv_cache"])]
    if plan.implicit:
        lines += ["", "Unplanned redistributions DTensor will insert (correct, but not optimal):"]
        lines += [f"  {r['source']} -> {r['consumer']}: {r['src']} -> {r['dst']} ({r['collective']}, {_bytes(r['nbytes'])})" for r in plan.implicit]
    if plan.notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def kv_cache_lines(c: dict) -> list[str]:
    """The KV cache a generation plan writes: its layout, its bytes per rank, one decode step's collectives."""
    counts = ", ".join(f"{k} x{v}" for k, v in sorted(c["decode_collectives"].items())) or "none"
    return [
        f"KV cache ({c['layers']} layers, batch {c['batch']} x {c['slots']} slots, {c['dtype']}): {', '.join(c['placements'])} — {c['why']}",
        f"  per rank {_bytes(c['bytes_per_rank'])}; per token {_bytes(c['bytes_per_token'])}; per sequence ({c['slots']} slots) {_bytes(c['bytes_per_sequence'])}",
        f"  one decode step: {counts} ({_bytes(c['decode_collective_bytes'])} moved)",
    ]


def _estimate_lines(e: dict) -> list[str]:
    """The cost model's numbers: step time split, per-rank memory split, bytes moved, the budget."""
    out = [f"Estimate per training step (hardware {e.get('hardware')}, tp {e.get('tp')})"]
    t = e.get("time_s", {})
    if t:
        out.append(f"  time    {t['total'] * 1e3:.3f} ms = compute {t['compute'] * 1e3:.3f} ms + communication {t['communication'] * 1e3:.3f} ms")
    m = e.get("memory_bytes", {})
    if m:
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in m.items() if k != "total")
        out.append(f"  memory  {_bytes(m['total'])} per rank = {parts}")
    for phase, c in e.get("communication", {}).items():
        kinds = ", ".join(f"{k} x{v}" for k, v in c["counts"].items()) or "none"
        out.append(f"  {phase:<9}{_bytes(c['bytes'])} moved: {kinds}")
    b = e.get("budget")
    if b:
        binding = "binding: a faster plan needs more memory" if b.get("binding") else "not binding"
        out.append(f"  budget  {b['why']} ({binding}; smallest feasible {_bytes(b['smallest_feasible_bytes'])})")
    r = e.get("recompute")
    if r and "full" in r:
        kinds = ", ".join(f"{k} {_bytes(r[k]['activations'])} kept / {r[k]['recompute_s'] * 1e3:.3f} ms recomputed"
                          for k in ("none", "selective", "full"))
        out.append(f"  activation checkpointing per step: {kinds}")
        if "chosen" in r:
            c = r["chosen"]
            out.append(f"  recompute chosen (auto): {c['why']}; activations {_bytes(c['activations'])}, "
                       f"total {_bytes(c['memory_total'])} per rank")
    if e.get("assumptions"):
        out.append(f"  assumes {e['assumptions']}")
    return out


def render_explain(plan: Plan, name: str) -> str:
    """Why `name` (a parameter FQN, a region name, or a graph node) is placed the way it is."""
    if name in plan.params:
        p = plan.params[name]
        lines = [f"{p.fqn}: {p.placement}  shape {p.shape} {p.dtype}", f"  why: {p.reason}", f"  cost: {_param_cost(plan, p)}"]
        if p.grad_reduce:
            lines.append("  gradient: partial on each rank, summed over tp after backward")
        if p.region:
            region = next((r for r in plan.regions if r.name == p.region), None)
            if region:
                lines += ["", _explain_region(region)]
        return "\n".join(lines)
    region = next((r for r in plan.regions if r.name == name), None)
    if region:
        return _explain_region(region)
    hits = [b for b in plan.boundaries if b.node == name]
    if hits:
        return "\n".join(f"{b.node}: {b.src} -> {b.dst} via {b.collective or 'a local slice'} ({_bytes(b.bytes)}): {b.reason}" for b in hits)
    prefix = [r for r in plan.regions if r.name.startswith(name)] + [p for p in plan.params.values() if p.fqn.startswith(name)]
    if prefix:
        return "\n\n".join(_explain_region(x) if hasattr(x, "candidates") else render_explain(plan, x.fqn) for x in prefix[:20])
    known = [r.name for r in plan.regions][:10]
    raise KeyError(f"{name!r} is not a parameter, region or boundary node of this plan; regions include {known}")


def _param_cost(plan: Plan, p) -> str:
    """Per-rank bytes of the parameter, its gradient and Adam's two fp32 moments (rank 0's shard,
    the largest under torch.chunk), and the gradient all-reduce when its gradient is partial."""
    import math

    import torch

    tp = int(plan.mesh.get("tp", 1))
    shape = list(p.shape)
    if is_split(p.placement) and shape:
        placement = parse_placement(p.placement)
        dim = placement.dim % len(shape)
        shape[dim] = split_len(shape[dim], tp, 0, parts_of(placement))
    numel = math.prod(shape)
    size = torch.empty((), dtype=getattr(torch, p.dtype)).element_size()
    text = f"{_bytes(numel * size)} parameter + {_bytes(numel * size)} gradient + {_bytes(numel * 8)} Adam state per rank"
    if p.grad_reduce:
        text += f"; its gradient joins a bucketed all-reduce over tp ({_bytes(numel * size)} of it)"
    return text


def _explain_region(r) -> str:
    lines = [f"region {r.name} ({r.kind}): {r.strategy}" + (" with loss parallel" if r.loss_parallel else ""), f"  {r.reason}"]
    if r.column:
        lines.append(f"  column side: {', '.join(r.column)}")
    if r.row:
        lines.append(f"  row side:    {', '.join(r.row)}")
    lines.append("  candidates:")
    for c in r.candidates:
        cost = ""
        if "time_s" in c:
            cost = f"  est {c['time_s'] * 1e3:.3f} ms, {c.get('memory_bytes', 0) / 2**20:.1f} MiB/rank"
        mark = "legal  " if c["legal"] else "illegal"
        what = c["strategy"] + (f" [{', '.join(c['column'])}]" if c.get("column") else "")
        lines.append(f"    - {mark} {what}{cost}: {c['reason']}")
    return "\n".join(lines)
