"""The plan: plain data saying where every parameter lives, which regions run sharded, and which
collectives run at region boundaries — with the reason for each. JSON in and out (no pickle, no
eval), a readable report, `explain(name)`, and the equivalent `parallelize_module` plan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autoshard.schema.errors import PlanError
from autoshard.schema.placements import parse_placement, placement_str, planned_placement  # noqa: F401 - the plan's vocabulary

PLAN_FORMAT = 1




# the two layouts of the residual stream: split on the sequence dim, or whole on every rank
SP_STREAM, REPLICATED_STREAM = "sequence_parallel", "replicated"
STREAM_TEXT = {SP_STREAM: "sequence-parallel", REPLICATED_STREAM: "replicated"}


@dataclass
class ParamPlan:
    fqn: str
    placement: str                 # "Shard(0)" | "Shard(1)" | "Replicate()"
    shape: list[int]
    dtype: str
    region: str | None
    reason: str
    grad_reduce: bool = False      # replicated, used on shards: partial grads summed over tp
    tied_to: str | None = None


@dataclass
class RegionPlan:
    name: str
    kind: str                      # "column_row" | "column_output" | "embedding"
    strategy: str                  # "sharded" | "replicated"
    column: list[str]              # parameter FQNs of the column (or embedding) side
    row: list[str]
    nodes: list[str]               # graph nodes of the region
    reason: str
    loss_parallel: bool = False
    candidates: list[dict] = field(default_factory=list)  # every option considered, for explain()


@dataclass
class BoundaryPlan:
    node: str                      # the producer whose output changes layout
    src: str
    dst: str
    collective: str | None         # None: a local slice, no communication
    bytes: int                     # global tensor bytes at the example shape (NCCL's S)
    reason: str
    kind: str = "redistribute"     # "redistribute" (a graph node) | "output" | "loss" (inside the op)


@dataclass
class Plan:
    format: int
    model: str
    fingerprint: str
    mesh: dict                     # shape, dim_names, tp_dim, tp, device_type
    stream: str                    # "sequence_parallel" | "replicated"
    params: dict[str, ParamPlan]
    regions: list[RegionPlan]
    boundaries: list[BoundaryPlan]
    attention: dict[str, str] = field(default_factory=dict)      # sdpa node -> "Shard(1)" etc.
    loss_parallel: list[str] = field(default_factory=list)       # cross-entropy nodes
    sharded_outputs: list[str] = field(default_factory=list)     # outputs returned as DTensors
    expert_parallel: dict[str, int] = field(default_factory=dict)  # MoE block (first grouped matmul) -> token dim split
    implicit: list[dict] = field(default_factory=list)           # redistributions not planned
    notes: list[str] = field(default_factory=list)
    estimate: dict | None = None

    # ---- data -----------------------------------------------------------------------------------
    def placements(self) -> dict[str, Placement]:
        return {fqn: parse_placement(p.placement) for fqn, p in self.params.items()}

    def boundary_placements(self) -> dict[str, Placement]:
        return {b.node: parse_placement(b.dst) for b in self.boundaries if b.kind == "redistribute"}

    def collective_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b in self.boundaries:
            if b.collective:
                counts[b.collective] = counts.get(b.collective, 0) + 1
        return counts

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(asdict(self), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan JSON does not parse: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an autoshard plan of format {PLAN_FORMAT} (got format={raw.get('format') if isinstance(raw, dict) else None!r})")
        try:
            raw["params"] = {k: ParamPlan(**v) for k, v in raw["params"].items()}
            raw["regions"] = [RegionPlan(**r) for r in raw["regions"]]
            raw["boundaries"] = [BoundaryPlan(**b) for b in raw["boundaries"]]
            plan = cls(**raw)
        except (KeyError, TypeError) as e:
            raise PlanError(f"plan JSON is missing or has unknown fields: {e}") from None
        for p in plan.params.values():
            parse_placement(p.placement)
        return plan

    def digest(self) -> str:
        """A hash of everything that decides runtime behaviour."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("estimate", "notes")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def rank_digest(self) -> str:
        """What ranks must agree on: every parameter's placement, each region's strategy and the
        collectives in graph order, without graph node names. Two processes trace the same model
        with differently named nodes when model code iterates a set (transformers'
        `for layer_type in set(config.layer_types)` builds its masks in hash-seed order, and each
        rank has its own seed): that changes no collective, so it must not fail the agreement."""
        keep = {
            "fingerprint": self.fingerprint, "mesh": self.mesh, "stream": self.stream,
            "params": {f: (p.placement, p.grad_reduce, p.tied_to) for f, p in self.params.items()},
            "regions": [(r.name, r.kind, r.strategy, r.column, r.row, len(r.nodes), r.loss_parallel) for r in self.regions],
            "boundaries": [(b.src, b.dst, b.collective, b.bytes, b.kind) for b in self.boundaries],
            "layouts": [sorted(self.attention.values()), len(self.loss_parallel), len(self.sharded_outputs),
                        sorted(self.expert_parallel.values()), len(self.implicit)],
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    # ---- inspection -----------------------------------------------------------------------------
    def report(self) -> str:
        from autoshard.schema.report import render_report

        return render_report(self)

    def explain(self, name: str) -> str:
        from autoshard.schema.report import render_explain

        return render_explain(self, name)

    def to_html(self, path=None) -> str:
        """The plan as one self-contained HTML page (`schema/html.py`); written to `path` if given."""
        from autoshard.schema.html import render_html

        page = render_html(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def to_parallelize_plan(self) -> dict[str, Any]:
        from autoshard.schema.export_plan import to_parallelize_plan

        return to_parallelize_plan(self)


def model_fingerprint(model_name: str, params: dict[str, tuple[list[int], str]]) -> str:
    text = model_name + ";" + ";".join(f"{k}:{v[0]}:{v[1]}" for k, v in sorted(params.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
