"""`plan.to_html(path)`: the plan as one self-contained HTML page (inline SVG and CSS, no script,
nothing fetched).

The page shows: the mesh, hardware and fingerprint; one decoder layer as a dataflow strip with
every weight coloured by its placement and every boundary collective where it happens (hover
for the reason, bytes, the backward's collective); per-rank memory as a stacked bar against
the device, and the step-time split; the replicated weights with their reasons; each region's
`explain()` (click to open); every parameter's placement and every collective, as tables. The
figures are the report's (`format_bytes` of the same estimate).

    >>> plan.to_html("plan.html")
"""

from __future__ import annotations

import html
from collections import Counter
from typing import TYPE_CHECKING

from autoshard.schema.html_strip import BACKWARD, COLLECTIVE_COLOURS, COLOURS, KIND_TEXT, layer_groups, placement_kind, render_strip
from autoshard.schema.units import format_bytes

if TYPE_CHECKING:
    from autoshard.schema.plan import Plan

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 20px 0 6px; }
.meta { color: #555; } .strip-box { overflow-x: auto; border: 1px solid #ddd; padding: 4px; }
svg text { font-size: 11px; fill: #111; } svg text.small { font-size: 9px; } svg text.stretch { font-size: 11px; fill: #555; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }
pre { background: #f7f7f7; padding: 6px; white-space: pre-wrap; } details { margin: 2px 0; }
"""


def render_html(plan: "Plan") -> str:
    strip, kinds = render_strip(plan)
    e = plan.estimate or {}
    sections = [
        _header(plan, e),
        "<h2>One decoder layer, as it runs</h2>",
        _legend(kinds, plan),
        f'<div class="strip-box">{strip}</div>',
        "<h2>Per-rank memory and step time</h2>",
        _memory(e),
        _time(e),
        "<h2>Replicated weights, and why</h2>",
        _replicated(plan),
        "<h2>Regions (click for explain)</h2>",
        "".join(f"<details><summary>{html.escape(r.name)}: {html.escape(r.strategy)}</summary>"
                f"<pre>{html.escape(plan.explain(r.name))}</pre></details>" for r in plan.regions),
        "<h2>Collectives per forward</h2>",
        _collectives(plan),
        "<h2>Every parameter</h2>",
        _params(plan),
    ]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>autoshard plan: "
            f"{html.escape(plan.model)}</title><style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def _header(plan: "Plan", e: dict) -> str:
    m = plan.mesh
    mesh = " x ".join(f"{n}={s}" for n, s in zip(m.get("dim_names") or ["dim0"], m["shape"]))
    stream = "sequence-parallel" if plan.stream == "sequence_parallel" else "replicated"
    return (f"<h1>autoshard plan: {html.escape(plan.model)}</h1>"
            f'<div class="meta">mesh <b id="mesh">{html.escape(mesh)}</b> on {html.escape(str(m.get("device_type")))}, '
            f"sharding over '{html.escape(str(m.get('tp_dim')))}' (tp={m.get('tp')}); hardware "
            f'<b id="hardware">{html.escape(str(e.get("hardware", "?")))}</b>; residual stream {stream}; '
            f'fingerprint <code id="fingerprint">{html.escape(plan.fingerprint)}</code></div>')


def _legend(kinds: set[str], plan: "Plan") -> str:
    used = sorted(kinds | {placement_kind(plan, p) for p in plan.params.values()})
    items = [f'<span class="legend" data-kind="{k}"><span class="swatch" style="background:{COLOURS[k]}"></span>'
             f"{html.escape(KIND_TEXT.get(k, k))}</span>" for k in used]
    kinds_c = sorted({b.collective for b in plan.boundaries if b.collective})
    items += [f'<span class="legend" data-kind="{c}"><span class="swatch" style="background:{COLLECTIVE_COLOURS.get(c, "#ddd")};'
              f'border-radius:6px"></span>{c} (backward: {BACKWARD.get(c, "?")})</span>' for c in kinds_c]
    prefix, layers = layer_groups(plan)
    fold = f" — layers {prefix}0..{len(layers) - 1} are identical in placement; layer {layers[0]} is drawn" if prefix else ""
    return f'<div class="meta">{" &nbsp; ".join(items)}{html.escape(fold)}</div>'


def _memory(e: dict) -> str:
    m = e.get("memory_bytes") or {}
    if not m:
        return "<p>(no estimate)</p>"
    device = (e.get("budget") or {}).get("device_bytes") or m["total"]
    scale = 800 / max(device, m["total"])
    x, rects = 0.0, []
    colours = {"params": "#4c78a8", "grads": "#f28e2b", "optimizer": "#59a14f", "activations": "#e15759", "kv_cache": "#b07aa1"}
    for k in ("params", "grads", "optimizer", "activations", "kv_cache"):
        if m.get(k):
            w = m[k] * scale
            rects.append(f'<rect x="{x:.1f}" y="10" width="{w:.1f}" height="24" fill="{colours[k]}">'
                         f"<title>{k} {format_bytes(m[k])}</title></rect>")
            x += w
    rects.append(f'<line x1="{device * scale:.1f}" y1="2" x2="{device * scale:.1f}" y2="42" stroke="#000" stroke-width="2"/>')
    labels = ", ".join(f'<span data-memory="{k}">{k} {format_bytes(v)}</span>' for k, v in m.items() if k != "total")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="820" height="46">{"".join(rects)}</svg>'
            f'<div>total <b data-memory="total">{format_bytes(m["total"])}</b> per rank = {labels}; device '
            f'<span data-memory="device">{format_bytes(device)}</span> (black line)</div>')


def _time(e: dict) -> str:
    t = e.get("time_s") or {}
    if not t:
        return ""
    total = max(t["total"], 1e-12)
    w = 800 * t["compute"] / total
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="820" height="30"><rect x="0" y="4" width="{w:.1f}" height="20" '
            f'fill="#4c78a8"/><rect x="{w:.1f}" y="4" width="{800 - w:.1f}" height="20" fill="#e15759"/></svg>'
            f'<div>step <b data-time="total">{t["total"] * 1e3:.3f} ms</b> = compute <span data-time="compute">'
            f'{t["compute"] * 1e3:.3f} ms</span> (blue) + communication <span data-time="communication">'
            f'{t["communication"] * 1e3:.3f} ms</span> (red)</div>')


def _folded(plan: "Plan") -> dict[str, list]:
    """Parameters with the layer index replaced by '*', in model order (one row per pattern)."""
    prefix, layers = layer_groups(plan)
    out: dict[str, list] = {}
    for p in plan.params.values():
        key = p.fqn
        if prefix and key.startswith(prefix):
            rest = key[len(prefix):]
            idx, _, tail = rest.partition(".")
            if idx in layers:
                key = f"{prefix}*.{tail}"
        out.setdefault(key, []).append(p)
    return out


def _replicated(plan: "Plan") -> str:
    rows = []
    for key, ps in _folded(plan).items():
        p = ps[0]
        if placement_kind(plan, p) == "replicated" and not p.tied_to:
            rows.append(f"<tr><td>{html.escape(key)}</td><td>{len(ps)}</td><td>{'x'.join(map(str, p.shape))}</td>"
                        f"<td>{html.escape(p.reason)}</td></tr>")
    if not rows:
        return "<p>none: every weight is split</p>"
    return "<table><tr><th>parameter</th><th>count</th><th>shape</th><th>why replicated</th></tr>" + "".join(rows) + "</table>"


def _collectives(plan: "Plan") -> str:
    counts = Counter(b.collective for b in plan.boundaries if b.collective)
    rows = [f'<tr data-collective="{k}" data-count="{v}"><td>{k}</td><td>{v}</td>'
            f"<td>{format_bytes(sum(b.bytes for b in plan.boundaries if b.collective == k))}</td>"
            f"<td>{BACKWARD.get(k, '?')}</td></tr>" for k, v in sorted(counts.items())]
    return ("<table><tr><th>collective</th><th>count</th><th>bytes (forward)</th><th>backward runs</th></tr>"
            + "".join(rows) + "</table>")


def _params(plan: "Plan") -> str:
    rows = [f'<tr data-fqn="{html.escape(p.fqn)}" data-placement="{html.escape(p.placement)}"><td>{html.escape(p.fqn)}</td>'
            f"<td>{'x'.join(map(str, p.shape))}</td><td>{html.escape(p.placement)}</td><td>{html.escape(p.reason)}</td></tr>"
            for p in plan.params.values()]
    return (f"<details><summary>{len(rows)} parameters</summary><table><tr><th>parameter</th><th>shape</th>"
            "<th>placement</th><th>why</th></tr>" + "".join(rows) + "</table></details>")
