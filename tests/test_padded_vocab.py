"""Embeddings with a `padding_idx` (`pad_token_id` in the config): the padding row gets no
gradient, on every rank and in every program — DTensors, the lowered program and the compiled one.

The vocab-parallel lookup of the lowered program runs on each rank's rows; the padding row must be
renumbered on the rank that holds it and dropped on the others. The batches below contain the
padding id, so a lowering that forgets it gives that row a gradient the unsharded model does not.
"""

from __future__ import annotations

import copy

import torch

from tests.helpers import full, max_grad_diff, tiny_model, tp_mesh

TOL = 1e-5
VOCAB = 256


def _one(pad, tie: bool, mode: str) -> dict:
    import torch._dynamo

    import autoshard

    model = tiny_model("tiny-llama", pad_token_id=pad, tie_word_embeddings=tie)
    if tie:
        model.tie_weights()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    if pad is not None:
        ids[0, :3] = pad    # left padding
        ids[1, -2:] = pad   # right padding
    kw = {"input_ids": ids, "labels": torch.randint(0, VOCAB, (2, 7), generator=g)}
    options = {"lower": mode == "lower", "compile": {"backend": "aot_eager"} if mode == "compile" else False}
    torch._dynamo.reset()
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw, **options)
    out, expect = sharded(**kw), ref(**kw)
    full(out.loss).backward()
    expect.loss.backward()
    grads, missing = max_grad_diff(sharded, ref)
    emb = sharded.get_parameter("model.embed_tokens.weight").grad
    pad_row = None if pad is None else full(emb)[pad].abs().max().item()
    return {"case": (pad, tie, mode), "padding_idx": ref.model.embed_tokens.padding_idx,
            "tied": ref.lm_head.weight is ref.model.embed_tokens.weight,
            "loss": abs(full(out.loss).item() - expect.loss.item()), "grads": grads, "missing": missing,
            "pad_row": pad_row, "ref_pad_row": None if pad is None else expect_pad_row(ref, pad),
            "lowered": bool(getattr(sharded, "lowered", None)) and sharded.lowered[0] is not None,
            "vocab_parallel": sharded.plan.placements()["model.embed_tokens.weight"].is_shard(0)}


def expect_pad_row(ref, pad: int) -> float:
    return ref.model.embed_tokens.weight.grad[pad].abs().max().item()


def _cases(cases) -> list[dict]:
    return [_one(*c) for c in cases]


def _check(results, cases) -> None:
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [tuple(c) for c in cases]
        for r in rank_results:
            pad, tie, mode = r["case"]
            assert r["padding_idx"] == pad and r["tied"] == tie, r
            assert r["loss"] < TOL and r["grads"] < TOL and not r["missing"], r
            assert r["vocab_parallel"], r  # the case under test: the table is split by rows
            if mode != "dtensor":
                assert r["lowered"], r  # the lowered program ran, not a DTensor fallback
            if pad is not None and not tie:
                # untied: the padding row is never read by the LM head, so it gets exactly no gradient
                assert r["pad_row"] == 0.0 and r["ref_pad_row"] == 0.0, r


PADS = [1, 0, VOCAB - 1, None]


def test_padding_row_gets_no_gradient_lowered_tp2(ranks2):
    cases = [(pad, tie, "lower") for pad in PADS for tie in (False, True)]
    _check(ranks2.run(_cases, cases), cases)


def test_padding_row_gets_no_gradient_on_dtensors_tp2(ranks2):
    cases = [(1, False, "dtensor"), (0, True, "dtensor"), (VOCAB - 1, True, "dtensor"), (None, False, "dtensor")]
    _check(ranks2.run(_cases, cases), cases)


def test_padding_row_gets_no_gradient_compiled_tp2(ranks2):
    cases = [(1, False, "compile"), (VOCAB - 1, True, "compile")]
    _check(ranks2.run(_cases, cases), cases)


def test_padding_row_gets_no_gradient_tp4(ranks4):
    # pad 1 is on rank 0's rows, VOCAB - 1 on rank 3's: both renumberings are exercised
    cases = [(1, False, "lower"), (VOCAB - 1, True, "lower")]
    _check(ranks4.run(_cases, cases), cases)
