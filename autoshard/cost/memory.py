"""Per-rank memory of a simulated plan: parameters, gradients, optimizer state, saved activations.

Everything is priced on rank 0, the largest shard under `torch.chunk`'s uneven layout (the first
ranks get `ceil(n / tp)` rows). Gradients are laid out like their parameters (autoshard reduces
`Partial` gradients of replicated parameters in backward); Adam keeps two fp32 moments per
parameter element. Activations are the tensors autograd saves (`activation.py`), each at the
placement its saving op sees.

    >>> mem = plan_memory(analysis, sim, saved, loss_parallel={"cross_entropy_loss"})
    >>> mem.total, mem.activations
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from autoshard.cost.activation import SavedActivations
from autoshard.graph.analyse import GraphAnalysis
from autoshard.schema.fused_parts import parts_of
from autoshard.schema.placements import splits
from autoshard.schema.units import chunk_block, split_len

ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32 each (torch.optim.Adam/AdamW on fp32 params)


@dataclass
class MemoryBreakdown:
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def __add__(self, other: "MemoryBreakdown") -> "MemoryBreakdown":
        return MemoryBreakdown(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def local_fraction(spec, shape: tuple[int, ...] | None = None) -> float:
    """Rank 0's share of a tensor with `spec`'s placements (Partial and Replicate hold it all)."""
    if not isinstance(spec, DTensorSpec):
        return 1.0
    shape = tuple(shape or spec.tensor_meta.shape)
    frac = 1.0
    n = spec.mesh.size()
    for p in spec.placements:
        if splits(p) and shape:
            size = shape[p.dim % len(shape)]
            if size:
                frac *= split_len(size, n, 0, parts_of(p)) / size
    return frac


def local_bytes(spec, nbytes: int) -> int:
    return int(math.ceil(nbytes * local_fraction(spec)))


def state_memory(analysis: GraphAnalysis, sim, optimizer: str | None = "adam") -> MemoryBreakdown:
    """Parameters, gradients and optimizer state per rank (tied parameters counted once)."""
    out = MemoryBreakdown()
    captured = analysis.captured
    for ph, fqn in captured.param_fqns.items():
        if fqn in captured.tied:
            continue
        val = analysis.nodes[ph].meta["val"]
        numel = math.prod(int(s) for s in val.shape)
        frac = local_fraction(sim.specs.get(_read_as(analysis, ph, fqn)), tuple(int(s) for s in val.shape))
        local = int(math.ceil(numel * frac))
        out.params += local * val.dtype.itemsize
        if val.requires_grad:
            # a vocab-parallel table's gradient is computed whole by DTensor, then compacted to the
            # rank's rows after it accumulates (autoshard.distribute.GradReducer)
            out.grads += local * val.dtype.itemsize
            if optimizer:
                out.optimizer += local * ADAM_STATE_BYTES
    return out


def _read_as(analysis: GraphAnalysis, ph: str, fqn: str) -> str:
    """The placeholder whose placement a tied tensor has: export may read it under an alias
    (`lm_head.weight`) and leave the canonical name's placeholder unused, hence unplaced."""
    captured = analysis.captured
    if analysis.nodes[ph].users:
        return ph
    return next((p for p, f in captured.param_fqns.items() if captured.tied.get(f) == fqn and analysis.nodes[p].users), ph)


def boundary_sources(sim) -> dict[str, DTensorSpec]:
    """Each planned boundary node's spec *before* its redistribution (what the node itself made)."""
    from autoshard.schema.placements import parse_placements

    before = {}
    for r in sim.redistributions:
        if r.planned and r.source == r.consumer and r.consumer in sim.specs:
            after = sim.specs[r.consumer]
            if isinstance(after, DTensorSpec):
                before[r.source] = DTensorSpec(after.mesh, parse_placements(r.src), after.tensor_meta)
    return before


def activation_memory(saved: SavedActivations, sim, loss_parallel: set[str] = frozenset(), before: dict | None = None,
                      keep=None) -> dict[str, int]:
    """Saved-for-backward bytes per rank, by the node that saves them (sum = activation memory);
    `keep(entry)`: only the saved tensors it accepts (what activation checkpointing keeps)."""
    variants = {n: "vocab_parallel_loss" for n in loss_parallel}
    before = boundary_sources(sim) if before is None else before
    per_node: dict[str, int] = {}
    seen: set[tuple] = set()
    for e in saved.active(variants):
        if keep is not None and not keep(e):
            continue
        own = e.consumer == e.producer or e.internal
        spec = before.get(e.producer, sim.specs.get(e.producer)) if own else sim.specs.get(e.producer)
        if e.consumer in saved.attention:  # attention saves q, k, v as it runs them: on its heads
            spec = sim.specs.get(e.consumer)
        if isinstance(spec, tuple):  # multi-output ops: their tensors share the op's layout
            spec = next((s for s in spec if isinstance(s, DTensorSpec)), None)
        key = (e.storage, _placement_key(spec))
        if key in seen:
            continue
        seen.add(key)
        frac = local_fraction(spec, e.shape) if e.internal and e.shape else local_fraction(spec)
        per_node[e.consumer] = per_node.get(e.consumer, 0) + int(math.ceil(e.nbytes * frac))
    return per_node


def _placement_key(spec) -> str:
    return str(spec.placements) if isinstance(spec, DTensorSpec) else "plain"


def plan_memory(analysis: GraphAnalysis, sim, saved: SavedActivations, loss_parallel: set[str] = frozenset(),
                optimizer: str | None = "adam") -> MemoryBreakdown:
    mem = state_memory(analysis, sim, optimizer)
    mem.activations = sum(activation_memory(saved, sim, loss_parallel).values())
    return mem


def tensor_bytes(val) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    from autoshard.graph.simulate import hint

    return math.prod(hint(tuple(val.shape))) * val.dtype.itemsize
