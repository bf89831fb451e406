"""Refusals at plan time, before any collective of the model runs, each saying exactly why:
fallbacks under `strict=True`, models export cannot capture, meshes that do not fit, plans for
another model or mesh, ranks that disagree — and the user's model is never touched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.handwritten import TinyLM
from tests.helpers import full, inputs, tiny_model, tp_mesh


def _refusal(fn) -> str | None:
    """The PlanError message of `fn()`, None if it did not raise; no collective may run before."""
    from torch.distributed.tensor.debug import CommDebugMode

    from autoshard import PlanError

    mode = CommDebugMode()
    try:
        with mode:
            fn()
    except PlanError as e:
        return f"{e}\ncollectives before the refusal: {mode.get_total_counts()}"
    return None


# ---- strict=True -----------------------------------------------------------------------------------
def _strict_head_counts():
    import autoshard
    from autoshard.configs import build_model, load_config

    ids = {"input_ids": torch.randint(0, 256, (2, 6))}
    cfg = load_config("qwen2.5-0.5b")
    cfg.num_hidden_layers = 2  # the real head counts and widths, fewer layers to export
    qwen = build_model(cfg, device="meta")
    out = {"qwen2.5-0.5b": _refusal(lambda: autoshard.plan(qwen, tp_mesh(), ids, strict=True))}
    out["qwen2.5-0.5b non-strict stream"] = autoshard.plan(qwen, tp_mesh(), ids).stream
    small = tiny_model("tiny-qwen2", num_attention_heads=14, hidden_size=112)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    out["14 heads, autoshard"] = _refusal(lambda: autoshard.autoshard(small, tp_mesh(), ids, strict=True, sequence_parallel=True))
    out["untouched"] = all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    return out


def test_strict_names_the_attribute_tp_and_working_tp_values(ranks4):
    out = ranks4.run(_strict_head_counts)[0]
    msg = out["qwen2.5-0.5b"]
    assert msg is not None and out["qwen2.5-0.5b non-strict stream"] == "replicated"
    assert "num_attention_heads=14" in msg and "tp=4" in msg and "tp values that would shard it: 2, 7, 14" in msg
    assert "model.layers.0.self_attn runs replicated" in msg
    assert "num_key_value_heads" not in msg  # 2 KV heads at tp 2 or 14 are replicated by design
    msg = out["14 heads, autoshard"]
    assert "num_attention_heads=14" in msg and "2, 7, 14" in msg
    assert "sequence_parallel=True" in msg  # asked for, and impossible with replicated attention
    assert "collectives before the refusal: 0" in msg or "all_gather" in msg  # only the plan digest exchange
    assert out["untouched"]


def _strict_accepts_and_names_module_attributes():
    import autoshard

    ids = inputs(256, 2, 6)
    kv = autoshard.plan(tiny_model("tiny-llama"), tp_mesh(), ids, strict=True)  # 2 KV heads, tp 4
    torch.manual_seed(0)
    hand = TinyLM(d=48, heads=6)  # no config: the size is named after the module attribute
    return kv.params["model.layers.0.self_attn.k_proj.weight"].placement, _refusal(
        lambda: autoshard.plan(hand, tp_mesh(), (torch.randint(0, 96, (2, 6)),), strict=True)
    )


def test_strict_accepts_kv_replication_and_names_module_attributes(ranks4):
    kv_placement, msg = ranks4.run(_strict_accepts_and_names_module_attributes)[0]
    assert kv_placement == "Replicate()"  # KV heads replicated for sharded query heads: not a fallback
    assert "stack.0.mix.heads=6" in msg and "tp=4" in msg and "2, 3, 6" in msg


# ---- export failures -------------------------------------------------------------------------------
class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        if h.sum() > 0:  # data-dependent control flow: export cannot capture it
            h = h * 2
        return self.down(h)


def _export_failure():
    import autoshard

    return _refusal(lambda: autoshard.autoshard(DataDependent(), tp_mesh(), (torch.randn(2, 4, 8),)))


def test_export_failure_names_source_line_and_fix(ranks2):
    for msg in ranks2.run(_export_failure):  # every rank refuses the same way
        assert "torch.export could not capture DataDependent" in msg
        assert f"{__file__}:" in msg and "if h.sum() > 0:" in msg
        assert "torch.cond" in msg
        assert "collectives before the refusal: 0" in msg


# ---- meshes ----------------------------------------------------------------------------------------
def _bad_meshes():
    import autoshard
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    model = tiny_model("tiny-llama")
    ids = inputs(256, 2, 6)
    shard = lambda mesh: lambda: autoshard.autoshard(model, mesh, ids)  # noqa: E731
    out = {
        "2-D without tp": _refusal(shard(init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "pp")))),
        "2-D unnamed": _refusal(shard(init_device_mesh("cpu", (1, 2)))),
        "a process group": _refusal(shard(dist.group.WORLD)),
    }
    only_rank0 = DeviceMesh("cpu", [0])  # built on every rank; rank 1 is outside it
    out["rank outside"] = _refusal(shard(only_rank0)) if dist.get_rank() == 1 else "rank 0 not asked"
    return out


def test_meshes_that_do_not_fit_are_refused(ranks2):
    out = ranks2.run(_bad_meshes)[1]
    assert "needs a dim named 'tp'" in out["2-D without tp"] and "('dp', 'pp')" in out["2-D without tp"]
    assert "needs a dim named 'tp'" in out["2-D unnamed"] and "mesh_dim_names=None" in out["2-D unnamed"]
    assert "must be a torch.distributed DeviceMesh" in out["a process group"]
    assert "rank 1 is not in the mesh [0]" in out["rank outside"]
    for msg in out.values():
        assert "collectives before the refusal: 0" in msg


# ---- plans for another model or mesh ---------------------------------------------------------------
def _plan_json():
    import autoshard

    return autoshard.plan(tiny_model("tiny-llama"), tp_mesh(), inputs(256, 2, 6)).to_json()


def _apply_foreign_plans(tp4_json: str):
    import autoshard
    from autoshard import Plan

    ids = inputs(256, 2, 6)
    mine = autoshard.plan(tiny_model("tiny-llama"), tp_mesh(), ids)
    return {
        "other mesh": _refusal(lambda: autoshard.autoshard(tiny_model("tiny-llama"), tp_mesh(), ids, plan=Plan.from_json(tp4_json))),
        "other config": _refusal(lambda: autoshard.autoshard(tiny_model("tiny-llama", intermediate_size=160), tp_mesh(), ids, plan=mine)),
        "other dtype": _refusal(lambda: autoshard.autoshard(tiny_model("tiny-llama").to(torch.bfloat16), tp_mesh(), ids, plan=mine)),
    }


def test_plan_for_another_mesh_or_model_is_refused(ranks2, ranks4):
    tp4_json = ranks4.run(_plan_json)[0]
    out = ranks2.run(_apply_foreign_plans, tp4_json)[0]
    assert "the plan was made for mesh" in out["other mesh"] and "tp: plan 4 vs now 2" in out["other mesh"]
    assert "another model" in out["other config"]
    assert "model.layers.0.mlp.gate_proj.weight: plan [176, 64] float32 vs model [160, 64] float32" in out["other config"]
    assert "model.embed_tokens.weight: plan [256, 64] float32 vs model [256, 64] bfloat16" in out["other dtype"]


# ---- ranks that disagree ---------------------------------------------------------------------------
def _disagreeing_ranks():
    import autoshard
    from autoshard import PlanError
    from autoshard.distributed.agree import agree_across_ranks

    rank = dist.get_rank()
    out = {}
    # one rank's config differs (a stale config file on one host)
    model = tiny_model("tiny-llama", **({"intermediate_size": 160} if rank == 1 else {}))
    out["config"] = _refusal(lambda: autoshard.autoshard(model, tp_mesh(), inputs(256, 2, 6)))
    # same model, another example on one rank
    out["inputs"] = _refusal(lambda: autoshard.autoshard(tiny_model("tiny-llama"), tp_mesh(), inputs(256, 2, 6 + rank)))
    # planning failed on one rank only: the others must not wait forever in the exchange
    plan = autoshard.plan(tiny_model("tiny-llama"), tp_mesh(), inputs(256, 2, 6))
    try:
        agree_across_ranks(PlanError("cannot capture on this host") if rank == 1 else plan, tp_mesh())
    except PlanError as e:
        out["one rank failed"] = str(e)
    return out


def test_ranks_that_disagree_all_raise_the_same_error(ranks2):
    r0, r1 = ranks2.run(_disagreeing_ranks)
    assert r0 == r1  # the same message on every rank, nobody hangs
    assert "ranks disagree on the plan: the models differ" in r0["config"]
    assert "ranks [0] -> plan" in r0["config"] and "ranks [1] -> plan" in r0["config"]
    assert "same model, so the inputs" in r0["inputs"]
    assert "planning failed on ranks [1] of 2 (rank 1: PlanError: cannot capture on this host)" in r0["one rank failed"]


# ---- the user's model ------------------------------------------------------------------------------
def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in model.named_parameters(remove_duplicate=False)},
        "types": {type(p).__name__ for p in model.parameters()},
        "grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "forward": type(model).forward,
        "instance forward": "forward" in vars(model),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()),
        "config": model.config.to_dict(),
    }


def _diff(a: dict, b: dict) -> list[str]:
    bad = [k for k in a if k != "state" and a[k] != b[k]]
    return bad + [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]


def _untouched_by_autoshard():
    import autoshard

    model = tiny_model("tiny-qwen3")
    before = _snapshot(model)
    kw = inputs(model.config.vocab_size, 2, 6, labels=True)
    expect = model(**kw).logits.detach()
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw)
    full(sharded(**kw).loss).backward()
    return _diff(before, _snapshot(model)), [n for n, p in model.named_parameters() if p.grad is not None], (
        model(**kw).logits - expect).abs().max().item()


def test_user_model_is_not_mutated_by_autoshard(ranks2):
    for changed, grads, drift in ranks2.run(_untouched_by_autoshard):
        assert changed == [] and grads == [] and drift == 0.0, (changed, grads, drift)


def _untouched_by_training_and_rank_seeds():
    import autoshard

    rank = dist.get_rank()
    # 6 query heads over 2 ranks, 3 KV heads: K/V projections (and norms) replicated; every rank
    # initialised its own weights (no common seed), as happens when users forget to seed
    model = tiny_model("tiny-llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48, seed=rank)
    before = _snapshot(model)
    kw = inputs(model.config.vocab_size, 2, 6, labels=True)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw)
    at_shard = _diff(before, _snapshot(model))
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1)
    full(sharded(**kw).loss).backward()
    opt.step()
    return at_shard, _diff(before, _snapshot(model))


def test_user_model_is_not_mutated_by_training_the_sharded_module(ranks2):
    for at_shard, after_step in ranks2.run(_untouched_by_training_and_rank_seeds):
        assert at_shard == [] and after_step == [], (at_shard, after_step)
