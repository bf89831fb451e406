"""`sharded.generate`: token for token what the unsharded model's `generate` returns (greedy,
left padding, eos), rank-consistent sampling, the KV cache split by KV heads (replicated when
tp > KV heads), decode collectives exactly the decode plan's, decode compiled once — on real
gloo ranks at tp 2 and 4."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.helpers import comm_counts, tiny_model, tp_mesh


def _prompt(vocab: int, batch: int = 2, seq: int = 5, pad_rows: int = 1, seed: int = 1):
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:pad_rows, :2] = 0   # left padding
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _kind(t) -> str:
    if not isinstance(t, DTensor):
        return "plain"
    p = t.placements[0]
    return f"shard {p.dim}" if p.is_shard() else "replicate" if p.is_replicate() else str(p)


def _greedy(name: str, execution: str = "dtensor", new: int = 8, **overrides) -> dict:
    import autoshard

    model = tiny_model(name, **overrides).eval()
    ids, mask = _prompt(model.config.vocab_size)
    expect = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    sharded = autoshard.autoshard(model, tp_mesh(), lower=execution == "lowered")
    out = sharded.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0)
    programs = next(iter(sharded.serving.held.values()))
    cache = {f: (_kind(b), tuple(b._local_tensor.shape if isinstance(b, DTensor) else b.shape))
             for f, b in programs.module.named_buffers() if f.endswith("keys_0")}
    return {"equal": torch.equal(out, expect), "out": out.tolist(), "expect": expect.tolist(), "cache": cache,
            "bytes": programs.cache_bytes(), "held": programs.held_bytes(), "report": programs.report(),
            "notes": programs.module.lowering_notes, "layers": model.config.num_hidden_layers,
            "head_dim": getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads}


# generate runs lowered programs either way; "dtensor" is a module made without lower=True
@pytest.mark.parametrize("name,execution", [("tiny-llama", "dtensor"), ("tiny-llama", "lowered"), ("tiny-qwen2", "dtensor"),
                                            ("tiny-qwen3", "lowered"), ("tiny-mixtral", "dtensor")])
def test_greedy_equals_unsharded_generate_tp2(ranks2, name, execution):
    for r in ranks2.run(_greedy, name, execution):
        assert r["equal"], (r["out"], r["expect"])
        assert r["notes"] == []
        # 2 KV heads over tp 2: each rank caches one head of every sequence
        (placement, shape), = r["cache"].values()
        assert placement == "shard 1" and shape[1] == 1, r["cache"]
        _assert_cache_report(r, kv_heads_per_rank=1)


def _assert_cache_report(r: dict, kv_heads_per_rank: int, slots: int = 64, batch: int = 2):
    per_token = r["layers"] * 2 * kv_heads_per_rank * r["head_dim"] * 4   # keys and values, fp32
    assert r["bytes"] == {"per_rank": per_token * batch * slots, "per_token": per_token, "per_sequence": per_token * slots}, r["bytes"]
    assert r["held"] == r["bytes"]["per_rank"]          # what the rank stores is what the report says
    from autoshard.schema.units import format_bytes

    assert f"per token {format_bytes(per_token)}" in r["report"] and "one decode step:" in r["report"], r["report"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_greedy_tp4_with_two_kv_heads_stores_one_kv_head_per_rank(ranks4, name):
    # tp 4 > 2 KV heads: K/V are replicated; the cache keeps each KV head on the two ranks whose
    # query heads read it (stored repeated to 4 heads, split by heads): half the cache per rank
    for r in ranks4.run(_greedy, name, "lowered"):
        assert r["equal"], (r["out"], r["expect"])
        (placement, shape), = r["cache"].values()
        assert placement == "shard 1" and shape[1] == 1, r["cache"]
        _assert_cache_report(r, kv_heads_per_rank=1)
        assert "K/V replicated" in r["report"], r["report"]


def test_greedy_tp4_splits_the_cache_by_kv_heads(ranks4):
    for r in ranks4.run(_greedy, "tiny-llama", "dtensor", num_key_value_heads=4):
        assert r["equal"], (r["out"], r["expect"])
        (placement, shape), = r["cache"].values()
        assert placement == "shard 1" and shape[1] == 1, r["cache"]
        _assert_cache_report(r, kv_heads_per_rank=1)


def _cached_lm_on_dtensors(lower: bool, repeat: int) -> dict:
    """The cached program itself, planned by autoshard() (DTensor or lowered): prefill logits and
    the cache written equal the unsharded CachedLM's."""
    import autoshard
    from autoshard.serve.static_cache import CachedLM

    model = tiny_model("tiny-llama").eval()
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[:, :5] = 1
    mask[0, :2] = 0
    pos = (mask[:, :5].cumsum(-1) - 1).clamp(min=0)
    args = (ids, mask, pos, torch.arange(5))
    ref = CachedLM(model, 2, 16).eval()
    sharded = autoshard.autoshard(CachedLM(model, 2, 16, kv_repeat=repeat).eval(), tp_mesh(), example_inputs=args, lower=lower)
    with torch.no_grad():
        logits = sharded(*args)
        expect = ref(*args)
    keys = sharded.get_buffer("autoshard_kv_cache.keys_1")
    whole = keys.full_tensor()[:, ::repeat]   # one copy of each KV head
    return {"logits": (logits - expect).abs().max().item(), "cache": (whole - ref.get_buffer("autoshard_kv_cache.keys_1")).abs().max().item(),
            "placement": _kind(keys), "local_heads": keys._local_tensor.shape[1], "notes": sharded.lowering_notes}


@pytest.mark.parametrize("lower", [False, True])
def test_cached_program_with_repeated_kv_heads_tp4(ranks4, lower):
    for r in ranks4.run(_cached_lm_on_dtensors, lower, 2):
        assert r["logits"] < 1e-5 and r["cache"] < 1e-6, r
        assert r["placement"] == "shard 1" and r["local_heads"] == 1 and r["notes"] == [], r


def test_cached_program_split_by_kv_heads_tp2(ranks2):
    for r in ranks2.run(_cached_lm_on_dtensors, False, 1):
        assert r["logits"] < 1e-5 and r["cache"] < 1e-6, r
        assert r["placement"] == "shard 1" and r["local_heads"] == 1, r


def _eos_and_padding() -> dict:
    import autoshard

    model = tiny_model("tiny-llama").eval()
    ids, mask = _prompt(model.config.vocab_size, batch=3, pad_rows=2)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])     # row 0 stops after 3 tokens, the others run on
    expect = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    sharded = autoshard.autoshard(model, tp_mesh())
    out = sharded.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    return {"equal": torch.equal(out, expect), "out": out.tolist(), "expect": expect.tolist(), "padded": int((out[0, ids.shape[1] + 3:] == 0).sum())}


def test_left_padding_and_eos_match_unsharded(ranks2):
    for r in ranks2.run(_eos_and_padding):
        assert r["equal"], (r["out"], r["expect"])
        assert r["padded"] > 0   # row 0 finished early and was padded


def _sampling() -> dict:
    import torch.distributed as dist

    import autoshard

    model = tiny_model("tiny-qwen2").eval()
    ids, mask = _prompt(model.config.vocab_size)
    sharded = autoshard.autoshard(model, tp_mesh())
    # each rank draws from its own generator: the tokens still agree (the first rank's draw is broadcast)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    out = sharded.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=30, top_p=0.9,
                           pad_token_id=0, generator=g)
    greedy = sharded.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    return {"out": out.tolist(), "differs_from_greedy": not torch.equal(out, greedy)}


def test_sampling_gives_every_rank_the_same_tokens(ranks2):
    results = ranks2.run(_sampling)
    assert results[0]["out"] == results[1]["out"]
    assert results[0]["differs_from_greedy"]


def _decode_collectives() -> dict:
    import autoshard

    model = tiny_model("tiny-llama").eval()
    ids, mask = _prompt(model.config.vocab_size)
    sharded = autoshard.autoshard(model, tp_mesh(), lower=True)
    sharded.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    programs = next(iter(sharded.serving.held.values()))
    step_mask = torch.zeros(2, programs.capacity, dtype=torch.long)
    step_mask[:, :6] = 1
    with torch.no_grad():
        counts, _ = comm_counts(lambda: programs(ids[:, :1], step_mask, torch.full((2, 1), 5), torch.tensor([5])))
    return {"measured": counts, "planned": programs.decode.plan.collective_counts(), "layers": model.config.num_hidden_layers}


def test_decode_step_runs_exactly_the_planned_collectives(ranks2):
    for r in ranks2.run(_decode_collectives):
        assert r["measured"] == r["planned"], r
        # one all-reduce after attention and one after the MLP per layer, the vocab-parallel
        # embedding's one, and the logits gathered once
        assert r["planned"] == {"all_reduce": 2 * r["layers"] + 1, "all_gather": 1}, r


def _compiled_decode() -> dict:
    import autoshard

    model = tiny_model("tiny-llama").eval()
    ids, mask = _prompt(model.config.vocab_size)
    graphs = []

    def backend(gm, example_inputs):   # counts compilations, runs the graph eagerly
        graphs.append(len(example_inputs))
        return gm.forward

    sharded = autoshard.autoshard(model, tp_mesh(), compile={"backend": backend})
    out = sharded.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    after_first = len(graphs)
    again = sharded.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    expect = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return {"equal": torch.equal(out, expect) and torch.equal(again, expect), "first": after_first, "total": len(graphs)}


def test_compiled_decode_compiles_once(ranks2):
    for r in ranks2.run(_compiled_decode):
        assert r["equal"]
        assert r["first"] == 2 and r["total"] == 2, r   # one prefill graph, one decode graph for 11 decode steps


def test_unknown_generate_argument_is_refused():
    from autoshard.schema.errors import PlanError
    from autoshard.serve.generate import _generation_config

    with pytest.raises(PlanError, match="num_beams"):
        _generation_config(None, None, {"num_beams": 4})
