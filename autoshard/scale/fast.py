"""Plan a deep model at the cost of four of its layers.

`plan_layers_once(model, mesh, inputs)` finds the stack of identical decoder layers (or of
groups of layers that repeat: gpt-oss's sliding/full pairs are units of 2), plans a
copy of the model truncated to 4 of them with `autoshard.plan` (the first layer, two middle
layers, the last one: everything a layer's plan can depend on, and enough layers for fx's node
numbering to settle), checks on the captured graph that the layers really trace identically,
and grows the plan to all layers (`expand_plan`). The result is the same Plan data that planning
the full model gives (tests compare them on models small enough to plan in full). When the
numbering has not settled it retries with 6 layers; when anything does not repeat exactly, it
says why and plans the full model instead. The cost model's estimate is scaled to all layers from
the truncation's per-node costs (`scaled_estimate.py`). A memory budget in bytes is not
scale-free (4 layers fit where 80 do not): with one, the full model is planned.

Only planning is shortened: `autoshard()` still captures and rewrites every layer.

    result = plan_layers_once(model, mesh, {"input_ids": ids})
    result.plan            # Plan for every layer
    result.timings         # {"capture": s, "analyse": s, "label": s, "choose": s, "expand": s, "estimate": s}
    result.fallback        # "" when a truncation was planned, else why the full model was
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from autoshard.api import PlanRun, Progress, plan_model
from autoshard.distributed.mesh import mesh_info
from autoshard.graph.capture import Captured
from autoshard.choose.budget import fmt_bytes, resolve_hardware
from autoshard.schema.plan import STREAM_TEXT
from autoshard.schema.plan import Plan
from autoshard.scale.expand import expand_plan
from autoshard.graph.layers import LayerStack, find_layer_stack, truncated
from autoshard.scale.names import LayerNames, NotRepeating, Unsettled
from autoshard.scale.scaled_estimate import scaled_estimate

ATTEMPTS = (4, 6)  # layers to capture: the name stride settles after 1-3 layers (see names.py)


@dataclass
class PlanningResult:
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)
    stack: LayerStack | None = None
    captured_layers: int | None = None   # layers captured, or None when planned in full
    run: PlanRun | None = None           # what was captured and planned (the truncation's)
    fallback: str = ""                   # why the full model was planned, "" when it was not

    @property
    def captured(self) -> Captured | None:
        return self.run.captured if self.run else None

    @property
    def total_s(self) -> float:
        return sum(self.timings.values())


def plan_layers_once(
    model: nn.Module,
    mesh,
    example_inputs=None,
    *,
    sequence_parallel: bool | None = None,
    progress: Progress | None = None,
    verify: bool = False,
    attempts: tuple[int, ...] = ATTEMPTS,
    **plan_kwargs,
) -> PlanningResult:
    """The plan of `model` over `mesh`, capturing a few of its identical layers (see module doc).

    `attempts`: layer counts to capture, in order; the next is tried while the layers' node
    names have not settled into a fixed stride. `verify=True` also plans one layer more and
    checks that the grown plan equals it. Extra keyword arguments go to `autoshard.plan`.
    """
    result = PlanningResult(plan=None)  # type: ignore[arg-type]
    stack, why = find_layer_stack(model)
    result.stack = stack
    result.fallback = why if attempts else "full capture requested"
    if attempts and not scale_free_budget(plan_kwargs.get("memory_budget")):
        attempts = ()
        result.fallback = (f"memory_budget={plan_kwargs['memory_budget']!r} bounds the whole model's memory, which a "
                           "truncation does not have: planned in full")
    for repeating in attempts:
        if stack is None or stack.count <= stack.keep(repeating):   # the distinct leading layers, and `repeating` identical units
            result.fallback = result.fallback or f"{stack.path} has {stack.count} layers: planned in full"
            break
        try:
            return _plan_truncated(model, mesh, example_inputs, stack, stack.keep(repeating), result, sequence_parallel, progress,
                                   verify, plan_kwargs)
        except Unsettled as e:
            result.fallback = f"node names of {stack.path} not settled after {stack.keep(repeating)} layers ({e}): planned in full"
        except NotRepeating as e:
            result.fallback = f"layers of {stack.path} do not repeat exactly ({e}): planned in full"
            break
    result.run = _planned(model, mesh, example_inputs, sequence_parallel, progress,
                          f"all {stack.count} layers" if stack else "the full model", plan_kwargs, result.timings)
    result.plan = result.run.plan
    return result


def _planned(model, mesh, inputs, sp, progress, detail: str, plan_kwargs: dict, timings: dict) -> PlanRun:
    """`autoshard.plan`'s passes on `model`, each pass's time added to `timings`."""
    run = plan_model(model, mesh, inputs, sequence_parallel=sp, progress=progress, detail=detail, **plan_kwargs)
    for name, seconds in run.timings.items():
        timings[name] = timings.get(name, 0.0) + seconds
    return run


def _plan_truncated(model, mesh, inputs, stack, keep, result, sp, progress, verify, plan_kwargs) -> PlanningResult:
    run = _planned(truncated(model, stack, keep), mesh, inputs, sp, progress, f"{keep} of {stack.count} layers", plan_kwargs,
                   result.timings)
    plan, captured = run.plan, run.captured
    t0 = _start(progress, "expand", f"to {stack.count} layers")
    names = LayerNames.from_captured(captured, stack.path, stack.count, stack.period)
    full = expand_plan(plan, names)
    result.timings["expand"] = result.timings.get("expand", 0.0) + _stop(progress, "expand", t0)

    if plan.estimate is not None:
        # the cost model's numbers for all layers: the truncation's per-node costs, layer T counted N-K+1 times
        t0 = _start(progress, "estimate", f"scaled to {stack.count} layers")
        profile = resolve_hardware(plan_kwargs.get("hardware"), mesh_info(mesh))
        full.estimate = scaled_estimate(run, profile, names)
        full.estimate["budget"] = _scaled_budget(plan.estimate.get("budget"), full.estimate, keep)
        full.estimate["solver"] = {**plan.estimate.get("solver", {}), "planned_layers": keep}
        full.notes = [_scaled_layout_note(n, full.stream, full.estimate, keep) for n in full.notes]
        result.timings["estimate"] = _stop(progress, "estimate", t0)
    if verify:
        # one layer more, planned for real: the grown plan (and its estimate) must equal it
        more = keep + stack.period
        bigger = _planned(truncated(model, stack, more), mesh, inputs, sp, progress, f"{more} of {stack.count} layers (check)",
                          plan_kwargs, result.timings).plan
        names_k1 = LayerNames.from_captured(captured, stack.path, more, stack.period)
        grown = expand_plan(plan, names_k1)
        if plan.estimate is not None:
            check = scaled_estimate(run, profile, names_k1)
            _check_estimate(check, bigger.estimate, more)
        # the layout note quotes solver totals, which can differ from the estimate (choose prices a
        # tied table whole in the solver); the estimate was just compared, so leave the note out
        if _comparable(grown) != _comparable(bigger):
            raise NotRepeating(f"the {keep}-layer plan grown to {more} layers differs from the {more}-layer plan")
    result.plan = full
    result.run = run
    result.captured_layers = keep
    result.fallback = ""
    return result


_CANDIDATE_KEYS = ("strategy", "layout", "legal", "chosen", "column")


def _comparable(plan: Plan) -> dict:
    """What `verify` compares: the plan without the priced numbers that are not per layer — the
    estimate (compared on its own), the layout note quoting solver totals, and each region's
    candidate costs (a bucketed gradient all-reduce is charged to the region of its first
    parameter, which moves as layers are added)."""
    data = asdict(plan)
    data["estimate"] = None
    data["notes"] = [n for n in data["notes"] if not (n.startswith(_LAYOUT_NOTE) and "(best plans per stream layout" in n)]
    for region in data["regions"]:
        region["candidates"] = [{k: c.get(k) for k in _CANDIDATE_KEYS} for c in region["candidates"]]
    return data


def _scaled_budget(budget: dict | None, scaled: dict, keep: int) -> dict | None:
    """The budget entry for all layers. Only scale-free budgets reach here (see `scale_free_budget`):
    the default one is the smallest memory, which the chosen plan reaches; 'none' has no limit."""
    if not budget:
        return budget
    out = {**budget, "planned_on": f"a {keep}-layer truncation; the choice is per layer, so it holds for all layers"}
    if budget.get("policy") == "default":
        out["bytes"] = out["smallest_feasible_bytes"] = scaled["memory_bytes"]["total"]
    else:
        out.pop("smallest_feasible_bytes", None)  # known for the truncation only
    return out


_LAYOUT_NOTE = "residual stream "
_PRICED = re.compile(r"(?P<layout>[a-z-]+): (?P<ms>[0-9.]+) ms, (?P<mem>[0-9.]+ [KMGT]?i?B)/rank")


def _scaled_layout_note(note: str, stream: str, estimate: dict, keep: int) -> str:
    """choose's note comparing stream layouts quotes the truncation's step time and memory: the
    chosen layout's numbers become the whole model's; any other layout's priced numbers are the
    truncation's, and the note says so."""
    if not note.startswith(_LAYOUT_NOTE) or "(best plans per stream layout" not in note:
        return note
    chosen = STREAM_TEXT[stream]
    others = False

    def sub(m):
        nonlocal others
        if m.group("layout") != chosen:
            others = True
            return m.group(0)
        return f"{chosen}: {estimate['time_s']['total'] * 1e3:.3f} ms, {fmt_bytes(estimate['memory_bytes']['total'])}/rank"

    out = _PRICED.sub(sub, note)
    return out + (f" [other layouts priced on the {keep}-layer truncation planned]" if others else "")


def _check_estimate(scaled: dict, planned: dict, layers: int, rel: float = 1e-9) -> None:
    """The scaled estimate must equal the estimate of a plan of that many layers (exact bytes)."""
    if scaled["memory_bytes"] != planned["memory_bytes"] or scaled["communication"] != planned["communication"]:
        raise NotRepeating(f"the estimate scaled to {layers} layers differs from the {layers}-layer plan's: "
                           f"{scaled['memory_bytes']} / {scaled['communication']} vs {planned['memory_bytes']} / {planned['communication']}")
    for k, v in planned["time_s"].items():
        if abs(scaled["time_s"][k] - v) > rel * max(abs(v), 1e-30):
            raise NotRepeating(f"the {k} time scaled to {layers} layers, {scaled['time_s'][k]}, differs from the {layers}-layer plan's {v}")


def scale_free_budget(memory_budget) -> bool:
    """Is the choice on a truncation the choice for all layers? Yes for the default budget (smallest
    memory: each region at its smallest) and 'none' (each region at its fastest); a byte budget is
    not: 4 layers fit where 80 do not."""
    return memory_budget is None or (isinstance(memory_budget, str) and memory_budget.strip().lower() in ("none", "inf", "unlimited"))


# ---- timing ---------------------------------------------------------------------------------------
def _start(progress, phase, detail) -> float:
    if progress:
        progress(phase, detail, None)
    return time.perf_counter()


def _stop(progress, phase, t0) -> float:
    dt = time.perf_counter() - t0
    if progress:
        progress(phase, "", dt)
    return dt
