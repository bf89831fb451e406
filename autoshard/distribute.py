"""Parameters become DTensors under their original names; replicated ones get summed gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from autoshard.passes.capture import Captured
from autoshard.plan import Plan


def distribute_parameters(model: nn.Module, sharded: nn.Module, plan: Plan, captured: Captured, mesh: DeviceMesh) -> None:
    """Copy `model`'s parameters (as DTensors, rank 0's values) and buffers into `sharded`.

    `distribute_tensor` scatters from rank 0 as `parallelize_module` does, so every rank starts
    from the same weights even if their random inits differ. Tied parameters stay one Parameter.
    """
    placements = plan.placements()
    made: dict[int, nn.Parameter] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in made:
            dt = distribute_tensor(p.detach(), mesh, [placements.get(fqn, placements.get(captured.tied.get(fqn, ""), None)) or _replicate()])
            made[id(p)] = nn.Parameter(dt, requires_grad=p.requires_grad)
            if made[id(p)].requires_grad:
                made[id(p)].register_post_accumulate_grad_hook(_settle_grad)
        sharded.adopt(fqn, made[id(p)])
    persistent = {s.target: s.persistent for s in captured.program.graph_signature.input_specs if s.kind.name == "BUFFER"}
    for fqn, b in model.named_buffers(remove_duplicate=False):
        sharded.adopt(fqn, b, buffer=True, persistent=persistent.get(fqn, fqn in model.state_dict()))


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()


def _settle_grad(param: torch.Tensor) -> None:
    """A replicated parameter used on shards (norm weights under SP, per-head norms) accumulates a
    `Partial` gradient; sum it once here so optimizers, clipping and checkpoints see a plain
    replicated gradient, laid out like its parameter."""
    g = param.grad
    if isinstance(g, DTensor) and g.placements != param.placements:
        param.grad = g.redistribute(param.device_mesh, param.placements)
