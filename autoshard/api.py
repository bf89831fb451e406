"""`autoshard(model, mesh)`: the pipeline, one pass per line."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoshard.distribute import distribute_parameters
from autoshard.errors import PlanError
from autoshard.mesh import mesh_info, tensor_parallel_mesh
from autoshard.passes.analyse import analyse
from autoshard.passes.capture import Captured, capture, meta_skeleton
from autoshard.passes.choose import choose
from autoshard.passes.label import label
from autoshard.passes.propagate import PlacementSimulator
from autoshard.passes.rewrite import rewrite_graph
from autoshard.plan import Plan
from autoshard.sharded_module import ShardedModule
from autoshard.validate import agree_across_ranks, check_plan_matches


def plan(model: nn.Module, mesh: DeviceMesh, example_inputs=None, *, sequence_parallel: bool | None = None) -> Plan:
    """Plan only: nothing is materialised, rewritten or communicated (works on `meta` models)."""
    return _plan(capture(model, example_inputs), mesh, sequence_parallel)[1]


def autoshard(
    model: nn.Module,
    mesh: DeviceMesh,
    example_inputs=None,
    *,
    sequence_parallel: bool | None = None,
    plan: Plan | None = None,
) -> ShardedModule:
    """Shard `model` over `mesh` and return a drop-in module; `model` itself is left untouched.

    `example_inputs`: positional args (tuple), keyword args (dict) or `(args, kwargs)`; optional
    for transformers models. `plan`: a `Plan` (e.g. `Plan.from_json`) to apply instead of planning.
    """
    tp_mesh = tensor_parallel_mesh(mesh)
    skeleton = meta_skeleton(model)

    def build(inputs, fixed: Plan | None):
        captured = capture(skeleton, inputs)                        # 1. torch.export on meta
        simulator, chosen = _plan(captured, mesh, sequence_parallel)  # 2-4. analyse, label, choose
        if fixed is not None:
            check_plan_matches(fixed, chosen)
            chosen = fixed
        graph = rewrite_graph(captured, chosen, simulator, tp_mesh)  # 5. DTensor regions
        return captured, chosen, graph

    captured, chosen, graph = build(example_inputs, plan)
    agree_across_ranks(chosen, tp_mesh)
    sharded = ShardedModule(model, mesh, replan=lambda named: build(named, None))
    distribute_parameters(model, sharded, chosen, captured, tp_mesh)
    sharded.add_program(captured, chosen, graph)
    return sharded


def _plan(captured: Captured, mesh: DeviceMesh, sequence_parallel):
    analysis = analyse(captured)
    simulator = PlacementSimulator(analysis, tensor_parallel_mesh(mesh))
    labels = label(analysis, simulator)
    return simulator, choose(labels, simulator, mesh_info(mesh), sequence_parallel)


__all__ = ["autoshard", "plan", "Plan", "PlanError"]
