"""What autograd keeps for backward, read off the exported graph.

The forward graph is run once on `meta` tensors (no memory, no compute) under
`torch.autograd.graph.saved_tensors_hooks`: every tensor an op saves for its backward is recorded
with the graph node whose output owns its storage (a view saves its base's storage), or as an
*internal* tensor of the saving op (attention's log-sum-exp, log-softmax inside a loss). Parameters,
buffers and user inputs are not activations and are left out.

Two ops run differently in the sharded program than in the exported graph, so they are traced as
they run there: attention as the fused CPU kernel `LocalAttention` calls (q, k, v, output and
log-sum-exp saved, never the score matrix), and the cross-entropy twice — as aten's (log-softmax
saved) and as autoshard's vocab-parallel loss (the logits and five per-row vectors saved); the
plan's loss-parallel choice picks one.

Per rank, a saved tensor costs its global bytes times the local fraction of its placement as the
saving op sees it (after a boundary's redistribution for consumers of that boundary) — see
`memory.py`.

    >>> saved = saved_activations(analysis)
    >>> saved.entries[0]          # SavedTensor(producer='embedding', consumer='pow_1', ...)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx

from autoshard.ops.layout import dense_in_order, stride_order
from autoshard.graph.analyse import ATTENTION_OPS, GraphAnalysis, Role
from autoshard.graph.simulate import hint
from autoshard.graph.capture import retarget_devices

aten = torch.ops.aten


@dataclass(frozen=True)
class SavedTensor:
    producer: str        # node whose output owns the storage (internal tensors: the op that made it)
    consumer: str        # node whose backward needs it
    nbytes: int          # global storage bytes at the example shape
    storage: str         # identifies the storage: several consumers may save one tensor
    internal: bool = False
    shape: tuple = ()    # the saved tensor's shape (internal tensors are sharded along with it)
    variant: str = ""    # "" always; "aten_loss" / "vocab_parallel_loss" for one of the loss variants


@dataclass
class SavedActivations:
    entries: list[SavedTensor] = field(default_factory=list)
    # attention nodes: they run on their own placement (LocalAttention moves q, k, v to the heads
    # it computes), so what they save is sized by that placement, not by their inputs'
    attention: set[str] = field(default_factory=set)
    untraced: str = ""   # why the graph could not be traced on meta (then nothing is counted)

    def total(self, variant_of: dict[str, str] | None = None) -> int:
        """Global bytes (tp = 1), counting each storage once; `variant_of`: loss node -> variant."""
        seen, total = set(), 0
        for e in self.active(variant_of):
            if e.storage not in seen:
                seen.add(e.storage)
                total += e.nbytes
        return total

    def active(self, variant_of: dict[str, str] | None = None) -> list[SavedTensor]:
        """The entries of the chosen loss variants (aten's cross-entropy unless told otherwise)."""
        variant_of = variant_of or {}
        return [e for e in self.entries if not e.variant or variant_of.get(e.consumer, "aten_loss") == e.variant]


def _materialise(val, requires_grad: bool):
    from autoshard.graph.simulate import hint

    if not isinstance(val, torch.Tensor):
        return val
    shape = hint(tuple(val.shape))
    t = torch.empty(shape, dtype=val.dtype, device="meta")
    if requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


class _Tracer(fx.Interpreter):
    """Runs the graph on meta tensors; maps storages to the node that created them."""

    def __init__(self, gm: fx.GraphModule, analysis: GraphAnalysis, device_type: str = "cpu"):
        super().__init__(gm)
        self.analysis, self.device_type = analysis, device_type
        self.owner: dict[int, tuple[str, bool, str]] = {}   # storage -> (producer, internal, key)
        self.keep: list = []          # outputs kept alive so storage ids are never reused
        self.current = ""
        self.entries: list[SavedTensor] = []
        self.variant = ""
        self.skip_owners: set[str] = set()
        self.attention: set[str] = set()

    def pack(self, t: torch.Tensor):
        sid = t.untyped_storage()._cdata
        if sid not in self.owner:  # made inside the running op (its output, or a tensor of its own)
            self.keep.append(t)
            self.owner[sid] = (self.current, True, f"{self.current}#{len(self.owner)}")
        producer, internal, key = self.owner[sid]
        if producer in self.skip_owners:
            return t
        self.entries.append(SavedTensor(producer, self.current, t.untyped_storage().nbytes(), key, internal, tuple(t.shape), self.variant))
        return t

    def run_node(self, n: fx.Node):
        self.current = n.name
        if n.op == "call_function" and n.target in ATTENTION_OPS:
            val = n.meta.get("val")  # as LocalAttention runs it: in the captured layout
            out = dense_in_order(self._attention(n), stride_order(val) if isinstance(val, torch.Tensor) else None)
        elif n.op == "call_function" and n.target is aten.dropout.default and self.device_type == "cuda":
            out = self._fused_dropout(n)
        elif n.op == "call_function" and n.target is aten.cross_entropy_loss.default:
            out = self._loss(n)
        else:
            out = super().run_node(n)
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.keep.append(t)
                self.owner.setdefault(t.untyped_storage()._cdata, (n.name, False, n.name if i == 0 else f"{n.name}[{i}]"))
        if n.op == "placeholder":
            self.skip_owners.add(n.name)  # parameters, buffers, user inputs: not activations
        return out

    def _attention(self, n: fx.Node):
        """The fused CPU kernel LocalAttention runs (flash: q, k, v, out, log-sum-exp saved)."""
        self.attention.add(n.name)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        q, k, v, *rest = args
        mask = rest[0] if rest else kwargs.get("attn_mask")
        dropout = rest[1] if len(rest) > 1 else kwargs.get("dropout_p", 0.0)
        causal = rest[2] if len(rest) > 2 else kwargs.get("is_causal", False)
        scale = kwargs.get("scale")
        if k.shape[1] != q.shape[1] or v.shape[-1] != q.shape[-1]:  # enable_gqa, or MLA's narrower values: not the fused kernel's shapes
            return super().run_node(n)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            # F.scaled_dot_product_attention turns a boolean mask into an additive float one (a new
            # tensor each call, which the kernel saves)
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask.logical_not(), float("-inf"))
        try:
            out = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, attn_mask=mask, scale=scale)[0]
        except Exception:  # noqa: BLE001 - no meta kernel for this shape: trace what the graph says
            return super().run_node(n)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and tuple(out.shape) != tuple(hint(tuple(val.shape))):
            return super().run_node(n)  # not the shapes the fused kernel was meant for
        return out

    def _fused_dropout(self, n: fx.Node):
        """CUDA runs dropout as the fused `native_dropout`, which saves a 1-byte boolean mask; the
        CPU path (what meta traces) saves a noise tensor of the input's dtype."""
        (x, p, train), _ = self.fetch_args_kwargs_from_env(n)
        if not train or p == 0:
            return x
        mask = torch.empty(x.shape, dtype=torch.bool, device="meta")
        self.pack(mask)
        return x.clone()  # keeps the autograd chain (later ops save their inputs) and saves nothing

    def _loss(self, n: fx.Node):
        from autoshard.ops.loss_parallel import VocabParallelCrossEntropy

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        logits, target, *rest = args
        opts = dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), rest))
        opts.update(kwargs)
        self.variant = "vocab_parallel_loss"
        if logits.ndim == 2 and target.ndim == 1:
            VocabParallelCrossEntropy.apply(
                logits, target, 0, logits.shape[-1], int(opts.get("ignore_index", -100)),
                float(opts.get("label_smoothing", 0.0)), None,
            )
        self.variant = "aten_loss"
        out = super().run_node(n)
        self.variant = ""
        return out


def _graph_on_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose device arguments say meta: the graph was captured for the mesh's device
    (`to(device="cpu")`, factory ops on it, in higher-order-op bodies too) and is traced on meta."""
    gm = copy.deepcopy(gm)
    retarget_devices(gm, torch.device("meta"))
    return gm


def saved_activations(analysis: GraphAnalysis, device_type: str = "cpu") -> SavedActivations:
    """Trace the exported graph on meta tensors and list every tensor saved for backward, as the
    kernels of `device_type` save them."""
    gm = _graph_on_meta(analysis.captured.program.graph_module)
    tracer = _Tracer(gm, analysis, device_type)
    args = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            args.append(_materialise(n.meta.get("val"), analysis.roles[n.name] is Role.PARAM))
    try:
        with torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            tracer.run(*args)
    except Exception as e:  # noqa: BLE001 - e.g. `.item()` on data (MoE routing counts): no meta value
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return SavedActivations(untraced=f"activations not estimated: the graph does not run on meta at {tracer.current} ({first})")
    return SavedActivations(tracer.entries, tracer.attention)
