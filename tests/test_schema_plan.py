"""The plan is plain data: JSON round trip, report, explain, validation, the exported
parallelize_module plan, and planning a model that lives on `meta`."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ATOL, full, inputs, max_grad_diff, shard_and_copy, tiny_model, tp_mesh


def _plan_as_data():
    import autoshard
    from autoshard import Plan, PlanError

    model = tiny_model("tiny-qwen3")
    kw = inputs(model.config.vocab_size, 2, 8, labels=True)
    sharded, _ = shard_and_copy(model, example_inputs=kw)
    plan = sharded.plan
    text = plan.to_json()
    back = Plan.from_json(text)
    out = {"roundtrip": back == plan, "report": plan.report(), "digest": back.digest() == plan.digest()}
    out["explain_param"] = plan.explain("model.layers.0.self_attn.q_norm.weight")
    out["explain_region"] = plan.explain("model.layers.0.mlp")
    out["explain_up"] = plan.explain("model.layers.0.mlp.up_proj.weight")
    out["up_shape"] = plan.params["model.layers.0.mlp.up_proj.weight"].shape
    out["explain_boundary"] = plan.explain(plan.boundaries[0].node)
    # ranks compare plans without node names (a set-ordered trace names them differently per rank)
    renamed = Plan.from_json(text)
    for r in renamed.regions:
        r.nodes = [f"renamed_{n}" for n in r.nodes]
    for b in renamed.boundaries:
        b.node = f"renamed_{b.node}"
    moved = Plan.from_json(text)
    moved.params["model.layers.0.mlp.up_proj.weight"].placement = "Replicate()"
    out["rank_digest"] = (renamed.rank_digest() == plan.rank_digest(), renamed.digest() != plan.digest(),
                          moved.rank_digest() != plan.rank_digest())
    # applying a loaded plan reproduces the same sharded model
    again = autoshard.autoshard(tiny_model("tiny-qwen3"), tp_mesh(), example_inputs=kw, plan=back)
    out["reapplied"] = torch.equal(full(again(**kw).logits), full(sharded(**kw).logits))
    errors = {}
    for label, bad in {
        "garbage": "{not json",
        "format": text.replace('"format": 1', '"format": 99'),
        "placement": text.replace('"placement": "Shard(0)"', '"placement": "__import__(\'os\')"', 1),
    }.items():
        try:
            Plan.from_json(bad)
        except PlanError as e:
            errors[label] = str(e)
    try:  # a plan whose node names this capture does not have (traced in another order)
        autoshard.autoshard(tiny_model("tiny-qwen3"), tp_mesh(), example_inputs=kw, plan=renamed)
    except PlanError as e:
        errors["renamed"] = str(e)
    try:  # a plan for another model
        autoshard.autoshard(tiny_model("tiny-llama"), tp_mesh(), example_inputs=kw, plan=back)
    except PlanError as e:
        errors["other_model"] = str(e)
    return out, errors


def test_plan_json_report_explain_and_validation(ranks2):
    out, errors = ranks2.run(_plan_as_data)[0]
    assert out["roundtrip"] and out["digest"] and out["reapplied"]
    assert out["rank_digest"] == (True, True, True)
    report = out["report"]
    for needle in ("model.layers.0.self_attn.q_proj.weight", "Shard(0)", "reduce_scatter", "all_gather",
                   "sequence parallel", "loss parallel", "model.layers.0.mlp"):
        assert needle in report, needle
    assert "Replicate()" in out["explain_param"] and "summed over tp" in out["explain_param"]
    assert "candidates:" in out["explain_region"] and "replicated" in out["explain_region"]
    rows, cols = out["up_shape"]  # Shard(0) over tp 2: rank 0 holds ceil(rows / 2) rows, fp32
    local = -(-rows // 2) * cols * 4
    assert f"cost: {local / 1024:.1f} KiB parameter + {local / 1024:.1f} KiB gradient + {2 * local / 1024:.1f} KiB Adam" in out["explain_up"]
    assert "->" in out["explain_boundary"]
    assert set(errors) == {"garbage", "format", "placement", "renamed", "other_model"}
    assert "names differently" in errors["renamed"] and "PYTHONHASHSEED" in errors["renamed"]
    assert "another model" in errors["other_model"] and "Qwen3ForCausalLM" in errors["other_model"]


def _plan_on_meta():
    import autoshard
    from autoshard.configs import build_model, load_config

    model = build_model(load_config("tiny-llama"), device="meta")
    ids = torch.randint(0, 256, (1, 8))
    plan = autoshard.plan(model, tp_mesh(), {"input_ids": ids})
    still_meta = all(p.device.type == "meta" for p in model.parameters())
    return plan.params["model.layers.0.mlp.down_proj.weight"].placement, still_meta


def test_plan_works_on_meta_models(ranks2):
    placement, still_meta = ranks2.run(_plan_on_meta)[0]
    assert placement == "Shard(1)" and still_meta


def _plain_module_needs_inputs():
    import autoshard
    from autoshard import PlanError

    try:
        autoshard.plan(torch.nn.Linear(4, 4), tp_mesh())
    except PlanError as e:
        return str(e)
    return None


def test_plain_module_without_example_inputs_is_refused(ranks2):
    assert "example_inputs is required for Linear" in ranks2.run(_plain_module_needs_inputs)[0]


def _exported_parallelize_plan(name: str):
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import parallelize_module

    from autoshard.testing.hand_plan import _register_cpu_sdpa_sharding

    _register_cpu_sdpa_sharding()
    model = tiny_model(name)
    kw = inputs(model.config.vocab_size, 2, 8)
    sharded, ref = shard_and_copy(model, example_inputs=kw)
    styles = sharded.plan.to_parallelize_plan()
    eager = copy.deepcopy(ref)
    parallelize_module(eager, tp_mesh(), styles)
    with implicit_replication():
        out = eager(**kw, use_cache=False).logits  # HF's KV cache mixes plain tensors with DTensors
        full(out).pow(2).mean().backward()
    expect = ref(**kw).logits
    expect.pow(2).mean().backward()
    grad_diff, missing = max_grad_diff(eager, ref)
    return (full(out) - expect).abs().max().item(), grad_diff, missing, sorted(type(s).__name__ for s in styles.values())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_to_parallelize_plan_gives_same_numerics(ranks2, name):
    logits_diff, grad_diff, missing, styles = ranks2.run(_exported_parallelize_plan, name)[0]
    assert logits_diff < ATOL and grad_diff < ATOL and not missing
    assert {"ColwiseParallel", "RowwiseParallel", "SequenceParallel"} <= set(styles)


def _hf_default_inputs():
    import autoshard

    model = tiny_model("tiny-mistral")
    sharded = autoshard.autoshard(model, tp_mesh())  # input_ids derived from the config
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    return (full(sharded(input_ids=ids).logits) - model(input_ids=ids).logits).abs().max().item()


def test_transformers_models_need_no_example_inputs(ranks2):
    # also called with another batch and sequence length than the derived example
    assert max(ranks2.run(_hf_default_inputs)) < ATOL


def test_to_parallelize_plan_refuses_a_fused_split_it_cannot_express():
    """nanoGPT's c_attn is split part by part (_StridedShard): ColwiseParallel would cut q|k|v
    contiguously, so the export is refused, naming the weight, instead of being silently wrong."""
    from autoshard.schema.errors import PlanError
    from tests.models.nanogpt import GPT, GPTConfig
    from tests.passes import fake_tp_mesh

    import autoshard

    torch.manual_seed(0)
    model = GPT(GPTConfig())
    idx = torch.randint(0, 96, (2, 7))
    with fake_tp_mesh(2) as mesh:
        plan = autoshard.plan(model, mesh, (idx, idx))
    with pytest.raises(PlanError, match=r"transformer\.h\.0\.attn\.c_attn\.weight \(_StridedShard\(0, sf=3\)"):
        plan.to_parallelize_plan()
