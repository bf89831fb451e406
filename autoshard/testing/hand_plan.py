"""Hand-written Megatron-style TP (+ sequence parallel) plan for Hugging Face decoders.

This is the baseline autoshard is benchmarked against, written the way the PyTorch TP tutorial and
torchtitan write it, in its best variant (the one with the fewest collectives):

* ``embed_tokens``: ``RowwiseParallel`` (vocab-sharded table) -> ``Shard(1)`` (SP) or ``Replicate``.
* per decoder layer:
    - ``input_layernorm`` / ``post_attention_layernorm``: ``SequenceParallel`` (SP only);
    - ``self_attn`` / ``mlp``: ``PrepareModuleInput`` all-gathers the ``Shard(1)`` residual once per
      block, keeping it a DTensor (``use_local_output=False``, which shares one all-gather between
      the column linears and one reduce-scatter between their input grads in backward);
    - ``q/k/v/gate/up_proj``: ``ColwiseParallel(use_local_output=False)`` (attention runs on
      head-sharded DTensors); ``o/down_proj``: ``RowwiseParallel`` -> ``Shard(1)``
      (reduce-scatter, SP) or ``Replicate`` (all-reduce);
* final ``norm``: ``SequenceParallel`` (SP only);
* ``lm_head``: ``ColwiseParallel`` -> replicated logits, or vocab-sharded DTensor logits for
  ``loss_parallel``.

With SP the residual stream stays a ``Shard(1)`` DTensor between layers (HF builds the rotary
tables from its shape; a local tensor would give the *local* length). Without SP it is a plain
replicated tensor between blocks, exactly as in the PyTorch TP tutorial: the ``PrepareModuleInput`` ``from_local`` at each block entry is
then Megatron's "f" (identity forward, one all-reduce backward). A DTensor ``Replicate`` residual
does not work there: its ``Partial`` gradient reaches the embedding's ``MaskPartial`` redistribute
and fails ("Redistribution from one partial type (P(sum)) to another (MaskP...) is unsupported").
Qwen3 ``q_norm``/``k_norm`` weights become replicated DTensors: left plain, their gradient is a
``Partial`` DTensor on a plain parameter (an optimizer step raises "mixed torch.Tensor and DTensor").

HF computes rotary ``cos``/``sin`` and attention masks as plain tensors; they meet DTensors inside
attention, so forward **and backward** must run under
``torch.distributed.tensor.experimental.implicit_replication()`` (and, with ``loss_parallel``,
under ``torch.distributed.tensor.parallel.loss_parallel()``). :func:`hand_plan_context` enters
both; :func:`hand_plan_forward` / :func:`hand_plan_forward_backward` are convenience wrappers.

On CPU, the fused SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) has no DTensor
sharding strategy; :func:`apply_hand_plan` registers a head-sharded one (a local op per head
shard, exactly what the CUDA flash/efficient kernels get from DTensor) so CPU SDPA runs locally.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel import (
    loss_parallel as _loss_parallel_ctx,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "apply_hand_plan",
    "check_hand_plan_divisibility",
    "count_collectives",
    "hand_plan_context",
    "hand_plan_forward",
    "finalize_grads",
    "hand_plan_forward_backward",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")

# Attribute set on a parallelised model: {"sequence_parallel": bool, "loss_parallel": bool, "tp": int}.
_PLAN_ATTR = "_autoshard_hand_plan"


# --------------------------------------------------------------------------------------------------
# preconditions
# --------------------------------------------------------------------------------------------------


def check_hand_plan_divisibility(config: Any, tp: int) -> None:
    """Raise ``ValueError`` unless the attention heads and KV heads divide evenly over ``tp`` ranks.

    A hand plan shards q/k/v by output features; HF attention then views them as
    ``(..., -1, head_dim)``, which only means "local heads" when every rank holds whole heads, and
    GQA needs whole KV groups per rank.
    """
    if tp < 1:
        raise ValueError(f"tensor-parallel degree must be >= 1, got {tp}")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    problems = []
    if n_heads % tp:
        problems.append(f"num_attention_heads={n_heads} is not divisible by tp={tp}")
    if n_kv % tp:
        problems.append(f"num_key_value_heads={n_kv} is not divisible by tp={tp}")
    if problems:
        raise ValueError("hand-written TP plan needs whole heads per rank: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# CPU SDPA: give the fused CPU kernel a head-sharded strategy (the CUDA kernels already have one)
# --------------------------------------------------------------------------------------------------

_CPU_SDPA_REGISTERED = False


def _register_cpu_sdpa_sharding() -> None:
    """Register batch/head-sharded strategies for CPU flash SDPA forward and backward.

    Without them DTensor falls back to searching decompositions (tens of seconds per call) and the
    backward has no strategy at all in torch 2.13.
    """
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    # forward: (query, key, value, dropout_p, is_causal, *, attn_mask, scale)
    #   -> (output [B,H,S,D], logsumexp [B,H,S])
    @register_sharding(fwd)
    def _fwd_strategy(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        mask_rep = None if attn_mask is None else Replicate()
        strategies = [
            ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None, None, mask_rep, None]),
        ]
        for dim in (0, 1):  # batch, heads
            mask_pl = None
            if attn_mask is not None:
                # a broadcast mask dim of size 1 stays replicated
                mask_pl = Shard(dim) if attn_mask.ndim == 4 and attn_mask.shape[dim] != 1 else Replicate()
            strategies.append(
                ([Shard(dim), Shard(dim)], [Shard(dim), Shard(dim), Shard(dim), None, None, mask_pl, None])
            )
        return strategies

    # backward: (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale)
    #   -> (grad_q, grad_k, grad_v)
    @register_sharding(bwd)
    def _bwd_strategy(
        grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None
    ):
        mask_rep = None if attn_mask is None else Replicate()
        strategies = [
            ([Replicate()] * 3, [Replicate()] * 6 + [None, None, mask_rep, None]),
        ]
        for dim in (0, 1):
            mask_pl = None
            if attn_mask is not None:
                mask_pl = Shard(dim) if attn_mask.ndim == 4 and attn_mask.shape[dim] != 1 else Replicate()
            strategies.append(([Shard(dim)] * 3, [Shard(dim)] * 6 + [None, None, mask_pl, None]))
        return strategies

    _CPU_SDPA_REGISTERED = True


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


def _replicate_parameters(module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn a module's own plain parameters into replicated DTensor parameters (in place)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            continue
        dt = DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False)
        module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))


def _layer_plan(sequence_parallel: bool) -> dict[str, Any]:
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        # One all-gather of the residual per block (SP); DTensor inputs are shared by the column
        # linears, so backward reduces their input grads once (reduce-scatter) instead of per linear.
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": residual},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=False,
        ),
        "self_attn.q_proj": ColwiseParallel(use_local_output=False),
        "self_attn.k_proj": ColwiseParallel(use_local_output=False),
        "self_attn.v_proj": ColwiseParallel(use_local_output=False),
        "self_attn.o_proj": RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel),
        "mlp": PrepareModuleInput(
            input_layouts=(residual,),
            desired_input_layouts=(Replicate(),),
            use_local_output=False,
        ),
        "mlp.gate_proj": ColwiseParallel(use_local_output=False),
        "mlp.up_proj": ColwiseParallel(use_local_output=False),
        "mlp.down_proj": RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        plan["input_layernorm"] = SequenceParallel(use_local_output=False)
        plan["post_attention_layernorm"] = SequenceParallel(use_local_output=False)
    return plan


def apply_hand_plan(
    model: nn.Module,
    mesh: DeviceMesh,
    sequence_parallel: bool = True,
    loss_parallel: bool = False,
) -> nn.Module:
    """Parallelise an HF ``*ForCausalLM`` decoder in place with a hand-written Megatron TP(+SP) plan.

    ``mesh`` is a 1-D tensor-parallel mesh. Returns ``model``. Forward and backward must then run
    under :func:`hand_plan_context` (see the module docstring). Sets ``model.config.use_cache =
    False`` (a training baseline; HF's KV cache concatenates plain tensors with DTensor keys).

    ``sequence_parallel`` shards the residual stream on the sequence dim (``Shard(1)``) between
    blocks; without it the residual is a plain (replicated) tensor between blocks, as in the PyTorch
    TP tutorial (the global and local sequence lengths then agree, so HF's position ids are right).
    A sequence length not divisible by the mesh size still works with SP: the residual keeps its
    global shape as a DTensor and DTensor pads the uneven collectives (unlike the local-tensor
    variant of torchtitan#1306). With ``loss_parallel`` the logits are a vocab-sharded ``DTensor``
    (``Shard(-1)``) and the loss must be computed under :func:`hand_plan_context` (which enters
    ``loss_parallel()``; HF's built-in ``labels=`` loss works there).

    With SP the norm weights' gradients (and Qwen3's q/k-norm gradients in either mode) come out of
    backward as ``Partial(sum)`` DTensors; see :func:`finalize_grads`.

    Raises ``ValueError`` for an unsupported model, a mesh that is not 1-D, or heads / KV heads
    not divisible by the mesh size.
    """
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"apply_hand_plan supports {', '.join(SUPPORTED_ARCHITECTURES)}; got {arch}")
    if mesh.ndim != 1:
        raise ValueError(f"apply_hand_plan needs a 1-D tensor-parallel mesh, got a {mesh.ndim}-D mesh")
    if getattr(model, _PLAN_ATTR, None) is not None:
        raise ValueError("model is already parallelised by apply_hand_plan")
    tp = mesh.size()
    config = model.config
    check_hand_plan_divisibility(config, tp)

    if mesh.device_type == "cpu":
        _register_cpu_sdpa_sharding()
    # A training baseline: HF's KV cache concatenates plain empty tensors with DTensor keys.
    config.use_cache = False

    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = lm_head is not None and embed is not None and lm_head.weight is embed.weight

    decoder = model.model
    for layer in decoder.layers:
        parallelize_module(layer, mesh, _layer_plan(sp))
        attn = layer.self_attn
        # Qwen3: per-head RMSNorm weights act on head-sharded q/k; as replicated DTensors their
        # Partial grads get reduced (left plain, the grads are silently per-rank partial sums).
        for norm_name in ("q_norm", "k_norm"):
            if hasattr(attn, norm_name):
                _replicate_parameters(getattr(attn, norm_name), mesh)

    top_plan: dict[str, Any] = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=residual, use_local_output=not sp
        ),
        "lm_head": ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sp:
        top_plan["model.norm"] = SequenceParallel(use_local_output=False)
    parallelize_module(model, mesh, top_plan)
    if tied:
        # Both styles shard the shared table on dim 0 (vocab); re-tie the two new parameters.
        model.lm_head.weight = decoder.embed_tokens.weight

    setattr(model, _PLAN_ATTR, {"sequence_parallel": sp, "loss_parallel": loss_parallel, "tp": tp})
    return model


# --------------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hand_plan_context(model: nn.Module | None = None) -> Iterator[None]:
    """Context for forward *and* backward of a hand-plan model.

    Enters ``implicit_replication()`` (HF's plain rotary tables and masks meet DTensors) and, when
    ``model`` was parallelised with ``loss_parallel=True``, ``loss_parallel()``.
    """
    info = getattr(model, _PLAN_ATTR, None) or {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(implicit_replication())
        if info.get("loss_parallel"):
            stack.enter_context(_loss_parallel_ctx())
        yield


def hand_plan_forward(model: nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)`` under :func:`hand_plan_context`."""
    with hand_plan_context(model):
        return model(**inputs)


def hand_plan_forward_backward(
    model: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    finalize: bool = True,
    **inputs: Any,
) -> tuple[Any, torch.Tensor]:
    """Forward, loss and backward under :func:`hand_plan_context`; returns ``(outputs, loss)``.

    ``loss_fn(outputs)`` defaults to ``outputs.loss`` (pass ``labels=``). With ``finalize``,
    :func:`finalize_grads` then reduces the pending ``Partial`` gradients.
    """
    with hand_plan_context(model):
        out = model(**inputs)
        loss = out.loss if loss_fn is None else loss_fn(out)
        loss.backward()
    if finalize:
        finalize_grads(model)
    return out, loss


def finalize_grads(model: nn.Module) -> int:
    """Reduce ``Partial`` DTensor gradients to their parameter's placement, in place.

    With SP, the norm weights' grads (and, with or without SP, Qwen3's ``q_norm``/``k_norm``
    grads) come out of backward as ``Partial(sum)`` DTensors: DTensor defers their reduction until
    they are used (an optimizer step would do it lazily, one all-reduce each). This does it
    eagerly (Megatron all-reduces these grads after backward too) and returns how many grads it
    reduced, i.e. how many all-reduces it issued.
    """
    n = 0
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements if isinstance(p, DTensor) else [Replicate()])
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# collective counting
# --------------------------------------------------------------------------------------------------

# Longest / most specific first: "reduce_scatter_tensor" must not count as "scatter" or "reduce".
_SHORT_NAMES = (
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "scatter",
    "gather",
    "reduce",
    "send",
    "recv",
)


def _short_name(op: Any) -> str:
    """``torch.ops._c10d_functional.all_gather_into_tensor`` -> ``"all_gather"``."""
    name = str(op).rsplit(".", 1)[-1]
    for short in _SHORT_NAMES:
        if short in name:
            return short
    return name


def count_collectives(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn()`` under ``CommDebugMode`` and return collective counts by short name.

    Keys: ``"all_gather"``, ``"reduce_scatter"``, ``"all_reduce"``, ``"all_to_all"``, ... (only
    kinds that occurred). Whatever ``fn`` runs is counted: pass a forward for forward counts and a
    forward + backward for training-step counts.
    """
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with warnings.catch_warnings():
        # CommDebugMode's module tracker registers backward hooks on HF modules whose outputs are
        # ModelOutput objects; torch warns about that on every call.
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        with mode:
            fn()
    counts: Counter[str] = Counter()
    for op, n in mode.get_comm_counts().items():
        if n:
            counts[_short_name(op)] += n
    return dict(counts)
