"""The plan's dataflow strip: prologue, one decoder layer (folded "x N"), epilogue, as inline SVG.

Built from the plan data alone, in graph order: regions ordered by their first parameter (model
order), the weights of a layer that belong to no region (norms) placed before the region they
precede, and every boundary collective at the region it enters or leaves (its reason names the
region), with its bytes per forward and the collective its backward runs.

    >>> svg, kinds = render_strip(plan)     # kinds: the placement kinds drawn, for the legend
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from autoshard.schema.units import format_bytes

if TYPE_CHECKING:
    from autoshard.schema.plan import Plan

COLOURS = {
    "column": "#4c78a8", "row": "#59a14f", "vocab": "#76b7b2", "replicated": "#bab0ac",
    "expert-split": "#b07aa1", "strided-fused": "#f28e2b", "partial-statistic": "#edc948",
}
KIND_TEXT = {
    "column": "column (output features split)", "row": "row (input features split, partial sums)",
    "vocab": "vocab-parallel (rows of the table split)", "replicated": "replicated (whole on every rank)",
    "expert-split": "expert weights split inside each expert", "strided-fused": "fused parts split part by part (strided)",
}
COLLECTIVE_COLOURS = {"all_gather": "#e15759", "reduce_scatter": "#9c755f", "all_reduce": "#ff9da7", "all_to_all": "#8c564b"}
# the collective a Redistribute's backward runs for the forward one
BACKWARD = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "none (identity)",
            "all_to_all": "all_to_all"}
_LAYER = re.compile(r"^(.*?\.)(\d+)\.")


def placement_kind(plan: "Plan", p) -> str:
    """What a parameter's placement means, for colour and legend."""
    if not p.placement.startswith(("Shard(", "_StridedShard(")):
        return "replicated"
    if p.placement.startswith("_StridedShard("):
        return "strided-fused"
    if len(p.shape) >= 3:
        return "expert-split"
    region = next((r for r in plan.regions if r.name == p.region), None)
    if region is not None and region.kind == "embedding":
        return "vocab"
    if region is not None and p.fqn in region.row:
        return "row"
    return "column"


def layer_groups(plan: "Plan") -> tuple[str | None, list[str]]:
    """(the layer path prefix, e.g. "model.layers.", and the layer indices as strings)."""
    found: dict[str, set[str]] = {}
    for fqn in plan.params:
        m = _LAYER.match(fqn)
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2))
    if not found:
        return None, []
    prefix, idx = max(found.items(), key=lambda kv: len(kv[1]))
    return (prefix, sorted(idx, key=int)) if len(idx) >= 2 else (None, [])


def _steps(plan: "Plan", names: list[str]) -> list[tuple[str, object]]:
    """("param", ParamPlan) / ("region", RegionPlan) / ("boundary", BoundaryPlan), in dataflow order,
    for the parameters `names` (one stretch of the model: prologue, a layer, or epilogue)."""
    order = {f: i for i, f in enumerate(plan.params)}
    mine = set(names)
    regions = sorted((r for r in plan.regions if set(r.column + r.row) & mine),
                     key=lambda r: min(order.get(f, 1 << 30) for f in r.column + r.row))
    in_region = {f for r in plan.regions for f in r.column + r.row}
    loose = [plan.params[f] for f in names if f not in in_region and not plan.params[f].tied_to]
    steps: list[tuple[str, object]] = []
    for i, r in enumerate(regions):
        if i < len(loose):                       # a norm before each region (pre-norm decoders)
            steps.append(("param", loose[i]))
        steps += [("boundary", b) for b in plan.boundaries if f"enter {r.name}:" in b.reason]
        steps.append(("region", r))
        steps += [("boundary", b) for b in plan.boundaries
                  if f"leave {r.name}:" in b.reason or (b.node in r.nodes and "enter " not in b.reason and "leave " not in b.reason)]
    steps += [("param", p) for p in loose[len(regions):]]
    return steps


def render_strip(plan: "Plan") -> tuple[str, set[str]]:
    prefix, layers = layer_groups(plan)
    names = list(plan.params)
    if prefix:
        first = [f for f in names if f.startswith(f"{prefix}{layers[0]}.")]
        start = names.index(first[0])
        stretches = [("prologue", names[:start]), (f"layer {layers[0]} (x {len(layers)})", first),
                     ("epilogue", [f for f in names[start:] if not _LAYER.match(f) or not f.startswith(prefix)])]
    else:
        stretches = [("model", names)]
    kinds: set[str] = set()
    boxes, x, height = [], 10, 150
    for title, stretch in stretches:
        steps = _steps(plan, stretch)
        if not steps:
            continue
        x0 = x
        for kind, item in steps:
            if kind == "boundary":
                boxes.append(_collective(item, x))
                x += 70
            elif kind == "param":
                k = placement_kind(plan, item)
                kinds.add(k)
                boxes.append(_weight(item, k, x, 60))
                x += 120
            else:
                w, svg = _region(plan, item, x, kinds)
                boxes.append(svg)
                x += w + 10
        boxes.append(f'<rect x="{x0 - 5}" y="5" width="{x - x0}" height="{height - 10}" fill="none" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{x0}" y="20" class="stretch">{html.escape(title)}</text>')
        x += 20
    body = "\n".join(boxes)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{x}" height="{height}" viewBox="0 0 {x} {height}" '
           f'class="strip">\n{body}\n</svg>')
    return svg, kinds


def _short(fqn: str) -> str:
    parts = fqn.split(".")
    return ".".join(parts[-3:-1]) if parts[-1] in ("weight", "bias") and len(parts) >= 3 else ".".join(parts[-2:])


def _weight(p, kind: str, x: int, y: int) -> str:
    tip = html.escape(f"{p.fqn}: {p.placement} {p.shape} — {p.reason}")
    return (f'<g class="weight" data-fqn="{html.escape(p.fqn)}" data-placement="{html.escape(p.placement)}">'
            f'<title>{tip}</title><rect x="{x}" y="{y}" width="110" height="34" rx="4" fill="{COLOURS[kind]}"/>'
            f'<text x="{x + 5}" y="{y + 14}">{html.escape(_short(p.fqn))[:18]}</text>'
            f'<text x="{x + 5}" y="{y + 28}" class="small">{html.escape(p.placement)[:20]}</text></g>')


def _region(plan: "Plan", r, x: int, kinds: set[str]) -> tuple[int, str]:
    weights = [plan.params[f] for f in r.column + r.row if f in plan.params]
    width = max(120, 115 * len(weights) + 10)
    parts = [f'<g class="region" data-region="{html.escape(r.name)}"><title>{html.escape(plan.explain(r.name))}</title>'
             f'<rect x="{x}" y="30" width="{width}" height="100" rx="6" fill="#f5f5f5" stroke="#666"/>'
             f'<text x="{x + 5}" y="44" class="small">{html.escape(r.name)} — {html.escape(r.strategy)}'
             f'{" + loss parallel" if r.loss_parallel else ""}</text></g>']
    for i, p in enumerate(weights):
        k = placement_kind(plan, p)
        kinds.add(k)
        parts.append(_weight(p, k, x + 5 + 115 * i, 60))
    return width, "".join(parts)


def _collective(b, x: int) -> str:
    kind = b.collective or "local"
    colour = COLLECTIVE_COLOURS.get(kind, "#ddd")
    back = BACKWARD.get(kind, "none")
    tip = html.escape(f"{b.node}: {b.src} -> {b.dst} via {kind}, {format_bytes(b.bytes)} forward; backward: {back}. {b.reason}")
    return (f'<g class="collective" data-collective="{kind}" data-node="{html.escape(b.node)}" data-bytes="{b.bytes}">'
            f'<title>{tip}</title><circle cx="{x + 30}" cy="77" r="16" fill="{colour}"/>'
            f'<text x="{x + 2}" y="112" class="small">{html.escape(kind)[:14]}</text>'
            f'<text x="{x + 2}" y="124" class="small">{html.escape(format_bytes(b.bytes))}</text></g>')
