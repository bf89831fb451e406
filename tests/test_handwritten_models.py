"""Models written the way people write them outside transformers (tests/models/): the PyTorch TP
tutorial's Llama 2, a nanoGPT GPT and a gpt-fast Transformer. They use the idioms transformers
avoids — `y.transpose(1, 2).contiguous().view(B, T, C)` after SDPA (export drops the
`.contiguous()`), complex rotary via `view_as_complex`, a buffer reassigned in forward, a fused
q/k/v projection split by sizes, a tied head with the loss computed from `targets` — and must
shard exactly, on DTensors and lowered, at tp 2 and 4.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ATOL, comm_counts, full, max_grad_diff, tp_mesh


def _llama2(**overrides):
    from tests.models.llama2_tutorial import ModelArgs, Transformer

    torch.manual_seed(0)
    return Transformer(ModelArgs(**overrides))


def _nanogpt(**overrides):
    from tests.models.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**overrides))


def _llama2_case(lower: bool, seq: int = 7) -> dict:
    import autoshard

    model = _llama2()
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(tokens,), lower=lower)
    out, expect = sharded(tokens), ref(tokens)
    full(out).pow(2).mean().backward()
    expect.pow(2).mean().backward()
    grads, missing = max_grad_diff(sharded, ref)
    placements = {k: str(v) for k, v in sharded.plan.placements().items()}
    return {"logits": (full(out) - expect).abs().max().item(), "grads": grads, "missing": missing,
            "notes": getattr(sharded, "lowering_notes", []), "placements": placements}


def _nanogpt_case(lower: bool, seq: int = 7) -> dict:
    import autoshard

    model = _nanogpt()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seq)
    idx, targets = torch.randint(0, 96, (2, seq), generator=g), torch.randint(0, 96, (2, seq), generator=g)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(idx, targets), lower=lower)
    (logits, loss), (e_logits, e_loss) = sharded(idx, targets), ref(idx, targets)
    full(loss).backward()
    e_loss.backward()
    grads, missing = max_grad_diff(sharded, ref)
    tied = sharded.get_parameter("lm_head.weight") is sharded.get_parameter("transformer.wte.weight")
    # inference: no targets, only the last position's logits (another graph, captured on first use)
    with torch.no_grad():
        last, none = sharded(idx)
        e_last, _ = ref(idx)
    return {"logits": (full(logits) - e_logits).abs().max().item(), "loss": abs(full(loss).item() - e_loss.item()),
            "grads": grads, "missing": missing, "tied": tied, "notes": getattr(sharded, "lowering_notes", []),
            "last": (full(last) - e_last).abs().max().item(), "last_shape": tuple(full(last).shape), "no_loss": none is None,
            "placements": {k: p.placement for k, p in sharded.plan.params.items()}}


def _check(r: dict) -> None:
    assert r["logits"] < ATOL and r["grads"] < ATOL and not r["missing"], r
    assert r["notes"] == [], r["notes"]  # lowered programs ran lowered, not on a DTensor fallback


@pytest.mark.parametrize("lower", [False, True])
def test_tutorial_llama2_exact_tp2(ranks2, lower):
    for r in ranks2.run(_llama2_case, lower):
        _check(r)
        assert r["placements"]["layers.0.attention.wq.weight"] == "S(0)"
        assert r["placements"]["layers.0.attention.wo.weight"] == "S(1)"
        assert r["placements"]["layers.0.feed_forward.w2.weight"] == "S(1)"


def test_tutorial_llama2_exact_tp4_with_kv_heads_replicated(ranks4):
    # n_kv_heads 2 < tp 4: K/V projections stay whole, Q, O and the MLP shard
    for r in ranks4.run(_llama2_case, True):
        _check(r)
        assert r["placements"]["layers.0.attention.wk.weight"] == "R"
        assert r["placements"]["layers.0.attention.wq.weight"] == "S(0)"


@pytest.mark.parametrize("lower", [False, True])
def test_nanogpt_exact_tp2(ranks2, lower):
    for r in ranks2.run(_nanogpt_case, lower):
        _check(r)
        assert r["loss"] < ATOL and r["tied"], r
        assert r["last"] < ATOL and r["last_shape"] == (2, 1, 96) and r["no_loss"], r
        # the fused c_attn split part by part: each rank its slice of q, of k and of v
        assert r["placements"]["transformer.h.0.attn.c_attn.weight"] == "_StridedShard(0, sf=3)"
        assert r["placements"]["transformer.h.0.attn.c_proj.weight"] == "Shard(1)"


def test_nanogpt_exact_tp4(ranks4):
    for r in ranks4.run(_nanogpt_case, False, 9):
        _check(r)
        assert r["loss"] < ATOL and r["last"] < ATOL, r


def _collectives_vs_tutorial_plan() -> dict:
    import autoshard
    from autoshard.testing.hand_plan import _register_cpu_sdpa_sharding, finalize_grads
    from tests.models.llama2_tutorial import tutorial_plan

    _register_cpu_sdpa_sharding()  # the tutorial's plan runs CPU SDPA on DTensors
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    counts = {}
    for name in ("tutorial", "autoshard", "autoshard_sp"):
        model = _llama2()
        if name == "tutorial":
            sharded = tutorial_plan(model, tp_mesh())
        else:
            sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(tokens,), sequence_parallel=name == "autoshard_sp")
        fwd, out = comm_counts(lambda: sharded(tokens))
        bwd, _ = comm_counts(lambda: full(out).pow(2).mean().backward())
        if name == "tutorial":  # its norm weights' Partial gradients, which autoshard reduces in backward
            reduce, _ = comm_counts(lambda: finalize_grads(sharded))
            bwd = {k: bwd.get(k, 0) + reduce.get(k, 0) for k in {*bwd, *reduce}}
        counts[name] = (fwd, bwd)
    return counts


def test_tutorial_plan_needs_as_many_collectives_as_autoshard_or_more(ranks2):
    counts = ranks2.run(_collectives_vs_tutorial_plan)[0]
    total = {k: sum(f.values()) + sum(b.values()) for k, (f, b) in counts.items()}
    assert total["autoshard"] <= total["tutorial"], counts
    assert total["autoshard_sp"] <= total["tutorial"], counts
    # with sequence parallelism both run the same per-layer pattern in forward
    assert counts["autoshard_sp"][0].get("all_gather", 0) <= counts["tutorial"][0]["all_gather"], counts
    assert counts["autoshard_sp"][0].get("reduce_scatter", 0) == counts["tutorial"][0]["reduce_scatter"], counts


def _gpt_fast_prefill_then_decode(lower: bool) -> dict:
    import autoshard
    from tests.models.gpt_fast import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs())
    model.setup_caches(2, 64)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 128, (2, 7), generator=g)
    pos = torch.arange(7)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(prompt, pos), lower=lower)
    out, expect = sharded(prompt, pos), ref(prompt, pos)
    res = {"prefill": (full(out) - expect).abs().max().item(), "notes": getattr(sharded, "lowering_notes", [])}
    full(out).pow(2).mean().backward()
    expect.pow(2).mean().backward()
    res["grads"], res["missing"] = max_grad_diff(sharded, ref)
    # greedy decode, one token at a time, each model reading and writing its own cache
    decode, tokens = [], full(out)[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for step in range(3):
            p = torch.tensor([7 + step])
            a, b = sharded(tokens, p), ref(tokens, p)
            decode.append((full(a) - b).abs().max().item())
            tokens = b[:, -1].argmax(-1, keepdim=True)
    res["decode"] = decode
    res["cache"] = (full(sharded.get_buffer("layers.0.attention.kv_cache.k_cache")) - ref.layers[0].attention.kv_cache.k_cache).abs().max().item()
    res["user_cache_untouched"] = model.layers[0].attention.kv_cache.k_cache.abs().max().item() == 0.0
    return res


@pytest.mark.parametrize("lower", [False, True])
def test_gpt_fast_kv_cache_prefill_and_decode_tp2(ranks2, lower):
    # the cache holds replicated K/V here (the fused wqkv is not split yet), so each rank keeps it whole
    for r in ranks2.run(_gpt_fast_prefill_then_decode, lower):
        assert r["prefill"] < ATOL and r["grads"] < ATOL and not r["missing"], r
        assert max(r["decode"]) < ATOL and r["cache"] < ATOL, r
        assert r["user_cache_untouched"], r  # the sharded module writes its own copy of the cache
        assert r["notes"] == [], r["notes"]


def test_gpt_fast_kv_cache_tp4(ranks4):
    for r in ranks4.run(_gpt_fast_prefill_then_decode, False):
        assert r["prefill"] < ATOL and r["grads"] < ATOL and max(r["decode"]) < ATOL, r


class _MultiQueryAttention(torch.nn.Module):
    """Multi-query attention as hand-written models write it: one K/V head that SDPA broadcasts
    over the query heads (no repeat)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * self.hd, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 1, 2 * self.hd).transpose(1, 2).split(self.hd, dim=-1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _multi_query_case(lower: bool) -> dict:
    import autoshard

    torch.manual_seed(0)
    model = _MultiQueryAttention()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(x,), lower=lower)
    out, expect = sharded(x), ref(x)
    full(out).pow(2).mean().backward()
    expect.pow(2).mean().backward()
    grads, missing = max_grad_diff(sharded, ref)
    return {"out": (full(out) - expect).abs().max().item(), "grads": grads, "missing": missing,
            "placements": {f: p.placement for f, p in sharded.plan.params.items()}}


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_one_kv_head_broadcast_over_split_query_heads_tp2(ranks2, lower):
    """The one K/V head stays whole on every rank (it was sliced by rank like the query heads, so
    rank 1 attended to an empty head); q and o split by heads."""
    for r in ranks2.run(_multi_query_case, lower):
        assert r["out"] < ATOL and r["grads"] < ATOL and not r["missing"], r
        assert r["placements"]["q.weight"] == "Shard(0)" and r["placements"]["o.weight"] == "Shard(1)", r
