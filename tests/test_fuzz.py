"""Property: for any decoder config, tp, batch and sequence, autoshard either computes what the
unsharded model computes (logits, loss and every gradient) or refuses with PlanError at plan
time — never a runtime crash, never a mismatch. Half the examples run the lowered program (the
compile path: local tensors, explicit collectives) instead of DTensors.

Default run: a handful of derandomized examples per tp. `pytest -m slow tests/test_fuzz.py`
runs AUTOSHARD_FUZZ_EXAMPLES (default 500) in all and prints the outcome counts.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import full, max_grad_diff, tiny_model, tp_mesh

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
OUTCOMES: collections.Counter = collections.Counter()
LOWERING: collections.Counter = collections.Counter()  # of the examples that asked for lower=True


ROPES = [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
         {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}]


@st.composite
def cases(draw):
    """Every config field that changes the graph: heads, KV heads, head_dim (also != hidden / heads),
    widths, vocabulary and its padding id, layers, tying, biases, sliding window, rope scaling."""
    heads = draw(st.integers(1, 8))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    vocab = draw(st.integers(8, 200))
    cfg = {
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "hidden_size": draw(st.sampled_from([heads * head_dim, heads * head_dim, 4 * draw(st.integers(2, 24))])),
        "intermediate_size": draw(st.integers(4, 96)), "vocab_size": vocab,
        "num_hidden_layers": draw(st.integers(1, 2)), "tie_word_embeddings": draw(st.booleans()),
        "pad_token_id": draw(st.sampled_from([None, 0, 1, vocab - 1, draw(st.integers(0, vocab - 1))])),
        "attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans()),
    }
    return {
        "family": draw(st.sampled_from(FAMILIES)), "cfg": cfg, "batch": draw(st.integers(1, 3)), "seq": draw(st.integers(1, 12)),
        "labels": draw(st.booleans()), "lower": draw(st.booleans()),
        "rope": draw(st.sampled_from(ROPES)), "sliding_window": draw(st.sampled_from([None, 2, 5])),
    }


def _config(case: dict) -> dict:
    cfg = dict(case["cfg"])
    if case.get("rope"):
        cfg["rope_parameters"] = {**case["rope"], "rope_theta": 10000.0}
    window = case.get("sliding_window")
    if window and case["family"] in ("tiny-qwen2", "tiny-qwen3"):
        layers = cfg["num_hidden_layers"]
        cfg.update(use_sliding_window=True, sliding_window=window,
                   layer_types=["sliding_attention"] + ["full_attention"] * (layers - 1))
    elif window:
        cfg["sliding_window"] = window  # llama has none: the field is ignored there
    return cfg


def _run_case(case: dict) -> dict:
    import copy

    import autoshard
    from autoshard import PlanError

    model = tiny_model(case["family"], **_config(case))
    if case["cfg"]["tie_word_embeddings"]:
        model.tie_weights()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(case["seq"])
    vocab, pad = case["cfg"]["vocab_size"], case["cfg"].get("pad_token_id")
    kw = {"input_ids": torch.randint(0, vocab, (case["batch"], case["seq"]), generator=g)}
    if pad is not None:
        kw["input_ids"][0, : max(1, case["seq"] // 3)] = pad  # left padding: the padding row is looked up
    if case["labels"]:
        kw["labels"] = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=g)
    try:
        sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw, lower=case.get("lower", False))
    except PlanError as e:
        return {"outcome": "refused", "why": str(e)[:300]}
    out, expect = sharded(**kw), ref(**kw, use_cache=False)
    logits = (full(out.logits).float() - expect.logits.float()).abs().max().item()
    if case["labels"] and not expect.loss.isnan():
        full(out.loss).backward()
        expect.loss.backward()
    else:
        full(out.logits).float().pow(2).mean().backward()
        expect.logits.float().pow(2).mean().backward()
    grads, missing = max_grad_diff(sharded, ref)
    return {"outcome": "equal" if logits < 1e-4 and grads < 1e-4 and not missing else "mismatch",
            "logits": logits, "grads": grads, "missing": missing, "stream": sharded.plan.stream,
            "not_lowered": bool(getattr(sharded, "lowering_notes", None)), "why": " ".join(getattr(sharded, "lowering_notes", []))}


def _check(pool, case) -> None:
    _log(f"{pool.world_size} start {case}")
    results = pool.run(_run_case, case)
    outcomes = {r["outcome"] for r in results}
    assert len(outcomes) == 1, results  # every rank reached the same verdict
    OUTCOMES[outcomes.pop()] += 1
    if case.get("lower"):
        LOWERING["lowered" if not results[0].get("not_lowered") else "fell back to DTensors"] += 1
    _log(f"{pool.world_size} {results[0]['outcome']} {case} {results[0].get('why', '')[:120]!r}")
    assert results[0]["outcome"] in ("equal", "refused"), (case, results[0])


def _log(line: str) -> None:
    """Progress of a long run (AUTOSHARD_FUZZ_LOG): each example before and after it runs, so a
    hang or crash names its case."""
    if os.environ.get("AUTOSHARD_FUZZ_LOG"):
        with open(os.environ["AUTOSHARD_FUZZ_LOG"], "a") as f:
            f.write(line + "\n")


_FAST = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
_SLOW = settings(max_examples=int(os.environ.get("AUTOSHARD_FUZZ_EXAMPLES", "500")) // 2, deadline=None,
                 suppress_health_check=list(HealthCheck), database=None)


@_FAST
@given(case=cases())
def test_fuzz_tp2(ranks2, case):
    _check(ranks2, case)


@_FAST
@given(case=cases())
def test_fuzz_tp4(ranks4, case):
    _check(ranks4, case)


@pytest.mark.slow
@_SLOW
@given(case=cases())
def test_fuzz_many_tp2(ranks2, case):
    _check(ranks2, case)


@pytest.mark.slow
@_SLOW
@given(case=cases())
def test_fuzz_many_tp4(ranks4, case):
    _check(ranks4, case)


def teardown_module(module):
    if OUTCOMES:
        print(f"\nfuzz outcomes: {dict(OUTCOMES)} ({sum(OUTCOMES.values())} examples); lower=True: {dict(LOWERING)}")
