"""Never silently wrong: shapes, head counts, dtypes, inputs and call styles that hand-written TP
plans get wrong (FIELD.md §2), each compared with the unsharded model, forward and every gradient.

The rank functions return numbers; the assertions run in the test process.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from tests.helpers import ATOL, comm_counts, full, max_grad_diff, shard_and_copy, tiny_model, tp_mesh


# ---- rank side ------------------------------------------------------------------------------------
def make_inputs(vocab: int, batch: int, seq: int, seed: int = 1, opts: tuple = ()) -> dict:
    """input_ids plus what `opts` asks for: labels (first token ignored), a left-padded
    attention_mask, explicit position_ids (two packed documents per row)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if "mask" in opts:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : seq // 2] = 0
        kw["attention_mask"] = mask
    if "pos" in opts:
        cut = max(1, seq // 2)
        kw["position_ids"] = torch.cat([torch.arange(cut), torch.arange(seq - cut)]).expand(batch, seq).clone()
    if "labels" in opts:
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
        labels[:, 0] = -100
        if "mask" in opts:
            labels[kw["attention_mask"] == 0] = -100
        kw["labels"] = labels
    return kw


def compare(sharded, ref, kw: dict) -> dict:
    """One forward + backward of both; max abs differences of logits, loss and gradients."""
    for p in list(sharded.parameters()) + list(ref.parameters()):
        p.grad = None
    # autoshard captures transformers models without a KV cache (use_cache=False, the training
    # forward). transformers builds the block-diagonal mask for packed position_ids only when no
    # cache is made, so the reference is the no-cache forward too.
    out, expect = sharded(**kw), ref(**kw, use_cache=False)
    logits = full(out.logits)
    res = {"logits": (logits.float() - expect.logits.float()).abs().max().item()}
    if "labels" in kw and not expect.loss.isnan():
        res["loss"] = abs(full(out.loss).float().item() - expect.loss.float().item())
        full(out.loss).backward()
        expect.loss.backward()
    else:  # no labels, or none left after the shift (seq 1): both losses are NaN
        res["loss"] = 0.0 if "labels" not in kw or full(out.loss).isnan() else float("inf")
        logits.float().pow(2).mean().backward()
        expect.logits.float().pow(2).mean().backward()
    res["grads"], missing = max_grad_diff(sharded, ref)
    res["missing"] = len(missing)
    return res


def shard_and_call(name: str, overrides: dict, example: tuple, calls: list, opts: tuple = (), tie: bool = False, **kwargs) -> dict:
    """Shard with an example of shape `example`, then call with each (batch, seq) in `calls`."""
    model = tiny_model(name, **overrides)
    if tie:
        model.tie_weights()
    kw = make_inputs(model.config.vocab_size, *example, opts=opts)
    sharded, ref = shard_and_copy(model, example_inputs=kw, **kwargs)
    results = []
    for b, s in calls:
        r = compare(sharded, ref, make_inputs(model.config.vocab_size, b, s, seed=100 * b + s, opts=opts))
        r["programs"] = len(sharded._programs)
        results.append(r)
    plan = sharded.plan
    return {
        "results": results,
        "stream": plan.stream,
        "placements": {f: p.placement for f, p in plan.params.items()},
        "attention": sorted(set(plan.attention.values())),
        "report": plan.report(),
        "tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
    }


def check(results: list, atol: float = ATOL) -> None:
    for r in results:
        assert r["logits"] < atol and r["grads"] < atol and not r["missing"], r
        assert r.get("loss", 0.0) < atol, r


# ---- uneven sequences ------------------------------------------------------------------------------
def test_uneven_sequence_lengths_tp4(ranks4):
    # seq 1, tp-1, tp+1 and < tp, all through one sequence-parallel plan (global DTensor shapes:
    # no rank infers a wrong shard size, torchtitan#1306); 4 KV heads so everything is sharded
    out = ranks4.run(shard_and_call, "tiny-llama", {"num_key_value_heads": 4}, (2, 7), [(2, 7), (2, 1), (2, 3), (2, 5), (2, 2)], ("labels",))[0]
    check(out["results"])
    assert out["stream"] == "sequence_parallel"
    assert all(r["programs"] == 1 for r in out["results"][:1])
    assert not any(p == "Replicate()" for f, p in out["placements"].items() if f.endswith("proj.weight"))


def _torchtitan_1306():
    model = tiny_model("tiny-llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_key_value_heads=4,
                       max_position_embeddings=16384)
    kw = make_inputs(model.config.vocab_size, 1, 8193, opts=("labels",))
    sharded, ref = shard_and_copy(model, example_inputs=kw)
    counts, _ = comm_counts(lambda: sharded(**kw))
    return compare(sharded, ref, kw), sharded.plan.stream, counts


def test_seq_8193_over_tp4_is_exact(ranks4):
    # the torchtitan#1306 scenario: 8193 tokens, 4 ranks, sequence parallel (2049/2048/2048/2048)
    result, stream, counts = ranks4.run(_torchtitan_1306)[0]
    check([result])
    assert stream == "sequence_parallel"
    assert counts == {"all_gather": 2 * 1 + 1, "reduce_scatter": 2 * 1 + 1, "all_reduce": 2}


# ---- head counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", [1, 2])
def test_kv_heads_fewer_than_tp_are_replicated_tp4(ranks4, kv):
    # tp % n_kv == 0, tp > n_kv (Qwen3.5-MoE: 2 KV heads, tp 4; MQA: 1): Q/O sharded by head, K/V
    # projections replicated, each rank using the KV heads of its query heads; grads summed
    out = ranks4.run(shard_and_call, "tiny-llama", {"num_key_value_heads": kv}, (2, 6), [(2, 6)], ("labels",))[0]
    check(out["results"])
    p = out["placements"]
    for layer in (0, 1):
        pre = f"model.layers.{layer}.self_attn."
        assert p[pre + "q_proj.weight"] == "Shard(0)" and p[pre + "o_proj.weight"] == "Shard(1)"
        assert p[pre + "k_proj.weight"] == p[pre + "v_proj.weight"] == "Replicate()"
    assert out["attention"] == ["Shard(1)"]


def test_query_heads_not_divisible_fall_back_tp4(ranks4):
    # 14 heads over 4 ranks (Qwen2.5-0.5B's head count): attention replicated, MLP still sharded,
    # and the report says why
    over = {"num_attention_heads": 14, "hidden_size": 112, "num_key_value_heads": 2}
    out = ranks4.run(shard_and_call, "tiny-qwen2", over, (2, 6), [(2, 6), (2, 3)], ("labels",))[0]
    check(out["results"])
    p = out["placements"]
    assert all(p[f] == "Replicate()" for f in p if ".self_attn." in f)
    assert all(p[f] == "Shard(0)" for f in p if "gate_proj" in f or "up_proj" in f)
    assert all(p[f] == "Shard(1)" for f in p if "down_proj" in f)
    assert "replicated model.layers.0.self_attn" in out["report"] and "(size 14)" in out["report"]


# ---- sizes tp does not divide ----------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_vocab_intermediate_hidden_not_divisible_tp4(ranks4, tie):
    # vocab 250, intermediate 170, hidden 66 (head_dim 16): uneven shards, exact numerics
    over = {"vocab_size": 250, "intermediate_size": 170, "hidden_size": 66, "head_dim": 16, "num_key_value_heads": 4,
            "tie_word_embeddings": tie}
    out = ranks4.run(shard_and_call, "tiny-llama", over, (2, 5), [(2, 5)], ("labels",), tie)[0]
    check(out["results"])
    p = out["placements"]
    assert p["model.embed_tokens.weight"] == p["lm_head.weight"] == "Shard(0)"
    assert p["model.layers.0.mlp.up_proj.weight"] == "Shard(0)" and p["model.layers.0.mlp.down_proj.weight"] == "Shard(1)"
    assert out["tied"] is tie


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_leaving_a_rank_no_rows_stays_exact_tp4(ranks4, tie):
    # vocab 9 over tp 4: torch.chunk gives 3, 3, 3, 0 rows; a lookup in rank 3's empty table
    # crashed that rank (found by tests/test_fuzz.py). The table stays whole; the tied LM head too.
    over = {"vocab_size": 9, "hidden_size": 8, "head_dim": 8, "num_attention_heads": 1, "num_key_value_heads": 1,
            "tie_word_embeddings": tie}
    out = ranks4.run(shard_and_call, "tiny-llama", over, (2, 9), [(2, 9), (2, 4)], ("labels",), tie)[0]
    check(out["results"])
    assert out["placements"]["model.embed_tokens.weight"] == "Replicate()"
    assert "leaves a rank an empty shard" in out["report"]
    if tie:
        assert out["placements"]["lm_head.weight"] == "Replicate()" and out["tied"]


# ---- inputs ----------------------------------------------------------------------------------------
def test_batch_one_example_then_other_batches(ranks2):
    # export specialises a size-1 example dim; a batch of 3 gets its own (cached) program
    out = ranks2.run(shard_and_call, "tiny-llama", {}, (1, 6), [(1, 6), (3, 6), (1, 4), (3, 5)], ("labels",))[0]
    check(out["results"])
    assert [r["programs"] for r in out["results"]] == [1, 2, 2, 2]


@pytest.mark.parametrize("opts", [("mask", "labels"), ("pos",), ("pos", "mask", "labels")], ids="-".join)
def test_attention_mask_position_ids_labels(ranks2, opts):
    out = ranks2.run(shard_and_call, "tiny-qwen3", {}, (2, 8), [(2, 8), (2, 5)], opts)[0]
    check(out["results"])


def _bf16(name: str):
    model = tiny_model(name).to(torch.bfloat16)
    fp32 = tiny_model(name)
    kw = make_inputs(model.config.vocab_size, 2, 7, opts=("labels",))
    sharded, ref = shard_and_copy(model, example_inputs=kw)
    out, expect, exact = sharded(**kw), ref(**kw), fp32(**kw)
    full(out.loss).backward()
    expect.loss.backward()
    exact.loss.backward()
    # each gradient's error relative to its own scale, sharded-bf16 vs unsharded-bf16 vs fp32
    fp32_grads = dict(fp32.named_parameters())
    rel = {}
    for (name_, p), (_, r) in zip(sharded.named_parameters(), ref.named_parameters()):
        scale = fp32_grads[name_].grad.abs().max().item() + 1e-12
        rel[name_] = ((full(p.grad).float() - r.grad.float()).abs().max().item() / scale,
                      (r.grad.float() - fp32_grads[name_].grad).abs().max().item() / scale)
    logits_scale = exact.logits.abs().max().item()
    return {
        "dtype": str(full(out.logits).dtype),
        "logits": ((full(out.logits).float() - expect.logits.float()).abs().max().item() / logits_scale,
                   (expect.logits.float() - exact.logits).abs().max().item() / logits_scale),
        "loss": (abs(full(out.loss).float().item() - expect.loss.float().item()), abs(expect.loss.float().item() - exact.loss.item())),
        "grads": rel,
    }


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_bf16_matches_unsharded_bf16(ranks2, name):
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.0039): the sharded model may round differently from
    # the unsharded one (other summation order), but by no more than bf16 itself moves the result
    # away from fp32 — checked per tensor, relative to the tensor's scale
    out = ranks2.run(_bf16, name)[0]
    assert out["dtype"] == "torch.bfloat16"
    sharded_err, bf16_err = out["logits"]
    assert sharded_err <= max(2 * bf16_err, 2**-7), out["logits"]
    assert out["loss"][0] <= max(2 * out["loss"][1], 2e-3), out["loss"]
    for name_, (sharded_err, bf16_err) in out["grads"].items():
        assert sharded_err <= max(2 * bf16_err, 2**-6), (name_, sharded_err, bf16_err)


def _call_styles():
    from collections import UserDict

    import autoshard

    model = tiny_model("tiny-llama")
    ref = copy.deepcopy(model)
    kw = make_inputs(model.config.vocab_size, 2, 6, opts=("mask", "pos"))
    ids, mask, pos = kw["input_ids"], kw["attention_mask"], kw["position_ids"]
    expect = ref(**kw).logits
    diffs = {}
    examples = {
        "kwargs": kw,
        "args": (ids, mask, pos),
        "args+kwargs": ((ids,), {"attention_mask": mask, "position_ids": pos}),
        "BatchEncoding-like": UserDict(kw),  # a tokenizer's output is a UserDict, not a dict
    }
    for label, example in examples.items():
        sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=example)
        calls = {
            "kwargs-only": lambda: sharded(input_ids=ids, attention_mask=mask, position_ids=pos),
            "positional": lambda: sharded(ids, mask, pos),
            "mixed": lambda: sharded(ids, position_ids=pos, attention_mask=mask),
            "unpacked": lambda: sharded(**kw),
        }
        for call, fn in calls.items():
            diffs[f"{label}/{call}"] = ((full(fn().logits) - expect).abs().max().item(), len(sharded._programs))
    return diffs


def test_kwargs_only_positional_and_mixed_calls(ranks2):
    # every example form and every call style binds to the same signature: one program, exact
    diffs = ranks2.run(_call_styles)[0]
    assert len(diffs) == 16
    for key, (diff, programs) in diffs.items():
        assert diff < ATOL and programs == 1, (key, diff, programs)


# ---- dynamic inputs --------------------------------------------------------------------------------
def test_other_batch_and_sequence_sizes_reuse_or_recapture(ranks2):
    # one plan serves every size >= 2; sizes 1 are captured again (export assumed >= 2 and its
    # own check lets 0/1 through); every call exact
    calls = [(2, 8), (3, 5), (4, 16), (2, 1), (1, 8), (1, 1), (5, 3), (2, 1)]
    out = ranks2.run(shard_and_call, "tiny-mistral", {}, (2, 8), calls, ("labels",))[0]
    check(out["results"])
    assert [r["programs"] for r in out["results"]] == [1, 1, 1, 2, 3, 4, 4, 4]


class SizeBranch(torch.nn.Module):
    """Decides on the batch size in Python: export bakes the example's branch into the graph."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return h * 2 if x.shape[0] == 1 else h * 3


class Dropping(torch.nn.Module):
    """Dropout in the middle: train and eval are different graphs."""

    def __init__(self):
        super().__init__()
        self.up, self.drop, self.down = torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.drop(self.up(x)))


class MaskKind(torch.nn.Module):
    """Decides on an input's dtype in Python: a 0/1 integer mask or a soft float weighting."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, keep):
        h = self.up(x)
        h = h * keep[..., None] if keep.dtype.is_floating_point else h * (keep[..., None] > 0)
        return self.down(h)


def _specialised_branches():
    import autoshard

    torch.manual_seed(0)
    out = {}
    branchy = SizeBranch()
    sharded = autoshard.autoshard(branchy, tp_mesh(), example_inputs=(torch.randn(2, 4, 8),))
    for b in (2, 1, 3):
        x = torch.randn(b, 4, 8)
        out[f"batch {b}"] = (full(sharded(x)) - branchy(x)).abs().max().item()
    out["SizeBranch programs"] = len(sharded._programs)

    dropping = Dropping().train()
    sharded = autoshard.autoshard(dropping, tp_mesh(), example_inputs=(torch.randn(2, 4, 8),))
    sharded.eval()
    dropping.eval()
    x = torch.randn(2, 4, 8)
    out["eval after a train capture"] = (full(sharded(x)) - dropping(x)).abs().max().item()
    out["Dropping programs"] = len(sharded._programs)

    masked = MaskKind()
    sharded = autoshard.autoshard(masked, tp_mesh(), example_inputs=(x, torch.ones(2, 4, dtype=torch.long)))
    soft = torch.full((2, 4), 0.5)
    out["float mask after an int capture"] = (full(sharded(x, soft)) - masked(x, soft)).abs().max().item()
    out["MaskKind programs"] = len(sharded._programs)
    return out


def test_size_one_branches_eval_mode_and_dtypes_are_recaptured(ranks2):
    # each would run the example's branch silently if the cached program were trusted
    out = ranks2.run(_specialised_branches)[0]
    assert out.pop("SizeBranch programs") == 2 and out.pop("Dropping programs") == 2 and out.pop("MaskKind programs") == 2
    for key, diff in out.items():
        assert diff < 1e-5, (key, diff)
