"""The `autoshard plan` report: a Plan folded over its identical layers, with memory and time.

Rows that differ only in the layer index are printed once as `model.layers.*` with a count.
Sections: regions, parameters, the replicated ones and why (attention heads, MoE experts, the
router and norms explained from the graph), per-rank memory (parameters exact to the byte),
collectives and step time (`plan.estimate` when the cost model filled it, else a rough
roofline + alpha-beta figure that says so).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from autoshard.scale.fast import PlanningResult
from autoshard.scale.graph_facts import describe_model
from autoshard.scale.memory import itemsize, local_numel, param_memory, unique_params
from autoshard.schema.placements import is_split
from autoshard.schema.report import text_table
from autoshard.schema.units import format_bytes as _bytes


_NODE = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*?)_\d+\b")                       # linear_64
_BARE = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)(?= \((?:aten\.|Shard|Replicate|Partial))")  # softmax (aten...


def fold(text: str, container: str | None, nodes: bool | None = None) -> str:
    """`model.layers.17.mlp` -> `model.layers.*.mlp`; in per-layer text node names lose their
    number too (`linear_64` -> `linear_*`), so the 80 copies of one row become one."""
    if not container:
        return text
    folded = re.sub(rf"(?<![\w.]){re.escape(container)}\.\d+(?=\.|\b)", f"{container}.*", text)
    if not (nodes or (nodes is None and folded != text)):
        return folded
    folded = _NODE.sub(r"\1_*", folded)
    return _BARE.sub(lambda m: m.group(1) if m.group(1).endswith("_*") else m.group(1) + "_*", folded)


def fold_row(row, container: str | None) -> tuple[str, ...]:
    """Fold every cell of a row when one of them names a layer (its reason's node names too)."""
    cells = [str(c) for c in row]
    marker = f"{container}.*" if container else None
    if not marker or not any(marker in fold(c, container) for c in cells):
        return tuple(cells)
    return tuple(fold(c, container, nodes=True) for c in cells)


def _folded_rows(rows: list[tuple], container: str | None) -> list[list[str]]:
    """Identical folded rows counted once; the last cell (the reason) is shortened only after
    folding, so rows whose node numbers differ in length still fold together."""
    counts = Counter(fold_row(row, container) for row in rows)
    return [[*row[:-1], _short(row[-1]), f"x{n}"] for row, n in counts.items()]


def render_summary(result: PlanningResult, model, profile, *, batch: int, seq: int, training: bool) -> str:
    plan = result.plan
    container = result.stack.path if result.stack else None
    facts = describe_model(result, model)
    mesh = plan.mesh
    tp = mesh["tp"]
    mem = param_memory(plan)
    stream = "sequence parallel (Shard(seq) between regions)" if plan.stream == "sequence_parallel" else "replicated (plain tensor parallel)"
    lines = [
        f"autoshard plan: {plan.model}, {mem.total_params / 1e9:.2f}B parameters ({_bytes(mem.total_bytes)}), "
        f"{'training step' if training else 'forward'} at batch {batch} x seq {seq}",
        f"mesh {dict(zip(mesh['dim_names'] or ['tp'], mesh['shape']))}: tensor parallel over '{mesh['tp_dim']}' (tp={tp}); hardware {profile.name}",
        f"residual stream: {stream}",
        _planning_line(result),
    ]
    lines += ["", "Regions (per layer rows folded into layers.*)"]
    rows = [(r.name, r.kind, r.strategy + (" + loss parallel" if r.loss_parallel else ""), r.reason) for r in plan.regions]
    lines += _indent(text_table(_folded_rows(rows, container), ["region", "kind", "strategy", "why", "count"]))
    lines += ["", "Parameters"]
    rows = [(p.fqn, "x".join(map(str, p.shape)), p.placement, p.reason + (f" (tied to {p.tied_to})" if p.tied_to else "")) for p in plan.params.values()]
    lines += _indent(text_table(_folded_rows(rows, container), ["parameter", "shape", "placement", "why", "count"]))
    lines += ["", "Replicated parameters and why"]
    lines += _indent(_replicated(plan, facts, container))
    lines += [""] + facts.lines(plan)
    lines += ["", "Memory per tensor-parallel rank"] + _indent(_memory(plan, mem, profile, training))
    lines += ["", "Collectives per forward (backward runs the paired ones)"] + _indent(_collectives(plan, container))
    lines += ["", "Step time"] + _indent(_step_time(plan, facts, profile, mem, training))
    if plan.notes:
        notes = list(dict.fromkeys(fold_row([n], container)[0] for n in plan.notes))
        lines += ["", "Notes"] + [f"  - {_short(n, 220)}" for n in notes]
    return "\n".join(lines)


def _planning_line(result: PlanningResult) -> str:
    t = result.timings
    spent = ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
    if result.captured_layers:
        s = result.stack
        return f"planned {result.captured_layers} of {s.count} identical layers of {s.path}, grown to all {s.count} ({spent})"
    return f"planned the full model: {result.fallback} ({spent})"


def _short(text: str, width: int = 110) -> str:
    text = text.replace("Please redistribute the tensor before this operation.", "").replace("RuntimeError: ", "")
    return text if len(text) <= width else text[: width - 3] + "..."


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines] if lines else ["  none"]


def _replicated(plan, facts, container) -> list[str]:
    tp = plan.mesh["tp"]
    rows = []
    for p in unique_params(plan):
        if is_split(p.placement):
            continue
        rows.append((p.fqn, _bytes(math.prod(p.shape) * itemsize(p.dtype)), facts.why_replicated(p, plan)))
    if not rows:
        return [f"none: every parameter is split over tp={tp}"]
    folded = Counter(fold_row(row, container) for row in rows)
    table = [[name, size if n == 1 else f"{size} each", f"x{n}", why] for (name, size, why), n in folded.items()]
    return text_table(table, ["parameter", "bytes", "count", "why"])


def _memory(plan, mem, profile, training: bool) -> list[str]:
    tp = plan.mesh["tp"]
    hi, lo = max(mem.per_rank), min(mem.per_rank)
    uneven = "" if hi == lo else f" (rank {mem.per_rank.index(lo)}: {_bytes(lo)}; uneven splits)"
    lines = [
        f"parameters   {_bytes(hi):>12}  = {_bytes(max(mem.sharded_per_rank))} sharded (~1/{tp}) + {_bytes(mem.replicated_bytes)} replicated"
        f" ({mem.replicated_params / max(mem.total_params, 1):.1%} of all parameters){uneven}",
    ]
    est = plan.estimate or {}
    memory = est.get("memory_bytes") if isinstance(est.get("memory_bytes"), dict) else None
    if memory:  # the cost model's, on the most loaded rank: activations included
        names = {"params": "parameters", "grads": "gradients", "optimizer": "AdamW state", "activations": "activations"}
        lines = [f"{names.get(k, k):<12} {_bytes(int(v)):>12}  (cost model)" for k, v in memory.items() if k != "total"]
        total, cap = memory["total"], profile.device_memory_bytes
        verdict = "fits" if total <= cap else "does NOT fit"
        lines.append(f"total        {_bytes(int(total)):>12}  {verdict} in {_bytes(cap)} of {profile.name} memory")
        lines.append(f"(replicated: {_bytes(mem.replicated_bytes)} of parameters, {mem.replicated_params / max(mem.total_params, 1):.1%}"
                     f" of all; the rest ~1/{tp}{uneven})")
        return lines
    if training:
        elems = max(sum(local_numel(p.shape, p.placement, tp, r) for p in unique_params(plan)) for r in range(tp))
        optim = 8 * elems
        lines += [
            f"gradients    {_bytes(hi):>12}  (one per parameter, same dtype)",
            f"AdamW state  {_bytes(optim):>12}  (two fp32 moments per parameter element; no fp32 master copy)",
            "activations  not estimated here: plan.estimate is empty (the cost model fills it)",
        ]
        total = 2 * hi + optim
    else:
        total = hi
    cap = profile.device_memory_bytes
    verdict = "fits" if total <= cap else "does NOT fit"
    lines.append(f"total        {_bytes(total):>12}  before activations: {verdict} in {_bytes(cap)} of {profile.name} memory")
    return lines


def _collectives(plan, container) -> list[str]:
    kinds: dict[str, list[int]] = {}
    for b in plan.boundaries:
        if b.collective:
            kinds.setdefault(b.collective, []).append(b.bytes)
    if not kinds:
        return ["none"]
    return [f"{k:<15} x{len(v):<5} {_bytes(sum(v)):>10} in all" for k, v in sorted(kinds.items())]


def _step_time(plan, facts, profile, mem, training: bool) -> list[str]:
    est = plan.estimate
    if est and est.get("time_s"):
        t = est["time_s"]
        return [f"{t['total'] * 1e3:.1f} ms per step = compute {t['compute'] * 1e3:.1f} ms + tp communication "
                f"{t['communication'] * 1e3:.1f} ms (cost model, {est.get('hardware')}; not overlapped)",
                f"assumes {est.get('assumptions', '')}"]
    from autoshard.cost import collective_time, link_for, peak_flops_for

    tp = plan.mesh["tp"]
    link = link_for(profile, tp > profile.devices_per_node)
    passes = 3 if training else 1  # backward costs about twice the forward
    flops = facts.matmul_flops_per_rank(plan) * passes
    dtype = next((p.dtype for p in plan.params.values()), "bfloat16")
    compute = flops / (peak_flops_for(profile, dtype) * profile.efficiency)
    comm = sum(collective_time(b.collective, b.bytes, tp, link) for b in plan.boundaries if b.collective)
    comm *= 2 if training else 1  # each forward collective has its backward pair
    lines = [
        f"~{(compute + comm) * 1e3:.1f} ms per step = compute {compute * 1e3:.1f} ms ({flops / 1e12:.1f} TFLOP per rank) "
        f"+ tp communication {comm * 1e3:.1f} ms ({link.name}), not overlapped",
    ]
    dp = math.prod(plan.mesh["shape"]) // tp
    if training and dp > 1:
        world = math.prod(plan.mesh["shape"])
        t = collective_time("all_reduce", mem.max_rank, dp, link_for(profile, world > profile.devices_per_node))
        lines.append(f"+ data-parallel gradient all-reduce over dp={dp}: {t * 1e3:.1f} ms if not overlapped with backward")
    lines.append("rough: matmul/attention FLOPs at peak x efficiency and alpha-beta collectives; plan.estimate (cost model) replaces it")
    return lines
