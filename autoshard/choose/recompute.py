"""`activation_checkpointing="auto"`: which decoder layers recompute, and how, to meet the budget.

The cost model prices each kind for the whole model (`cost/recompute.py`: activations kept,
forward seconds recomputed); the layers are identical, so a layer's share is 1/n of each. The
cheapest mix of `full`, `selective` and `none` layers whose per-rank memory — parameters,
gradients, optimizer state and the activations that mix keeps — fits `memory_budget` wins
(least recompute time, then least memory). No budget, or one the plan meets as it is: nothing
is recomputed. One not even full recompute meets is refused, with the figures.

    >>> kinds, record = choose_recompute(plan.estimate, 12 * 2**30, n_layers=32)
"""

from __future__ import annotations

import math
from collections import Counter

from autoshard.choose.budget import parse_bytes
from autoshard.schema.errors import PlanError
from autoshard.schema.units import format_bytes


def budget_bytes(memory_budget, estimate: dict) -> float:
    """The budget `auto` must meet: the user's bytes, the device's ("device"), else none (inf)."""
    if memory_budget is None or (isinstance(memory_budget, str) and memory_budget.strip().lower() in ("none", "inf", "unlimited")):
        return math.inf
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "device":
        return float(estimate.get("budget", {}).get("device_bytes") or math.inf)
    return parse_bytes(memory_budget)


def choose_recompute(estimate: dict, budget: float, n_layers: int) -> tuple[list[str], dict]:
    """Per-layer kinds (layer order) and the record the plan keeps of the choice."""
    prices, memory = estimate["recompute"], estimate["memory_bytes"]
    state = memory["total"] - memory["activations"]
    none = prices["none"]["activations"]
    best = None
    for k_full in range(n_layers + 1):
        for k_sel in range(n_layers + 1 - k_full):
            act, t = none, 0.0
            for kind, k in (("full", k_full), ("selective", k_sel)):
                act -= k * (none - prices[kind]["activations"]) / n_layers
                t += k * prices[kind]["recompute_s"] / n_layers
            if state + act <= budget and (best is None or (t, act) < best[:2]):
                best = (t, act, k_full, k_sel)
    if best is None:
        need = state + prices["full"]["activations"]
        raise PlanError(f"memory_budget {format_bytes(budget)} per rank: even recomputing every layer fully needs "
                        f"{format_bytes(need)} (state {format_bytes(state)} + activations "
                        f"{format_bytes(prices['full']['activations'])}); raise the budget or the tp size")
    t, act, k_full, k_sel = best
    kinds = ["full"] * k_full + ["selective"] * k_sel + ["none"] * (n_layers - k_full - k_sel)
    record = {"policy": "auto", "layers": dict(Counter(kinds)), "activations": int(act), "recompute_s": t,
              "memory_total": int(state + act), "budget_bytes": budget,
              "why": ("no recompute: the plan fits the budget as it is" if k_full + k_sel == 0 else
                      f"{k_full} layers full, {k_sel} selective: the least recompute time within "
                      f"{format_bytes(budget)} per rank")}
    return kinds, record
