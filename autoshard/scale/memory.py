"""Per-rank parameter memory of a plan, exact to the byte.

A `Shard(d)` parameter is split like `torch.chunk` (DTensor's rule): every rank but the last
non-empty one holds `ceil(n / tp)` rows of dim `d`, the rest what is left, possibly nothing;
`Replicate()` parameters are whole on every rank. Tied parameters are one tensor, counted once.

    per_rank = param_bytes_per_rank(plan)      # [bytes on tp rank 0, 1, ...]
    local_numel([151936, 896], "Shard(0)", tp=8, rank=7)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autoshard.schema.fused_parts import parts_of
from autoshard.schema.placements import is_split
from autoshard.schema.plan import Plan, parse_placement
from autoshard.schema.units import split_len


def local_numel(shape: list[int], placement: str, tp: int, rank: int) -> int:
    numel = math.prod(shape)
    p = parse_placement(placement)
    if not is_split(placement) or not shape:
        return numel
    dim = p.dim % len(shape)
    if shape[dim] == 0:
        return 0
    return numel // shape[dim] * split_len(shape[dim], tp, rank, parts_of(p))


def itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def unique_params(plan: Plan):
    """Each parameter tensor once: aliases of a tied parameter are skipped."""
    return [p for p in plan.params.values() if not p.tied_to]


def param_bytes_per_rank(plan: Plan) -> list[int]:
    tp = plan.mesh["tp"]
    return [sum(local_numel(p.shape, p.placement, tp, r) * itemsize(p.dtype) for p in unique_params(plan)) for r in range(tp)]


@dataclass
class ParamMemory:
    """Parameter bytes: the whole model, and per tensor-parallel rank (split by placement)."""

    total_params: int
    total_bytes: int
    per_rank: list[int]            # bytes on each tp rank
    sharded_per_rank: list[int]    # of which in Shard() parameters
    replicated_bytes: int          # Replicate() parameters (same on every rank)
    replicated_params: int

    @property
    def max_rank(self) -> int:
        return max(self.per_rank)


def param_memory(plan: Plan) -> ParamMemory:
    tp = plan.mesh["tp"]
    params = unique_params(plan)
    replicated = [p for p in params if not is_split(p.placement)]
    rep_bytes = sum(math.prod(p.shape) * itemsize(p.dtype) for p in replicated)
    per_rank = param_bytes_per_rank(plan)
    return ParamMemory(
        total_params=sum(math.prod(p.shape) for p in params),
        total_bytes=sum(math.prod(p.shape) * itemsize(p.dtype) for p in params),
        per_rank=per_rank,
        sharded_per_rank=[b - rep_bytes for b in per_rank],
        replicated_bytes=rep_bytes,
        replicated_params=sum(math.prod(p.shape) for p in replicated),
    )
