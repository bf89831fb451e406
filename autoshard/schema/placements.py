"""Placements as the plan writes them: "Shard(0)", "Replicate()", "Partial()" (a sum; "Partial(avg)"
for a mean of equal shards' means, a norm's statistic)."""

from __future__ import annotations

import re

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.schema.fused_parts import StridedParts
from autoshard.schema.errors import PlanError

_PLACEMENT = re.compile(r"^(Shard)\((-?\d+)\)$|^(Replicate)\(\)$|^(Partial)\((avg)?\)$")


def placement_str(p: Placement) -> str:
    if isinstance(p, StridedParts):
        return f"_StridedShard({p.dim}, parts={'|'.join(map(str, p.sizes))})"
    if isinstance(p, _StridedShard):
        return f"_StridedShard({p.dim}, sf={p.split_factor})"
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    if isinstance(p, Partial):
        return "Partial(avg)" if p.reduce_op == "avg" else "Partial()"
    return "Replicate()"


_STRIDED = re.compile(r"^_StridedShard\((-?\d+), sf=(\d+)\)$")
_PARTS = re.compile(r"^_StridedShard\((\d+), parts=(\d+(?:\|\d+)+)\)$")


def parse_placement(text: str) -> Placement:
    parts = _PARTS.match(text.strip())
    if parts:  # a fused weight of unequal parts (q | k | v with fewer KV heads), each split over the mesh
        return StridedParts(int(parts.group(1)), tuple(int(s) for s in parts.group(2).split("|")))
    strided = _STRIDED.match(text.strip())
    if strided:  # DTensor's layout for a fused weight: each of sf equal parts split over the mesh
        return _StridedShard(int(strided.group(1)), split_factor=int(strided.group(2)))
    m = _PLACEMENT.match(text.strip())
    if not m:
        raise PlanError(f"not a placement: {text!r} (expected Shard(d), Replicate() or Partial())")
    if m.group(1):
        return Shard(int(m.group(2)))
    return Replicate() if m.group(3) else Partial(m.group(5) or "sum")


def parse_placements(text: str) -> tuple[Placement, ...]:
    """A mesh's placements as `Simulation` writes them, one per mesh dim, comma-separated."""
    return tuple(parse_placement(p) for p in re.split(r",(?![^(]*\))", text))


def splits(p: Placement) -> bool:
    """Is `p` a split over the mesh: `Shard(d)`, or `_StridedShard` (not a `Shard` subclass)?"""
    return p.is_shard() or isinstance(p, _StridedShard)


def is_split(text: str) -> bool:
    """Is a plan's placement text a split over the mesh (`Shard(d)`, or a fused weight's `_StridedShard`)?"""
    return text.startswith(("Shard(", "_StridedShard("))


def planned_placement(placements: dict[str, Placement], tied: dict[str, str], fqn: str) -> Placement:
    """The placement of parameter `fqn` (a tied name has its table's, `tied`: name -> table), Replicate if none."""
    return placements.get(fqn, placements.get(tied.get(fqn, ""), None)) or Replicate()
