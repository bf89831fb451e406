"""Plan-time checks that keep ranks and plans consistent, before any collective of the model runs."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from autoshard.schema.errors import PlanError
from autoshard.schema.plan import Plan


def check_plan_matches(given: Plan, derived: Plan) -> None:
    """A loaded plan must be for this model (parameter names, shapes, dtypes), this mesh and this
    capture's node names (the plan places its regions and collectives by them)."""
    if given.fingerprint != derived.fingerprint:
        only_plan = sorted(set(given.params) - set(derived.params))[:3]
        only_model = sorted(set(derived.params) - set(given.params))[:3]
        shapes = [
            f"{f}: plan {given.params[f].shape} {given.params[f].dtype} vs model {derived.params[f].shape} {derived.params[f].dtype}"
            for f in derived.params
            if f in given.params and (derived.params[f].shape, derived.params[f].dtype) != (given.params[f].shape, given.params[f].dtype)
        ][:3]
        what = "; ".join(
            x for x in (
                f"only in the plan: {only_plan}" if only_plan else "",
                f"only in the model: {only_model}" if only_model else "",
                f"differing: {shapes}" if shapes else "",
            ) if x
        )
        raise PlanError(
            f"the plan was made for another model: fingerprint {given.fingerprint} (model {given.model}) "
            f"vs {derived.fingerprint} (model {derived.model}); {what or 'parameter names, shapes or dtypes differ'}"
        )
    if given.mesh != derived.mesh:
        diff = {k: (given.mesh.get(k), derived.mesh.get(k)) for k in sorted(set(given.mesh) | set(derived.mesh)) if given.mesh.get(k) != derived.mesh.get(k)}
        raise PlanError(
            f"the plan was made for mesh {given.mesh}, not {derived.mesh} "
            f"(differs in {', '.join(f'{k}: plan {a} vs now {b}' for k, (a, b) in diff.items())}); plan again for this mesh"
        )
    ours = {(r.name, frozenset(r.nodes)) for r in derived.regions}
    names = {name for name, _ in ours}
    renamed = [r.name for r in given.regions if r.name in names and (r.name, frozenset(r.nodes)) not in ours]
    if renamed:
        raise PlanError(
            f"the plan names graph nodes this capture names differently (region {renamed[0]} and {len(renamed) - 1} more): "
            "the model's code traced in another order (e.g. it iterates a set, whose order follows PYTHONHASHSEED); "
            "plan again, or save and load plans with the same PYTHONHASHSEED"
        )


_HEAD = 1 + 8 + 8  # failed flag, plan digest, model fingerprint
_MSG_BYTES = 480  # of each rank's error text carried in the exchange (utf-8, zero padded)


def agree_across_ranks(plan: Plan | BaseException, mesh: DeviceMesh) -> None:
    """Every rank must shard the same way; compare plan digests before any model collective.

    A rank with another config, inputs or library version would otherwise hang or corrupt data
    in a mismatched collective. One all-gather of 512 bytes per rank; every rank raises the same
    error. Pass the exception instead of a plan when planning failed on this rank, so that the
    other ranks, which are waiting in this exchange, fail with it instead of hanging:

        try:
            chosen = make_plan()
        except PlanError as e:
            agree_across_ranks(e, tp_mesh)  # raises on every rank
        agree_across_ranks(chosen, tp_mesh)
    """
    failed = isinstance(plan, BaseException)
    if not dist.is_initialized() or mesh.size() == 1:
        if failed:
            raise plan
        return
    digest = hashlib.sha256(str(plan).encode()).hexdigest()[:16] if failed else plan.rank_digest()
    model = "0" * 16 if failed else plan.fingerprint
    text = (f"{type(plan).__name__}: {plan}" if failed else "").encode()[:_MSG_BYTES]
    mine = torch.zeros(_HEAD + _MSG_BYTES, dtype=torch.uint8)
    mine[0] = int(failed)
    mine[1:9] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    mine[9:17] = torch.tensor(list(bytes.fromhex(model)), dtype=torch.uint8)
    mine[_HEAD : _HEAD + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    if mesh.device_type != "cpu":
        mine = mine.to(mesh.device_type)
    gathered = [torch.empty_like(mine) for _ in range(mesh.size())]
    dist.all_gather(gathered, mine, group=mesh.get_group())
    rows = [g.cpu() for g in gathered]
    errors = {i: bytes(r[_HEAD:].tolist()).rstrip(b"\0").decode(errors="replace") for i, r in enumerate(rows) if r[0]}
    if errors:
        first = min(errors)
        message = f"planning failed on ranks {sorted(errors)} of {mesh.size()} (rank {first}: {errors[first]})"
        if failed:
            raise PlanError(message) from plan
        raise PlanError(message)
    digests = [bytes(r[1:9].tolist()).hex() for r in rows]
    models = [bytes(r[9:17].tolist()).hex() for r in rows]
    if len(set(digests)) > 1:
        ranks = {d: [i for i, x in enumerate(digests) if x == d] for d in dict.fromkeys(digests)}
        cause = (
            "the models differ (parameter names, shapes or dtypes: another config per rank)" if len(set(models)) > 1
            else "same model, so the inputs, options or library versions differ"
        )
        raise PlanError(
            f"ranks disagree on the plan: {cause}; "
            + "; ".join(f"ranks {r} -> plan {d} (model fingerprint {models[r[0]]})" for d, r in ranks.items())
        )
