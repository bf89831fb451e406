"""Plan-time dry run: the rewritten DTensor program, forward and backward, on fake tensors.

A plan that cannot run must be refused when it is made, not at the user's first step. Running
the program on fake tensors (shapes, strides, dtypes and placements, no data, no communication:
collectives on fake tensors only compute their output metadata) catches what placement
simulation cannot see: a `view` that the sharded strides do not allow, a redistribution DTensor
does not implement, a plain tensor meeting a DTensor where the rewrite did not expect one.

Programs whose shapes depend on data (`.item()` in MoE routing) cannot run without data; they
skip the dry run (`None`), as does anything fake tensors cannot express.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from autoshard.schema.errors import PlanError
from autoshard.graph.capture import Captured
from autoshard.graph.simulate import hint
from autoshard.schema.plan import Plan, planned_placement

_CANNOT_FAKE = ("DataDependent", "DynamicOutputShape", "UnsupportedOperator", "data-dependent", "unbacked")


class ProgramDoesNotRun(PlanError):
    """The sharded program fails on fake tensors: refused before it runs."""


def dry_run(captured: Captured, gm: fx.GraphModule, plan: Plan, mesh: DeviceMesh) -> str | None:
    """Run `gm` forward and backward on fake inputs; raise ProgramDoesNotRun naming the failing
    node. Returns why the dry run was skipped, or None when it ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    placements = plan.placements()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            values = [_fake_input(captured, node, placements, mesh) for node in gm.graph.nodes if node.op == "placeholder"]
            outputs = gm.forward(*values)
            leaves = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
            scalars = [o for o in leaves if o.ndim == 0]  # a loss: backward from it, as training does
            if scalars or leaves:
                total = sum(_whole(o).float() for o in scalars) if scalars else sum(_whole(o).float().sum() for o in leaves)
                total.backward()
    except Exception as e:  # noqa: BLE001 - classified below
        text = f"{type(e).__name__}: {e}"
        if any(k in text for k in _CANNOT_FAKE):
            return f"dry run skipped: {text.splitlines()[0][:200]}"
        node = _failing_node(e)
        raise ProgramDoesNotRun(
            f"the sharded program of {captured.model_name} does not run{f' at {node}' if node else ''}: "
            f"{text.strip().splitlines()[0][:400]} — an autoshard bug; shard with sequence_parallel=False, or "
            "report it with the plan (sharded.plan.report())"
        ) from e
    return None


def _fake_input(captured: Captured, node: fx.Node, placements: dict, mesh: DeviceMesh):
    val = node.meta.get("val")
    fqn = captured.param_fqns.get(node.name)
    if not isinstance(val, torch.Tensor):
        return val
    shape = hint(tuple(val.shape))
    t = torch.empty(shape, dtype=val.dtype, device=mesh.device_type)
    if fqn is None:
        return t
    placement = planned_placement(placements, captured.tied, fqn)
    # DTensor's own arithmetic for this rank's shard (a fused weight's `_StridedShard` included)
    local_shape, _ = compute_local_shape_and_global_offset(t.shape, mesh, [placement])
    local = torch.empty(local_shape, dtype=val.dtype, device=mesh.device_type)
    dt = DTensor.from_local(local, mesh, [placement], run_check=False, shape=t.shape, stride=t.stride())
    return dt.requires_grad_(t.is_floating_point())


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _failing_node(err: BaseException) -> str | None:
    import re

    text = str(err)
    m = re.search(r"While executing (%\S+)", text)
    return m.group(1) if m else None
