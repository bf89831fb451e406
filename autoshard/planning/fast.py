"""Plan a deep model at the cost of four of its layers.

`plan_layers_once(model, mesh, inputs)` finds the stack of identical decoder layers, plans a
copy of the model truncated to 4 of them with `autoshard.plan` (the first layer, two middle
layers, the last one: everything a layer's plan can depend on, and enough layers for fx's node
numbering to settle), checks on the captured graph that the layers really trace identically,
and grows the plan to all layers (`expand_plan`). The result is the same Plan data that planning
the full model gives (tests compare them on models small enough to plan in full). When the
numbering has not settled it retries with 6 layers; when anything does not repeat exactly, it
says why and plans the full model instead.

Only planning is shortened: `autoshard()` still captures and rewrites every layer.

    result = plan_layers_once(model, mesh, {"input_ids": ids})
    result.plan            # Plan for every layer
    result.timings         # {"capture": s, "analyse": s, "label": s, "choose": s, "expand": s}
    result.fallback        # "" when a truncation was planned, else why the full model was
"""

from __future__ import annotations

import numbers
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from autoshard import api
from autoshard.passes.capture import Captured
from autoshard.plan import Plan
from autoshard.planning.expand import expand_plan
from autoshard.planning.layers import LayerStack, find_layer_stack, truncated
from autoshard.planning.names import LayerNames, NotRepeating, Unsettled

# the passes `autoshard.plan` runs, in order; timed by wrapping them while it runs
PHASES = ("capture", "analyse", "PlacementSimulator", "label", "choose")
ATTEMPTS = (4, 6)  # layers to capture: the name stride settles after 1-3 layers (see names.py)

Progress = Callable[[str, str, float | None], None]  # (phase, detail, seconds or None at start)


@dataclass
class PlanningResult:
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)
    stack: LayerStack | None = None
    captured_layers: int | None = None   # layers captured, or None when planned in full
    captured: Captured | None = None     # the graph that was planned (the truncation's)
    fallback: str = ""                   # why the full model was planned, "" when it was not

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
    for keep in attempts:
        if stack is None or stack.count <= keep:
            result.fallback = result.fallback or f"{stack.path} has {stack.count} layers: planned in full"
            break
        try:
            return _plan_truncated(model, mesh, example_inputs, stack, keep, result, sequence_parallel, progress, verify, plan_kwargs)
        except Unsettled as e:
            result.fallback = f"node names of {stack.path} not settled after {keep} layers ({e}): planned in full"
        except NotRepeating as e:
            result.fallback = f"layers of {stack.path} do not repeat exactly ({e}): planned in full"
            break
    with _timed_passes(result.timings, progress, f"all {stack.count} layers" if stack else "the full model") as last:
        result.plan = api.plan(model, mesh, example_inputs, sequence_parallel=sequence_parallel, **plan_kwargs)
    result.captured = last.get("capture")
    return result


def _plan_truncated(model, mesh, inputs, stack, keep, result, sp, progress, verify, plan_kwargs) -> PlanningResult:
    small = truncated(model, stack, keep)
    with _timed_passes(result.timings, progress, f"{keep} of {stack.count} layers") as last:
        plan = api.plan(small, mesh, inputs, sequence_parallel=sp, **plan_kwargs)
    captured = last["capture"]
    t0 = _start(progress, "expand", f"to {stack.count} layers")
    full = expand_plan(plan, LayerNames.from_captured(captured, stack.path, stack.count))
    result.timings["expand"] = result.timings.get("expand", 0.0) + _stop(progress, "expand", t0)

    if verify or plan.estimate is not None:
        # one layer more: checks the growth (verify) and gives the per-layer slope of the estimate
        with _timed_passes(result.timings, progress, f"{keep + 1} of {stack.count} layers (check)"):
            bigger = api.plan(truncated(model, stack, keep + 1), mesh, inputs, sequence_parallel=sp, **plan_kwargs)
        if verify:
            grown = expand_plan(plan, LayerNames.from_captured(captured, stack.path, keep + 1))
            if asdict(grown) != {**asdict(bigger), "estimate": None}:
                raise NotRepeating(f"the {keep}-layer plan grown to {keep + 1} layers differs from the {keep + 1}-layer plan")
        if plan.estimate is not None:
            full.estimate = extrapolate(plan.estimate, bigger.estimate, keep, stack.count)
    result.plan = full
    result.captured = captured
    result.captured_layers = keep
    result.fallback = ""
    return result


def extrapolate(at_k: dict, at_k1: dict, k: int, n: int):
    """Numbers linear in the layer count (times, bytes, FLOPs), from k and k+1 layers to n."""
    if isinstance(at_k, dict) and isinstance(at_k1, dict):
        return {key: extrapolate(v, at_k1.get(key, v), k, n) for key, v in at_k.items()}
    if isinstance(at_k, bool) or not isinstance(at_k, numbers.Number) or not isinstance(at_k1, numbers.Number):
        return at_k
    value = at_k + (n - k) * (at_k1 - at_k)
    return int(round(value)) if isinstance(at_k, int) and isinstance(at_k1, int) else value


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


@contextmanager
def _timed_passes(timings: dict[str, float], progress: Progress | None, detail: str):
    """Time each pass `autoshard.plan` calls (wrapping the names in `autoshard.api`), and keep
    each pass's last result (the Captured graph is needed to grow the plan)."""
    originals = {name: getattr(api, name) for name in PHASES if hasattr(api, name)}
    last: dict = {}

    def wrap(name, fn):
        phase = "analyse" if name == "PlacementSimulator" else name

        shown = progress if name != "PlacementSimulator" else None  # one "analyse" line, not two

        def timed(*args, **kwargs):
            t0 = _start(shown, phase, detail if phase == "capture" else "")
            out = fn(*args, **kwargs)
            timings[phase] = timings.get(phase, 0.0) + _stop(shown, phase, t0)
            last[name] = out
            return out

        return timed

    try:
        for name, fn in originals.items():
            setattr(api, name, wrap(name, fn))
        yield last
    finally:
        for name, fn in originals.items():
            setattr(api, name, fn)
