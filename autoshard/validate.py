"""Plan-time checks that keep ranks and plans consistent, before any collective of the model runs."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from autoshard.errors import PlanError
from autoshard.plan import Plan


def check_plan_matches(given: Plan, derived: Plan) -> None:
    """A loaded plan must be for this model (parameter names, shapes, dtypes) and this mesh."""
    if given.fingerprint != derived.fingerprint:
        missing = sorted(set(derived.params) ^ set(given.params))[:3]
        shapes = [f for f in derived.params if f in given.params and derived.params[f].shape != given.params[f].shape][:3]
        raise PlanError(
            f"the plan was made for another model: fingerprint {given.fingerprint} (model {given.model}) "
            f"vs {derived.fingerprint} (model {derived.model}); differing parameters: {missing or shapes}"
        )
    if given.mesh != derived.mesh:
        raise PlanError(f"the plan was made for mesh {given.mesh}, not {derived.mesh}")


def agree_across_ranks(plan: Plan, mesh: DeviceMesh) -> None:
    """Every rank must shard the same way; compare plan digests before any model collective.

    A rank with another config, inputs or library version would otherwise hang or corrupt data
    in a mismatched collective. One all-gather of 16 bytes; every rank raises the same error.
    """
    if not dist.is_initialized() or mesh.size() == 1:
        return
    digest = plan.digest()
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    if mesh.device_type != "cpu":
        mine = mine.to(mesh.device_type)
    gathered = [torch.empty_like(mine) for _ in range(mesh.size())]
    dist.all_gather(gathered, mine, group=mesh.get_group())
    digests = [bytes(g.cpu().tolist()).hex() for g in gathered]
    if len(set(digests)) > 1:
        ranks = {d: [i for i, x in enumerate(digests) if x == d] for d in dict.fromkeys(digests)}
        raise PlanError(
            "ranks disagree on the plan (different model config, inputs or library versions per rank): "
            + "; ".join(f"ranks {r} -> plan {d}" for d, r in ranks.items())
        )
