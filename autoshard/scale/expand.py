"""Grow the plan of a `K`-layer truncation into the plan of all `N` layers.

Every collection in a Plan (parameters, regions, boundaries, attention nodes, implicit
redistributions, notes, ...) is a sequence of *units* in graph order. A unit is classified by the
captured layers it names (node names and parameter FQNs inside its strings); with the template
layer `T = K - 2` (see `names.py`):
- no layer, or only layers before `T`: kept as is (the first layers are named alike in any
  capture);
- layer `T` at most (a middle layer, possibly reading layer T-1's output): the template, emitted
  once for each of layers T..N-2 with T-1 -> i-1 and T -> i;
- layer `K - 1` (the last layer, possibly reading layer T): T -> N-2, K-1 -> N-1.
Names of nodes traced after the template move up by the inserted layers in every unit.
Template units must be contiguous; anything else raises `NotRepeating`.

    full = expand_plan(small_plan, names)          # names: LayerNames for N layers
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from autoshard.schema.plan import BoundaryPlan, ParamPlan, Plan, RegionPlan, model_fingerprint
from autoshard.scale.names import LayerNames, NotRepeating

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")


def expand_plan(plan: Plan, names: LayerNames) -> Plan:
    if names.n_layers < names.captured:
        raise ValueError(f"cannot expand {names.captured} captured layers to {names.n_layers}")
    data = asdict(plan)
    data["params"] = dict(_expand(list(data["params"].items()), names))
    for key in ("regions", "boundaries", "loss_parallel", "implicit", "notes"):
        data[key] = _expand(data[key], names)
    data["attention"] = dict(_expand(list(data["attention"].items()), names))
    data["expert_parallel"] = dict(_expand(list(data["expert_parallel"].items()), names))
    data["sharded_outputs"] = sorted(_expand(data["sharded_outputs"], names))
    for region in data["regions"]:
        region["nodes"] = sorted(region["nodes"])
    data["params"] = {k: ParamPlan(**v) for k, v in data["params"].items()}
    data["regions"] = [RegionPlan(**r) for r in data["regions"]]
    data["boundaries"] = [BoundaryPlan(**b) for b in data["boundaries"]]
    data["fingerprint"] = model_fingerprint(plan.model, {f: (p.shape, p.dtype) for f, p in data["params"].items()})
    data["estimate"] = None  # priced for the truncation; the caller extrapolates it
    return Plan(**data)


def _expand(units: list, names: LayerNames) -> list:
    n, t, last = names.n_layers, names.template, names.captured - 1
    out: list = []
    template: list = []
    done_template = False

    def flush():
        nonlocal template, done_template
        if template:
            for i in range(t, n - 1):
                out.extend(_rename(u, names, {t - 1: i - 1, t: i}) for u in template)
            template, done_template = [], True

    for unit in units:
        layers = _layers(unit, names)
        top = max(layers, default=None)
        if top == t:
            if done_template or min(layers) < t - 1:
                raise NotRepeating(f"layer-{t} entries are not contiguous or reach back further: {str(unit)[:120]}")
            template.append(unit)
            continue
        flush()
        if top == last:
            if min(layers) < t:
                raise NotRepeating(f"an entry of the last layer names an earlier one: {str(unit)[:120]}")
            out.append(_rename(unit, names, {t: n - 2, last: n - 1}))
        else:
            out.append(_rename(unit, names, {}))
    flush()
    return out


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _layers(unit: Any, names: LayerNames) -> set[int]:
    found = set()
    for text in _strings(unit):
        for token in _TOKEN.findall(text):
            layer = names.layer_named(token)
            if layer is not None:
                found.add(layer)
    return found


def _rename(obj: Any, names: LayerNames, layer_map: dict[int, int]) -> Any:
    if isinstance(obj, str):
        return _TOKEN.sub(lambda m: _rename_token(m.group(0), names, layer_map), obj)
    if isinstance(obj, dict):
        return {_rename(k, names, layer_map): _rename(v, names, layer_map) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_rename(v, names, layer_map) for v in obj)
    if isinstance(obj, list):
        return [_rename(v, names, layer_map) for v in obj]
    return obj


def _rename_token(token: str, names: LayerNames, layer_map: dict[int, int]) -> str:
    if (token in names.layer_of or token in names.late) and names.is_numbered(token):
        return names.rename(token, layer_map)
    return names.rename_fqn(token, layer_map) if layer_map else token
