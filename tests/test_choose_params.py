"""Parameter placements beyond the regions: what a program never reads is split, exactly."""

from __future__ import annotations

import copy

import torch

from tests.helpers import ATOL, run_and_compare, tp_mesh


def _bart_decoder_only() -> dict:
    import autoshard
    from autoshard.schema.errors import PlanError
    from tests.families import build_tiny, example_inputs

    model, _ = build_tiny("bart")
    ref = copy.deepcopy(model)
    kwargs = example_inputs(model.config)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kwargs)
    plan = sharded.plan
    cross = {f: (p.placement, p.reason) for f, p in plan.params.items() if ".encoder_attn." in f}
    res = {"cross": cross, **run_and_compare(sharded, ref, kwargs)}
    hidden = torch.randn(kwargs["input_ids"].shape[0], 5, model.config.d_model)
    try:   # a call that reads the cross-attention: re-planned with it where it is, or refused by name
        out = sharded(**kwargs, encoder_hidden_states=hidden)
        expect = ref(**kwargs, encoder_hidden_states=hidden)
        res["with_encoder"] = ("ran", (out.logits - expect.logits).abs().max().item())
    except PlanError as e:
        res["with_encoder"] = ("refused", str(e))
    return res


def test_unused_cross_attention_is_split_and_the_model_stays_exact(ranks2):
    for r in ranks2.run(_bart_decoder_only):
        assert r["cross"] and all(p.startswith("Shard(") and "unused by this program" in why for p, why in r["cross"].values()), r["cross"]
        assert r["logits_diff"] < ATOL and r["loss_diff"] < ATOL and r["grad_diff"] < ATOL and not r["grad_missing"], r
        kind, detail = r["with_encoder"]
        assert kind == "refused" and "encoder_attn" in detail or kind == "ran" and detail < ATOL, r["with_encoder"]
