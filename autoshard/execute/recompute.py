"""Activation checkpointing of an exported program, one decoder layer at a time.

A sharded model runs as one graph, so the usual recipe — `checkpoint_wrapper` around each
decoder block — has no block to wrap. `SegmentedProgram` cuts the graph at its layers (the same
cut FSDP's stages use, `staged.split_program`) and runs each layer's slice under
`torch.utils.checkpoint.checkpoint` (non-reentrant):

- `full`: a layer keeps only its inputs; backward recomputes its forward (collectives included);
- `selective`: a layer keeps the outputs of its compute-heavy ops (matmuls, attention, grouped
  expert matmuls) and of its collectives, and recomputes the cheap ones (norms, activations,
  rotary, elementwise) — torch's selective-checkpoint policy, torchtitan's op-level save list.

Backward then holds one layer's recomputed activations at a time instead of every layer's.

    >>> sharded = autoshard(model, mesh, activation_checkpointing="selective")
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from autoshard.execute.staged import split_program
from autoshard.graph.capture import Captured
from autoshard.schema.errors import PlanError

KINDS = ("none", "full", "selective")

_aten = torch.ops.aten
# outputs kept by `selective`: recomputing them costs real FLOPs or a collective
SAVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_cudnn_attention.default,
}
for _name in ("_grouped_mm",):
    if hasattr(_aten, _name):
        SAVE.add(getattr(_aten, _name).default)
_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "wait_tensor")
SAVE |= {getattr(torch.ops._c10d_functional, n).default for n in _COLLECTIVES if hasattr(torch.ops._c10d_functional, n)}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass(frozen=True)
class Recompute:
    """What each decoder layer recomputes: `kinds[i]` for the layer at module path `units[i]`
    ("none", "full" or "selective"; `activation_checkpointing="auto"` mixes them per layer)."""

    units: tuple[str, ...]
    kinds: tuple[str, ...]

    @staticmethod
    def of(kind: str | None, units: list[str]) -> "Recompute | None":
        """One kind for every layer (None for "none")."""
        kind = kind or "none"
        if kind not in KINDS:
            raise PlanError(f"activation_checkpointing={kind!r}: choose one of {', '.join(KINDS)}, auto")
        if kind == "none":
            return None
        if not units:
            raise PlanError(f"activation_checkpointing={kind!r} needs repeating layers to checkpoint, and the model "
                            "has none (no sibling blocks with identical parameters)")
        return Recompute(tuple(units), (kind,) * len(units))

    @property
    def kind(self) -> str:
        """The one kind of every layer, or "mixed"."""
        return self.kinds[0] if len(set(self.kinds)) == 1 else "mixed"

    def kind_of(self, unit: str | None) -> str:
        return dict(zip(self.units, self.kinds)).get(unit, "none") if unit is not None else "none"

    def wraps(self, unit: str | None) -> bool:
        return self.kind_of(unit) != "none"

    def run(self, fn, *args, unit: str | None = None):
        """`fn(*args)` under checkpoint, with the policy of `unit`'s kind (the first layer's when None)."""
        kind = self.kind_of(unit) if unit is not None else self.kinds[0]
        if kind == "selective":
            return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy))
        return checkpoint(fn, *args, use_reentrant=False)


class SegmentedProgram:
    """`gm` (DTensor or lowered: its inputs are the exported program's) run as the root's slices
    and one checkpointed slice per layer. Called with the graph's inputs, in placeholder order."""

    def __init__(self, gm: fx.GraphModule, captured: Captured, recompute: Recompute):
        self.recompute = recompute
        sources, self.segments, self.out_struct = split_program(gm, captured, list(recompute.units))
        self.names = [node.name for node, _ in sources]
        self.args = [[n.name for n in seg.gm.graph.nodes if n.op == "placeholder"] for seg in self.segments]

    def __call__(self, *values):
        env = dict(zip(self.names, values))
        for seg, names in zip(self.segments, self.args):
            args = [env[n] for n in names]
            outs = self.recompute.run(seg.gm, *args, unit=seg.unit) if self.recompute.wraps(seg.unit) else seg.gm(*args)
            env.update(zip(seg.outputs, outs))
            for name in seg.release:
                env.pop(name, None)
        return list(fx.node.map_arg(self.out_struct, lambda n: env[n.name]))
