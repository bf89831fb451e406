"""The hand-written Megatron TP(+SP) baseline plan (bench/hand_plan.py) on real gloo groups.

Every rank builds the same tiny random-weight model, keeps an unsharded copy, parallelises the
other with `apply_hand_plan`, and compares logits and every parameter gradient with the copy.
Collective counts are pinned exactly (2 decoder layers unless stated otherwise).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from autoshard.testing.hand_plan import (
    apply_hand_plan,
    check_hand_plan_divisibility,
    count_collectives,
    finalize_grads,
    hand_plan_context,
    hand_plan_forward,
    hand_plan_forward_backward,
)

VOCAB = 256
BATCH = 2
ATOL_LOGITS = 1e-5


# --------------------------------------------------------------------------------------------------
# helpers that run on every rank (module level so the rank pool can import them)
# --------------------------------------------------------------------------------------------------


def _config(arch: str, layers: int = 2, kv_heads: int = 2, tie: bool = False, attn: str = "sdpa"):
    import transformers as tf

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**kw)
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(head_dim=16, **kw)
    if arch == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(head_dim=16, sliding_window=None, **kw)
    raise ValueError(arch)


def _build(arch: str, **kw):
    cls, cfg = _config(arch, **kw)
    torch.manual_seed(0)
    model = cls(cfg).float()
    # Non-trivial norm weights so their gradients (and Qwen3 q/k norms) are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))


def _batch(seq: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, seq), generator=g)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_equivalence(arch, sp, seq, loss_parallel=False, objective="loss", padded=False, **build_kw):
    """Assert logits and all grads match the unsharded model; return the measured max errors."""
    ref = _build(arch, **build_kw)
    model = copy.deepcopy(ref)
    apply_hand_plan(model, _mesh(), sequence_parallel=sp, loss_parallel=loss_parallel)
    ids = _batch(seq)
    extra = {}
    if padded:  # left padding on the first row: HF then builds an explicit attention mask
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        extra["attention_mask"] = mask

    ref_out = ref(input_ids=ids, labels=ids, use_cache=False, **extra)
    ref_obj = ref_out.loss if objective == "loss" else ref_out.logits.sum()
    ref_obj.backward()

    with hand_plan_context(model):
        out = model(input_ids=ids, labels=ids, **extra)
        obj = out.loss if objective == "loss" else out.logits.sum()
        obj.backward()
    finalize_grads(model)

    logits = out.logits
    if loss_parallel:
        assert type(logits).__name__ == "DTensor" and logits.placements[0].is_shard(2), logits
        logits = logits.full_tensor()
    else:
        assert type(logits) is torch.Tensor, type(logits)
    logit_err = (logits - ref_out.logits).abs().max().item()
    assert logit_err <= ATOL_LOGITS, f"logits differ by {logit_err}"
    loss_err = abs(_full(out.loss).item() - ref_out.loss.item())
    assert loss_err <= 1e-5, f"loss differs by {loss_err}"

    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(ref_params), "parameter FQNs changed"
    worst = 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no grad"
        # A plain parameter with a DTensor grad (or a grad still Partial after finalize_grads)
        # would be silently wrong locally / break a plain optimizer step.
        assert isinstance(p.grad, DTensor) == isinstance(p, DTensor), (name, type(p), type(p.grad))
        if isinstance(p.grad, DTensor):
            assert not any(pl.is_partial() for pl in p.grad.placements), (name, p.grad.placements)
        g = _full(p.grad)
        r = ref_params[name].grad
        assert g.shape == r.shape, (name, g.shape, r.shape)
        err = (g - r).abs().max().item()
        tol = 1e-5 * max(1.0, r.abs().max().item())
        assert err <= tol, f"grad of {name} differs by {err} (|ref| max {r.abs().max().item()})"
        worst = max(worst, err / max(1.0, r.abs().max().item()))
    return {"logits": logit_err, "loss": loss_err, "grad_rel": worst, "n_params": len(names)}


def _measure_counts(arch, sp, seq, layers=2, loss_parallel=False, **build_kw):
    model = _build(arch, layers=layers, **build_kw)
    apply_hand_plan(model, _mesh(), sequence_parallel=sp, loss_parallel=loss_parallel)
    ids = _batch(seq)

    def forward():
        with hand_plan_context(model):
            model(input_ids=ids)

    def forward_backward():
        with hand_plan_context(model):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()

    fwd = count_collectives(forward)
    fwd_bwd = count_collectives(forward_backward)
    fin = count_collectives(lambda: finalize_grads(model))
    return {"forward": fwd, "forward_backward": fwd_bwd, "finalize_grads": fin}


def _qk_norm_placements(sp):
    model = _build("qwen3")
    apply_hand_plan(model, _mesh(), sequence_parallel=sp)
    out = set()
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            assert isinstance(norm.weight, DTensor) and isinstance(norm.weight, torch.nn.Parameter)
            out.add(tuple(norm.weight.placements))
    return out


def _wrappers(loss_parallel):
    ref = _build("llama")
    model = copy.deepcopy(ref)
    apply_hand_plan(model, _mesh(), loss_parallel=loss_parallel)
    ids = _batch(8)
    ref_out = ref(input_ids=ids, labels=ids, use_cache=False)
    ref_out.loss.backward()
    logits = hand_plan_forward(model, input_ids=ids).logits
    out, loss = hand_plan_forward_backward(model, input_ids=ids, labels=ids)
    assert (_full(logits) - ref_out.logits).abs().max().item() <= ATOL_LOGITS
    assert abs(_full(loss).item() - ref_out.loss.item()) <= 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert not any(pl.is_partial() for pl in p.grad.placements), name  # finalize_grads ran
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, rtol=1e-5, atol=1e-6)
    return type(loss).__name__


def _uneven_sp(arch, seq):
    return _run_equivalence(arch, True, seq)


def _divisibility_error(kv_heads):
    model = _build("llama", kv_heads=kv_heads)
    try:
        apply_hand_plan(model, _mesh(), sequence_parallel=True)
    except ValueError as e:
        return str(e)
    return None


def _tied_is_shared(arch):
    model = _build(arch, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_hand_plan(model, _mesh())
    return model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_matches_unsharded_ws2(ranks2, arch, sp):
    res = ranks2.run(_run_equivalence, arch, sp, 8)
    assert all(r["n_params"] > 0 for r in res)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp"])
def test_qwen3_qk_norm_weights_are_replicated_dtensors(ranks2, sp):
    assert ranks2.run(_qk_norm_placements, sp) == [{(Replicate(),)}] * 2


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_ws2(ranks2, arch):
    ranks2.run(_run_equivalence, arch, True, 8)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp"])
def test_logits_sum_objective_and_eager_attention_ws2(ranks2, sp):
    ranks2.run(_run_equivalence, "qwen3", sp, 8, objective="logits_sum", attn="eager")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_mask_ws2(ranks2, attn):
    ranks2.run(_run_equivalence, "llama", True, 8, padded=True, attn=attn)


def test_loss_parallel_ws2(ranks2):
    ranks2.run(_run_equivalence, "llama", True, 8, loss_parallel=True)


def test_forward_backward_wrappers_ws2(ranks2):
    assert ranks2.run(_wrappers, False) == ["Tensor"] * 2
    # with loss_parallel the vocab-parallel cross-entropy returns a replicated DTensor loss
    assert ranks2.run(_wrappers, True) == ["DTensor"] * 2


def test_tied_embeddings_ws2(ranks2):
    assert ranks2.run(_tied_is_shared, "qwen3") == [True, True]
    ranks2.run(_run_equivalence, "qwen3", True, 8, tie=True)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp"])
def test_matches_unsharded_ws4(ranks4, sp):
    # kv heads must divide by 4 here
    ranks4.run(_run_equivalence, "llama", sp, 8, kv_heads=4)


def test_collective_counts_sequence_parallel(ranks2):
    counts = ranks2.run(_measure_counts, "llama", True, 8)
    assert counts[0] == counts[1]
    c = counts[0]
    # forward: per layer 2 all-gathers (attn, mlp input) + 2 reduce-scatters (o_proj, down_proj);
    # embedding: 1 reduce-scatter (masked partial -> Shard(1)); lm_head: 1 all-gather of its
    # Shard(1) input + 1 all-gather of the vocab-sharded logits.
    assert c["forward"] == {"all_gather": 2 * 2 + 2, "reduce_scatter": 2 * 2 + 1}
    # backward mirrors it: each all-gather of a Shard(1) activation -> reduce-scatter (4 + lm_head),
    # each reduce-scatter -> all-gather (4 + embedding); the logits all-gather needs none.
    assert c["forward_backward"] == {"all_gather": 6 + 5, "reduce_scatter": 5 + 5}
    # norm weight grads come out Partial(sum): 2 per layer + final norm -> 5 all-reduces.
    assert c["finalize_grads"] == {"all_reduce": 2 * 2 + 1}


def test_collective_counts_tensor_parallel_only(ranks2):
    counts = ranks2.run(_measure_counts, "llama", False, 8)
    assert counts[0] == counts[1]
    c = counts[0]
    # forward: per layer 2 all-reduces (o_proj, down_proj) + 1 for the embedding; lm_head gathers
    # the vocab-sharded logits.
    assert c["forward"] == {"all_reduce": 2 * 2 + 1, "all_gather": 1}
    # backward: 1 all-reduce per attention/MLP input + 1 for the lm_head input.
    assert c["forward_backward"] == {"all_reduce": 5 + 5, "all_gather": 1}
    assert c["finalize_grads"] == {}


def test_collective_counts_scale_per_layer(ranks2):
    c3 = ranks2.run(_measure_counts, "llama", True, 8, 3)[0]
    assert c3["forward"] == {"all_gather": 2 * 3 + 2, "reduce_scatter": 2 * 3 + 1}
    assert c3["forward_backward"] == {"all_gather": 4 * 3 + 3, "reduce_scatter": 4 * 3 + 2}


def test_collective_counts_qwen3_and_loss_parallel(ranks2):
    q = ranks2.run(_measure_counts, "qwen3", True, 8)[0]
    assert q["forward"] == {"all_gather": 6, "reduce_scatter": 5}
    assert q["forward_backward"] == {"all_gather": 11, "reduce_scatter": 10}
    # + q_norm/k_norm grads: 2 per layer, with or without SP
    assert q["finalize_grads"] == {"all_reduce": 5 + 4}
    lp = ranks2.run(_measure_counts, "llama", True, 8, 2, True)[0]
    # loss_parallel: the logits stay vocab-sharded (no logits all-gather); the vocab-parallel
    # cross-entropy costs 3 small all-reduces instead (forward_backward includes the HF loss).
    assert lp["forward"] == {"all_gather": 5, "reduce_scatter": 5}
    assert lp["forward_backward"] == {"all_gather": 10, "reduce_scatter": 10, "all_reduce": 3}
    lp_tp = ranks2.run(_measure_counts, "llama", False, 8, 2, True)[0]
    assert lp_tp["forward"] == {"all_reduce": 5}
    assert lp_tp["forward_backward"] == {"all_reduce": 10 + 3}


def test_collective_counts_ws4(ranks4):
    # Counts do not depend on the TP degree.
    sp = ranks4.run(_measure_counts, "llama", True, 8, kv_heads=4)
    assert all(c == sp[0] for c in sp)
    assert sp[0]["forward"] == {"all_gather": 6, "reduce_scatter": 5}
    assert sp[0]["forward_backward"] == {"all_gather": 11, "reduce_scatter": 10}
    tp = ranks4.run(_measure_counts, "llama", False, 8, kv_heads=4)[0]
    assert tp["forward"] == {"all_reduce": 5, "all_gather": 1}
    assert tp["forward_backward"] == {"all_reduce": 10, "all_gather": 1}


def test_uneven_sequence_with_sequence_parallel(ranks2):
    # torchtitan#1306: with local tensors between layers an uneven sequence breaks. This plan keeps
    # the residual a DTensor with its global shape, so DTensor pads the uneven Shard(1) collectives
    # and the result is exact.
    ranks2.run(_uneven_sp, "llama", 7)
    ranks2.run(_uneven_sp, "qwen3", 5)


def test_divisibility_preconditions(ranks4):
    errors = ranks4.run(_divisibility_error, 2)
    assert all(e is not None and "num_key_value_heads=2 is not divisible by tp=4" in e for e in errors), errors
    assert ranks4.run(_divisibility_error, 4) == [None] * 4


def test_divisibility_check_without_process_group():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    check_hand_plan_divisibility(cfg, 3)
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tp=4"):
        check_hand_plan_divisibility(cfg, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is not divisible by tp=2"):
        check_hand_plan_divisibility(cfg, 2)


def test_rejects_unsupported_model():
    with pytest.raises(ValueError, match="supports"):
        apply_hand_plan(torch.nn.Linear(2, 2), mesh=None)
