"""`autoshard(model, mesh)`: the pipeline, one pass per line.

Planning one input signature produces a `PlanRun`: every pass's output, kept and passed down, so
that nothing later (the rewrite, the lowering, growing a truncated plan to all layers) computes
it again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh

from autoshard.choose import choose
from autoshard.choose.diagnose import refuse_fallbacks
from autoshard.choose.recompute import budget_bytes, choose_recompute
from autoshard.distributed.agree import agree_across_ranks, check_plan_matches
from autoshard.distributed.load import load
from autoshard.distributed.fsdp import cast_parameters, data_parallel, repeating_units, resolve_fsdp
from autoshard.distributed.mesh import mesh_info, tensor_parallel_mesh
from autoshard.distributed.parameters import distribute_parameters
from autoshard.execute.dry_run import dry_run
from autoshard.execute.module import ShardedModule
from autoshard.execute.recompute import Recompute
from autoshard.execute.rewrite import rewrite_graph, state_placements
from autoshard.execute.runners import DTensorExecution, finish
from autoshard.graph.analyse import GraphAnalysis, analyse
from autoshard.graph.capture import Captured, capture, isolated_from_caller, meta_skeleton
from autoshard.graph.label import Labels, label
from autoshard.graph.simulate import PlacementSimulator, Simulation, simulate
from autoshard.schema.errors import MemoryBudgetError, PlanError
from autoshard.schema.plan import Plan
from autoshard.serve.generate import Serving

# (pass, detail, seconds): called with None when a pass starts and with its time when it ends
Progress = Callable[[str, str, float | None], None]


@dataclass
class PlanRun:
    """Everything planning one captured program produced, in pass order."""

    captured: Captured
    analysis: GraphAnalysis
    simulator: PlacementSimulator
    labels: Labels
    plan: Plan
    simulation: Simulation          # the plan's placements propagated over the graph
    timings: dict[str, float] = field(default_factory=dict)   # seconds per pass
    graph: fx.GraphModule | None = None                       # the rewritten program (autoshard only)


def plan(model: nn.Module, mesh: DeviceMesh, example_inputs=None, *, sequence_parallel: bool | None = None, strict: bool = False,
         hardware=None, memory_budget=None, expert_parallel: bool | None = None) -> Plan:
    """Plan only: nothing is materialised, rewritten or communicated (works on `meta` models).

    `hardware`: the profile the cost model prices with — a name ("h100-sxm", "a100-sxm",
    "pcie-gpu", "cpu-gloo"), a JSON file from `autoshard calibrate`, or a HardwareProfile (default:
    cpu-gloo on CPU meshes, h100-sxm otherwise). `memory_budget`: per-rank bytes, "24GiB",
    "device" or "none" (default: the smallest memory a legal plan reaches, the fastest there).
    `expert_parallel`: MoE experts split over ranks with all-to-all dispatch (True), never (False),
    or weighed by the cost model against expert tensor parallel (None; see `choose`).
    """
    run = plan_model(model, mesh, example_inputs, sequence_parallel=sequence_parallel, hardware=hardware,
                     memory_budget=memory_budget, expert_parallel=expert_parallel)
    if strict:
        refuse_fallbacks(run.plan, model, run.captured, sequence_parallel)
    return run.plan


def plan_model(model: nn.Module, mesh: DeviceMesh, example_inputs=None, *, sequence_parallel: bool | None = None, hardware=None,
               memory_budget=None, pinned: dict[str, str] | None = None, progress: Progress | None = None,
               detail: str = "", expert_parallel: bool | None = None) -> PlanRun:
    """Capture `model` and plan it: the `PlanRun` of `autoshard.plan` (`progress` hears each pass)."""
    timings: dict[str, float] = {}
    with _timed("capture", timings, progress, detail):
        captured = capture(model, example_inputs, device=tensor_parallel_mesh(mesh).device_type)  # 1. torch.export on fake tensors
    return plan_captured(captured, mesh, sequence_parallel=sequence_parallel, hardware=hardware, memory_budget=memory_budget,
                         pinned=pinned, progress=progress, timings=timings, expert_parallel=expert_parallel)


def plan_captured(captured: Captured, mesh: DeviceMesh, *, sequence_parallel=None, hardware=None, memory_budget=None,
                  pinned=None, progress: Progress | None = None, timings: dict | None = None, expert_parallel=None) -> PlanRun:
    """Passes 2-4 on a captured program. Planning simulates placements on fake tensors: a plan
    depends on the model and mesh only, not on a CommDebugMode or FlopCounterMode the caller has active."""
    timings = {} if timings is None else timings
    with isolated_from_caller():
        with _timed("analyse", timings, progress):
            analysis = analyse(captured)                                              # 2. roles from dataflow
            simulator = PlacementSimulator(analysis, tensor_parallel_mesh(mesh))
        with _timed("label", timings, progress):
            labels = label(analysis, simulator)                                       # 3. legal regions
        with _timed("choose", timings, progress):
            chosen = choose(labels, simulator, mesh_info(mesh), sequence_parallel, hardware=hardware,
                            memory_budget=memory_budget, pinned=pinned, expert_parallel=expert_parallel)  # 4. the cost model's pick
            # the plan's own placements (tied names share their table's): what every later pass follows
            simulation = simulate(simulator, chosen)
    return PlanRun(captured, analysis, simulator, labels, chosen, simulation, timings)


def autoshard(
    model: nn.Module,
    mesh: DeviceMesh,
    example_inputs=None,
    *,
    sequence_parallel: bool | None = None,
    plan: Plan | None = None,
    fsdp: bool | dict | None = None,
    strict: bool = False,
    hardware=None,
    memory_budget=None,
    compile: bool | dict = False,
    lower: bool = False,
    checkpoint=None,
    activation_checkpointing: str | None = None,
    expert_parallel: bool | None = None,
) -> ShardedModule:
    """Shard `model` over `mesh` and return a drop-in module; `model` itself is left untouched.

    `example_inputs`: positional args (tuple), keyword args (dict) or `(args, kwargs)`; optional
    for transformers models. `plan`: a `Plan` (e.g. `Plan.from_json`) to apply instead of planning.
    `strict`: raise PlanError (naming the config attribute and the tp values that would work)
    instead of falling back to replicating a region this tp cannot shard.
    `hardware`, `memory_budget`, `expert_parallel`: what the cost model prices with, the per-rank
    limit, and how MoE experts may split (see `plan`).
    `fsdp`: on a mesh with dims besides "tp" (e.g. `("dp", "tp")`) FSDP2 shards over them, per
    decoder layer and root (`autoshard.distributed.fsdp.data_parallel`); a dict passes its options
    (`mp_policy`, `reshard_after_forward`); False leaves data parallelism to the caller.
    `compile`: True (or a dict of `torch.compile` options) runs the program lowered to local tensors
    with explicit collectives, compiled with dynamic batch/sequence; `lower`: lowered, eager
    (`execute/runners.py`; what cannot be lowered stays on DTensors, see `sharded.lowering_notes`).
    `checkpoint`: a transformers `save_pretrained` or DCP directory read into the shards, each rank
    reading only its slices (`autoshard.load`); `model` may then be built on `meta`.
    `activation_checkpointing`: "none" (default), "full" (each decoder layer keeps only its inputs
    and recomputes its forward in backward), "selective" (keeps matmul, attention and collective
    outputs, recomputes the rest), per layer (`execute/recompute.py`), or "auto": the cost model's
    per-layer mix meeting `memory_budget` at the least recompute time (`choose/recompute.py`).
    """
    tp_mesh = tensor_parallel_mesh(mesh)
    fsdp_options = resolve_fsdp(mesh, fsdp)
    skeleton = cast_parameters(meta_skeleton(model), fsdp_options)

    auto = activation_checkpointing == "auto"
    planner = Planner(skeleton, mesh, sequence_parallel, hardware, memory_budget, expert_parallel)

    try:
        first = planner.build(example_inputs, plan)                                   # 1-6. plan, rewrite, dry run
    except MemoryBudgetError:
        if not auto:
            raise
        planner.memory_budget = None              # the smallest-memory plan; recompute brings it under the budget
        first = planner.build(example_inputs, plan)
    if strict:
        refuse_fallbacks(first.plan, model, first.captured, sequence_parallel)
    # a call with other inputs is planned again, its parameters staying where they already are
    placed = {f: p.placement for f, p in first.plan.params.items()}
    sharded = ShardedModule(model, mesh, tp_mesh, replan=planner.pinned_to(placed), execution=DTensorExecution())
    sharded.planner = planner
    sharded.serving = Serving(sharded)                                                #    generate's programs, planned on first use
    distribute_parameters(model, sharded, first.plan, first.captured, tp_mesh,
                          state=state_placements(first.captured, first.simulation))   # 7. parameters -> DTensors
    sharded.add_program(first)
    recompute = _recompute(activation_checkpointing, repeating_units(sharded), first.plan, memory_budget)
    if recompute is not None:
        sharded.run_with(DTensorExecution(recompute))                                #    layers recomputed in backward
    if fsdp_options is not None:
        data_parallel(sharded, **fsdp_options)                                        # 8. FSDP2 over dp
    if checkpoint is not None:
        load(sharded, checkpoint)                                                     #    weights into the shards
    return finish(sharded, compile, lower)                                           # 9. lower + torch.compile


@dataclass
class Planner:
    """Passes 1-6 for one module skeleton with the options `autoshard()` was given: what a
    sharded module re-plans new inputs with, and what `generate` plans its cached programs with."""

    skeleton: nn.Module
    mesh: DeviceMesh
    sequence_parallel: bool | None = None
    hardware: object = None
    memory_budget: object = None
    expert_parallel: bool | None = None

    def build(self, inputs, fixed: Plan | None = None, pinned: dict[str, str] | None = None, skeleton: nn.Module | None = None,
              sequence_parallel: bool | None = None) -> PlanRun:
        tp_mesh = tensor_parallel_mesh(self.mesh)
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        run = plan_model(skeleton if skeleton is not None else self.skeleton, self.mesh, inputs, sequence_parallel=sp,
                         hardware=self.hardware, memory_budget=self.memory_budget, pinned=pinned,
                         expert_parallel=self.expert_parallel)                                # 1-4. capture, analyse, label, choose
        if fixed is not None:
            check_plan_matches(fixed, run.plan)
            run.plan, run.simulation = fixed, simulate(run.simulator, fixed)
        run.graph = rewrite_graph(run.captured, run.plan, run.simulation, tp_mesh)    # 5. DTensor regions
        dry_run(run.captured, run.graph, run.plan, tp_mesh)                           # 6. forward + backward on fake tensors
        agree_across_ranks(run.plan, tp_mesh)                                         #    every rank the same plan
        return run

    def pinned_to(self, placed: dict[str, str], **options) -> Callable:
        """Named inputs -> a PlanRun whose parameters stay where `placed` has them."""
        return lambda named: self.build(named, pinned=placed, **options)


def _recompute(kind: str | None, units: list[str], plan: Plan, memory_budget) -> Recompute | None:
    """The layers to checkpoint: one kind for all, or under "auto" the cost model's per-layer mix
    (recorded in `plan.estimate["recompute"]["chosen"]`)."""
    if kind != "auto":
        return Recompute.of(kind, units if kind else [])
    if not units:
        raise PlanError("activation_checkpointing='auto' needs repeating layers, and the model has none")
    kinds, record = choose_recompute(plan.estimate, budget_bytes(memory_budget, plan.estimate), len(units))
    plan.estimate["recompute"]["chosen"] = record
    return Recompute(tuple(units), tuple(kinds)) if any(k != "none" for k in kinds) else None


@contextmanager
def _timed(name: str, timings: dict[str, float], progress: Progress | None, detail: str = ""):
    if progress:
        progress(name, detail, None)
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    timings[name] = timings.get(name, 0.0) + dt
    if progress:
        progress(name, "", dt)


__all__ = ["autoshard", "plan", "plan_model", "plan_captured", "Plan", "PlanError", "PlanRun"]
