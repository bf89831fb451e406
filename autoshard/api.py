"""`autoshard(model, mesh)`: the pipeline, one pass per line."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoshard.distributed.parameters import distribute_parameters
from autoshard.choose.diagnose import refuse_fallbacks
from autoshard.execute.dry_run import dry_run
from autoshard.execute.runners import finish
from autoshard.schema.errors import PlanError
from autoshard.distributed.fsdp import cast_parameters, data_parallel, resolve_fsdp
from autoshard.distributed.mesh import mesh_info, tensor_parallel_mesh
from autoshard.graph.analyse import analyse
from autoshard.graph.capture import Captured, capture, isolated_from_caller, meta_skeleton
from autoshard.choose.choose import choose
from autoshard.graph.label import label
from autoshard.graph.simulate import PlacementSimulator
from autoshard.execute.rewrite import rewrite_graph
from autoshard.schema.plan import Plan
from autoshard.execute.module import ShardedModule
from autoshard.distributed.agree import agree_across_ranks, check_plan_matches


def plan(model: nn.Module, mesh: DeviceMesh, example_inputs=None, *, sequence_parallel: bool | None = None, strict: bool = False,
         hardware=None, memory_budget=None) -> Plan:
    """Plan only: nothing is materialised, rewritten or communicated (works on `meta` models).

    `hardware`: the profile the cost model prices with — a name ("h100-sxm", "a100-sxm",
    "pcie-gpu", "cpu-gloo"), a JSON file from `autoshard calibrate`, or a HardwareProfile (default:
    cpu-gloo on CPU meshes, h100-sxm otherwise). `memory_budget`: per-rank bytes, "24GiB",
    "device" or "none" (default: the smallest memory a legal plan reaches, the fastest there).
    """
    captured = capture(model, example_inputs, device=tensor_parallel_mesh(mesh).device_type)
    chosen = _plan(captured, mesh, sequence_parallel, hardware, memory_budget)[1]
    if strict:
        refuse_fallbacks(chosen, model, captured, sequence_parallel)
    return chosen


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
) -> ShardedModule:
    """Shard `model` over `mesh` and return a drop-in module; `model` itself is left untouched.

    `example_inputs`: positional args (tuple), keyword args (dict) or `(args, kwargs)`; optional
    for transformers models. `plan`: a `Plan` (e.g. `Plan.from_json`) to apply instead of planning.
    `strict`: raise PlanError (naming the config attribute and the tp values that would work)
    instead of falling back to replicating a region this tp cannot shard.
    `hardware`, `memory_budget`: what the cost model prices with and the per-rank limit (see `plan`).
    `fsdp`: on a mesh with dims besides "tp" (e.g. `("dp", "tp")`) FSDP2 shards over them, per
    decoder layer and root (`autoshard.fsdp.data_parallel`); a dict passes its options
    (`mp_policy`, `reshard_after_forward`); False leaves data parallelism to the caller.
    `compile`: True (or a dict of `torch.compile` options) runs the program lowered to local tensors
    with explicit collectives, compiled with dynamic batch/sequence; `lower`: lowered, eager
    (`autoshard.compile`; what cannot be lowered stays on DTensors, see `sharded.lowering_notes`).
    """
    tp_mesh = tensor_parallel_mesh(mesh)
    fsdp_options = resolve_fsdp(mesh, fsdp)
    skeleton = cast_parameters(meta_skeleton(model), fsdp_options)

    def build(inputs, fixed: Plan | None, pinned: dict[str, str] | None = None):
        captured = capture(skeleton, inputs, device=tp_mesh.device_type)  # 1. torch.export on fake tensors
        simulator, chosen = _plan(captured, mesh, sequence_parallel, hardware, memory_budget, pinned)  # 2-4. analyse, label, choose
        if fixed is not None:
            check_plan_matches(fixed, chosen)
            chosen = fixed
        graph = rewrite_graph(captured, chosen, simulator, tp_mesh)  # 5. DTensor regions
        dry_run(captured, graph, chosen, tp_mesh)                    # 6. forward + backward on fake tensors
        return captured, chosen, graph

    captured, chosen, graph = build(example_inputs, plan)
    agree_across_ranks(chosen, tp_mesh)
    if strict:
        refuse_fallbacks(chosen, model, captured, sequence_parallel)
    # a call with other inputs is planned again, its parameters staying where they already are
    placed = {f: p.placement for f, p in chosen.params.items()}
    sharded = ShardedModule(model, mesh, replan=lambda named: build(named, None, placed))
    distribute_parameters(model, sharded, chosen, captured, tp_mesh)
    sharded.add_program(captured, chosen, graph)
    if fsdp_options is not None:
        data_parallel(sharded, **fsdp_options)                       # 7. FSDP2 over dp
    return finish(sharded, compile, lower)                          # 8. lower + torch.compile


def _plan(captured: Captured, mesh: DeviceMesh, sequence_parallel, hardware=None, memory_budget=None, pinned=None):
    # Planning simulates placements on fake tensors: a plan depends on the model and mesh only,
    # not on a CommDebugMode or FlopCounterMode the caller has active.
    with isolated_from_caller():
        return _plan_passes(captured, mesh, sequence_parallel, hardware, memory_budget, pinned)


def _plan_passes(captured: Captured, mesh: DeviceMesh, sequence_parallel, hardware, memory_budget, pinned=None):
    analysis = analyse(captured)
    simulator = PlacementSimulator(analysis, tensor_parallel_mesh(mesh))
    labels = label(analysis, simulator)
    return simulator, choose(labels, simulator, mesh_info(mesh), sequence_parallel, hardware=hardware, memory_budget=memory_budget,
                             pinned=pinned)


__all__ = ["autoshard", "plan", "Plan", "PlanError"]
