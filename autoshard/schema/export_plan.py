"""A Plan as the `parallelize_module` dict people write by hand (torchtitan / TP tutorial style).

Every style keeps DTensor outputs (`use_local_output=False`) so the residual stream keeps its
global shape: local tensors between layers break HF rotary and uneven sequence shards
(torchtitan#1306). Run the parallelised model's forward and backward under
`implicit_replication()` (HF builds masks and rotary tables as plain tensors).
Tied parameters: `parallelize_module` re-registers parameters, so re-tie them afterwards
(e.g. `model.lm_head.weight = model.model.embed_tokens.weight`).

`ColwiseParallel`/`RowwiseParallel` split dim 0 / dim 1 of an `nn.Linear` weight, contiguously. A
plan that splits a weight otherwise — a fused projection part by part (`_StridedShard`), GPT-2's
`Conv1D` (`[in, out]`), 3-D expert weights — has no `ParallelStyle` equivalent: exporting it is
refused, naming the weights, rather than handing over a dict that would split them wrongly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from autoshard.schema.placements import parse_placement
from autoshard.schema.styles import ReplicateParameters

if TYPE_CHECKING:
    from autoshard.schema.plan import Plan


def _module(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0]


def to_parallelize_plan(plan: Plan) -> dict:
    _refuse_without_style(plan)
    stream = Replicate()
    if plan.stream == "sequence_parallel":
        dims = [parse_placement(b.dst) for b in plan.boundaries if b.kind == "redistribute" and b.dst.startswith("Shard")]
        stream = dims[0] if dims else Shard(1)
    styles: dict = {}
    for r in plan.regions:
        if r.strategy != "sharded":
            continue
        if r.kind == "embedding":
            for fqn in r.column:
                styles[_module(fqn)] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=False)
        elif r.kind == "column_output":
            out = Shard(-1) if r.loss_parallel else Replicate()
            for fqn in r.column:
                styles[_module(fqn)] = ColwiseParallel(input_layouts=stream, output_layouts=out, use_local_output=False)
        else:
            for fqn in r.column:
                styles[_module(fqn)] = ColwiseParallel(input_layouts=stream, use_local_output=False)
            for fqn in r.row:
                styles[_module(fqn)] = RowwiseParallel(input_layouts=Shard(-1), output_layouts=stream, use_local_output=False)
    for p in plan.params.values():
        mod = _module(p.fqn)
        if p.placement != "Replicate()" or mod in styles or p.tied_to:
            continue
        if plan.stream == "sequence_parallel" and p.grad_reduce and p.region == mod and _is_stream_norm(plan, p.fqn):
            styles[mod] = SequenceParallel(sequence_dim=stream.dim, use_local_output=False)
        else:
            styles[mod] = ReplicateParameters()
    return styles


def _refuse_without_style(plan: Plan) -> None:
    from autoshard.schema.errors import PlanError

    odd = []
    for r in plan.regions:
        if r.strategy != "sharded" or r.kind == "embedding":
            continue
        for fqns, style in ((r.column, "Shard(0)"), (r.row, "Shard(1)")):
            for fqn in fqns:
                p = plan.params.get(fqn)
                if p is not None and (len(p.shape) != 2 or p.placement not in (style, "Replicate()")) and not fqn.endswith(".bias"):
                    odd.append(f"{fqn} ({p.placement} of {'x'.join(map(str, p.shape))})")
    if odd:
        raise PlanError("no ParallelStyle splits these weights as the plan does (ColwiseParallel/RowwiseParallel split an "
                        f"nn.Linear weight's dim 0/1 contiguously): {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}; "
                        "apply the plan with autoshard(model, mesh, plan=plan) instead")


def _is_stream_norm(plan: Plan, fqn: str) -> bool:
    """A replicated weight outside every sharded region: it runs on the sequence-sharded stream."""
    return not any(fqn.startswith(r.name + ".") for r in plan.regions if r.strategy == "sharded" and r.kind == "column_row")
