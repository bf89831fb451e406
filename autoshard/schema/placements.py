"""Placements as the plan writes them: "Shard(0)", "Replicate()", "Partial()"."""

from __future__ import annotations

import re

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autoshard.schema.errors import PlanError

_PLACEMENT = re.compile(r"^(Shard)\((-?\d+)\)$|^(Replicate)\(\)$|^(Partial)\(\)$")


def placement_str(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    if isinstance(p, Partial):
        return "Partial()"
    return "Replicate()"


_PLACEMENT = re.compile(r"^(Shard)\((-?\d+)\)$|^(Replicate)\(\)$|^(Partial)\(\)$")



def parse_placement(text: str) -> Placement:
    m = _PLACEMENT.match(text.strip())
    if not m:
        raise PlanError(f"not a placement: {text!r} (expected Shard(d), Replicate() or Partial())")
    if m.group(1):
        return Shard(int(m.group(2)))
    return Replicate() if m.group(3) else Partial()


def planned_placement(placements: dict[str, Placement], tied: dict[str, str], fqn: str) -> Placement:
    """The placement of parameter `fqn` (a tied name has its table's, `tied`: name -> table), Replicate if none."""
    return placements.get(fqn, placements.get(tied.get(fqn, ""), None)) or Replicate()
