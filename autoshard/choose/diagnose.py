"""Turn a region that fell back to replication into a reason the user can act on.

The label pass records why a candidate region could not run sharded in DTensor's words, e.g.
`view (aten.view.default): ... output dimension 0 (size 14) is not evenly divisible by mesh
dimension 0 (size 4)`. That is a *divisibility* failure: the region's output features are viewed
as `14 x head_dim` and 14 heads cannot be split over 4 ranks. Another tp would shard it, so it is
a fallback the user may want to hear about (`strict=True` refuses it). The failing size is matched
against the model's own vocabulary — integer attributes of `model.config`, then of the modules
that own the region's parameters — so the message says `num_attention_heads=14` instead of `14`.

Failures no tp value fixes (a router's softmax over its sharded outputs, an op DTensor cannot
shard) are the plan's design, not a fallback. Neither are K/V projections left replicated while
the query projection that reads the same activation is sharded: that is the KV-head replication
for `tp > num_key_value_heads`, with exact numerics.

    >>> for d in fallbacks(plan, model):
    ...     print(d.message)
    model.layers.0.self_attn runs replicated: the output features of q_proj are split into
    num_attention_heads=14 heads (view [2, 8, 14, 64]), and 14 is not divisible by tp=4; tp values
    that would shard it: 2, 7, 14
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from torch import nn

from autoshard.schema.placements import is_split
from autoshard.schema.plan import Plan, RegionPlan

# DTensor's view rule, e.g. "Cannot unflatten unevenly sharded tensor: output dimension 0 (size 14)
# is not evenly divisible by mesh dimension 0 (size 4)"
_UNEVEN = re.compile(r"\(size (\d+)\) is not evenly divisible by mesh dimension \d+ \(size (\d+)\)")
_NODE = re.compile(r"^(\S+) \(([\w.]+)\)")
# config integers that are identifiers or counters, never a shape a view splits by
_NOT_SHAPES = re.compile(r"(_id$|_ids$|token|layers|^chunk_size|window|max_position)")


@dataclass
class Diagnosis:
    """One region that runs replicated although another tp would shard it."""

    region: str
    node: str                       # the graph node that needed communication
    size: int                       # the dimension tp does not divide
    tp: int
    attribute: str | None = None    # e.g. "num_attention_heads" (config) or "stack.0.mix.heads"
    view_shape: list[int] | None = None
    working_tp: list[int] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    group: frozenset = frozenset()  # the column group this region was tried in

    @property
    def message(self) -> str:
        what = f"{self.attribute}={self.size}" if self.attribute else f"a dimension of size {self.size}"
        first = self.columns[0].rsplit(".", 1)[0].rsplit(".", 1)[-1] if self.columns else self.region
        shape = f" (view {self.view_shape} at node {self.node})" if self.view_shape else f" (node {self.node})"
        works = ", ".join(map(str, self.working_tp)) or "none above 1"
        return (
            f"{self.region} runs replicated: the output features of {first} are split by {what}{shape}, "
            f"and {self.size} is not divisible by tp={self.tp}; tp values that would shard it: {works}"
        )


def fallbacks(plan: Plan, model: nn.Module | None = None, graph_nodes: dict | None = None) -> list[Diagnosis]:
    """Regions of `plan` that fell back to replication because tp does not divide a size.

    `model` (the user's module, or its meta skeleton) supplies `config` and module attributes for
    naming the size; `graph_nodes` (node name -> fx.Node of the captured graph) the view's shape.
    """
    tp = int(plan.mesh.get("tp", 1))
    out: list[Diagnosis] = []
    for region in plan.regions:
        if region.strategy != "replicated" or _serves_sharded_sibling(plan, region):
            continue
        d = _divisibility(region, tp)
        if d is None:
            continue
        d.columns = list(region.column)
        if graph_nodes and d.node in graph_nodes:
            d.view_shape = _view_shape(graph_nodes[d.node])
        d.attribute = name_size(model, d.size, region.column) if model is not None else None
        d.group = _group(region)
        d.region = _group_name(d.group) or d.region
        out.append(d)
    # Projections tried as one group (q, k, v read the same input): the query heads decide, since
    # K/V heads that tp does not divide are replicated once the query heads shard. Query heads are
    # the largest count of a group (a KV head serves >= 1 query heads), so smaller failures go.
    largest: dict[frozenset, int] = {}
    for d in out:
        largest[d.group] = max(largest.get(d.group, 0), d.size)
    return [d for d in out if d.size == largest[d.group]]


def strict_error(plan: Plan, model: nn.Module | None = None, graph_nodes: dict | None = None) -> str | None:
    """The `strict=True` refusal for `plan`, or None when nothing fell back."""
    found = fallbacks(plan, model, graph_nodes)
    if not found:
        return None
    unique: dict[tuple, Diagnosis] = {}
    for d in found:
        unique.setdefault((d.attribute, d.size), d)
    head = [d.message for d in unique.values()]
    regions = sorted({d.region for d in found})
    shown = ", ".join(regions[:6]) + (f", ... ({len(regions)} regions)" if len(regions) > 6 else "")
    return (
        "strict=True: the plan falls back to replication where another tp would shard:\n  - "
        + "\n  - ".join(head)
        + f"\nreplicated regions: {shown}\n"
        "Use one of the tp values above, or strict=False to accept the fallback (exact, but those regions "
        "run whole on every rank)."
    )


# ---- pieces ---------------------------------------------------------------------------------------
def _divisibility(region: RegionPlan, tp: int) -> Diagnosis | None:
    own = sorted(region.candidates, key=lambda c: c.get("column") != region.column)  # its own attempt first
    for cand in own:
        if cand.get("strategy") != "sharded" or cand.get("legal"):
            continue
        m = _UNEVEN.search(cand.get("reason", ""))
        if not m:
            continue
        size, mesh_size = int(m.group(1)), int(m.group(2))
        node = _NODE.match(cand["reason"])
        return Diagnosis(
            region=region.name, node=node.group(1) if node else "?", size=size, tp=mesh_size or tp,
            working_tp=[t for t in range(2, size + 1) if size % t == 0],
        )
    return None


def _serves_sharded_sibling(plan: Plan, region: RegionPlan) -> bool:
    """K/V projections replicated next to a sharded query projection (they read the same input and
    were tried as one group): each rank computes the KV heads its query heads use. By design."""
    own = set(region.column)
    for cand in region.candidates:
        siblings = set(cand.get("column", [])) - own
        if siblings and any(plan.params.get(f) is not None and is_split(plan.params[f].placement) for f in siblings):
            return True
    return False


def _group(region: RegionPlan) -> frozenset:
    cols = [set(c.get("column", [])) for c in region.candidates if set(region.column) <= set(c.get("column", []))]
    return frozenset(max(cols, key=len)) if cols else frozenset(region.column)


def _group_name(group: frozenset) -> str | None:
    """The module that holds a group tried together (q, k, v -> `...self_attn`): the user thinks of
    the attention block running replicated, not of one projection."""
    paths = [f.split(".")[:-2] for f in group]  # drop the parameter name and the linear's own name
    prefix = os.path.commonprefix(paths) if len(paths) > 1 else None
    return ".".join(prefix) if prefix else None


def _view_shape(node) -> list[int] | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    from autoshard.graph.simulate import hint

    return [int(hint(s)) for s in shape]


def name_size(model: nn.Module, size: int, columns: list[str]) -> str | None:
    """The model's name for `size`: a `config` integer attribute, else one of an owning module's.

    Head counts win over other attributes of the same value (`num_attention_heads` before
    `num_hidden_layers`), since a head split is what a view of projected features does.
    """
    config = getattr(model, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        found = _rank_names([k for k, v in _integers(values) if v == size])
        if found:
            return found[0]
    for fqn in columns:
        path = fqn.split(".")[:-1]
        while path:
            try:
                mod = model.get_submodule(".".join(path))
            except AttributeError:
                path.pop()
                continue
            names = _rank_names([k for k, v in _integers(vars(mod)) if v == size and not k.startswith("_")])
            if names:
                return ".".join(path + [names[0]])
            path.pop()
    return None


def _integers(values: dict):
    for k, v in values.items():
        if isinstance(v, int) and not isinstance(v, bool) and not _NOT_SHAPES.search(k):
            yield k, v
        elif isinstance(v, dict):  # nested configs (text_config of multimodal models)
            yield from ((f"{k}.{kk}", vv) for kk, vv in _integers(v))


def _rank_names(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (0 if "attention_head" in n else 1 if "head" in n else 2, n))


def refuse_fallbacks(plan: Plan, model: nn.Module, captured=None, sequence_parallel: bool | None = None) -> None:
    """`strict=True`: raise PlanError (at plan time, before any parameter moves) when `plan` falls
    back — a region another tp would shard runs replicated, or sequence parallelism was asked
    for (`sequence_parallel=True`) and the plan could not use it."""
    from autoshard.schema.errors import PlanError

    nodes = {n.name: n for n in captured.program.graph.nodes} if captured is not None else None
    problems = []
    message = strict_error(plan, model, nodes)
    if message:
        problems.append(message)
    if sequence_parallel and plan.stream != "sequence_parallel":
        why = next((n for n in plan.notes if n.startswith("sequence parallel not used")), "sequence parallel not used")
        problems.append(f"strict=True with sequence_parallel=True: {why}")
    if problems:
        raise PlanError("\n".join(problems))
