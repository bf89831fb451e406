"""The hardware profile and the memory budget a plan is chosen under, and the notes that quote them."""

from __future__ import annotations

import math
import re

from autoshard.cost.hardware import HardwareProfile, get_profile
from autoshard.cost.strategies import LayoutCosts, min_memory
from autoshard.schema.errors import PlanError
from autoshard.schema.plan import STREAM_TEXT
from autoshard.schema.units import format_bytes


def resolve_hardware(hardware, mesh_info: dict) -> HardwareProfile:
    if hardware is None:
        hardware = "cpu-gloo" if mesh_info.get("device_type", "cpu") == "cpu" else "h100-sxm"
    try:
        return get_profile(hardware)
    except (TypeError, ValueError, OSError) as e:
        raise PlanError(f"hardware={hardware!r}: {e}") from None


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> float:
    """`memory_budget` as bytes: a number, "24GiB" / "500 MB", "none" (no limit), "device"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise PlanError(f"memory_budget must be positive, got {value}")
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"memory_budget={value!r}: give bytes (int), a size like '24GiB' or '500MB', 'device' or 'none'")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def resolve_budget(memory_budget, costs: list[LayoutCosts], profile: HardwareProfile) -> dict:
    smallest = min(min_memory(c) for c in costs)
    device = profile.device_memory_bytes
    if memory_budget is None:
        return {"policy": "default", "bytes": smallest, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": "default: the smallest per-rank memory a legal plan reaches (parameters ~1/tp, activations as "
                       "sharded as the model allows), within the device memory; the fastest plan at that memory"}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() in ("none", "inf", "unlimited"):
        return {"policy": "none", "bytes": math.inf, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": "memory_budget='none': no memory limit, the fastest plan"}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "device":
        return {"policy": "device", "bytes": device, "smallest_feasible_bytes": smallest, "device_bytes": device,
                "why": f"memory_budget='device': the {profile.name} profile's {device / 2**30:.1f} GiB per rank"}
    limit = parse_bytes(memory_budget)
    return {"policy": "user", "bytes": limit, "smallest_feasible_bytes": smallest, "device_bytes": device,
            "why": f"memory_budget={fmt_bytes(limit)} per rank"}


def budget_error(budget: dict, costs: list[LayoutCosts]) -> str:
    best = min(costs, key=min_memory)
    smallest = min_memory(best)
    limit = budget["bytes"]
    what = "the device memory of the hardware profile" if budget["policy"] in ("default", "device") else "memory_budget"
    return (f"no plan fits {what} ({fmt_bytes(limit)} per rank): the smallest per-rank memory any legal plan reaches is "
            f"{fmt_bytes(smallest)} ({smallest} bytes: every shardable region sharded, {STREAM_TEXT[best.layout]} stream). "
            "Raise memory_budget, shard over more ranks, or shorten the sequence / batch")


def fmt_bytes(n: float) -> str:
    return format_bytes(n, digits=2)


def layout_note(sol, feasible, unconstrained, budget) -> str:
    parts = []
    for s, c in feasible:
        parts.append(f"{STREAM_TEXT[s.layout]}: {s.time_s * 1e3:.3f} ms, {fmt_bytes(s.memory)}/rank")
    missing = {c.layout for s, c in unconstrained if s} - {s.layout for s, _ in feasible}
    for layout in missing:
        parts.append(f"{STREAM_TEXT[layout]}: over the budget")
    return f"residual stream {STREAM_TEXT[sol.layout]} (best plans per stream layout — " + "; ".join(parts) + f"; budget: {budget['why']})"
