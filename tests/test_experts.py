"""Expert tensor parallel on real gloo: transformers' MoE experts (3-D fused `gate_up_proj
[E, 2I, H]`, `down_proj [E, H, I]`, run grouped) split inside each expert, exact.

Each rank holds its slice of every expert's gate and of its up (`_StridedShard(1, sf=2)`: the
fused weight's two parts split part by part) and of its down (`Shard(2)`, the intermediate dim);
the router stays whole so every rank routes alike; one reduce per MoE layer, as for a dense MLP.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import comm_counts, full, run_and_compare, tiny_model, tp_mesh

MODELS = ["tiny-mixtral", "tiny-qwen3-moe"]


def _moe_layers(sharded) -> list[str]:
    return sorted({f.rsplit(".experts.", 1)[0] for f in sharded.plan.params if ".experts." in f})


def _shard_moe(name: str, lower: bool) -> dict:
    import autoshard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = tiny_model(name).train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    kw = {"input_ids": ids, "labels": ids}
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw, lower=lower)
    res = run_and_compare(sharded, ref, kw)
    params = dict(sharded.named_parameters())
    res["plan"] = {f: p.placement for f, p in sharded.plan.params.items() if ".mlp." in f}
    res["actual"] = {f: str(params[f].placements[0]) for f in res["plan"] if isinstance(params[f], DTensor)}
    res["local"] = {f: tuple(params[f].to_local().shape) for f in res["plan"]}
    res["kind"] = sharded.execution.kind
    with torch.no_grad():
        res["forward_comms"], _ = comm_counts(lambda: sharded(**kw))
    res["reduces"] = [(b.node, b.src, b.collective) for b in sharded.plan.boundaries if b.collective in ("all_reduce", "reduce_scatter")]
    res["moe_layers"] = _moe_layers(sharded)
    res["all"] = [(b.node, b.src, b.dst, b.collective, b.kind) for b in sharded.plan.boundaries if b.collective]
    return res


def _check(results: list[dict], tp: int, lower: bool) -> None:
    for r in results:
        assert r["logits_diff"] < 1e-5 and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r
        assert not r["grad_missing"]
        assert r["kind"] == ("lowered" if lower else "dtensor")
        for fqn, placement in r["plan"].items():
            if fqn.endswith("experts.gate_up_proj"):
                assert placement == "_StridedShard(1, sf=2)"
                assert r["actual"][fqn] == "_S(1, 2)"
            elif fqn.endswith("experts.down_proj"):
                assert placement == "Shard(2)"
            elif fqn.endswith("mlp.gate.weight"):
                assert placement == "Replicate()"  # the router: every rank routes alike
        # the tiny configs: 4 experts, hidden 64, expert intermediate 64 (mixtral) or 32 (qwen3-moe)
        gate_up = next(v for f, v in r["local"].items() if f.endswith("experts.gate_up_proj"))
        down = next(v for f, v in r["local"].items() if f.endswith("experts.down_proj"))
        assert gate_up[1] == 2 * down[2] and gate_up[0] == down[0] == 4 and gate_up[2] == down[1] == 64
        # one reduce per MoE layer, right after the experts' down projection (the row side)
        experts = [(src, c) for n, src, c in r["reduces"] if n.startswith("grouped_mm")]
        assert len(r["moe_layers"]) == 2 and len(experts) == 2 and all(src == "Partial()" for src, _ in experts), r["reduces"]
        # CommDebugMode: the forward's collectives are the planned ones: the embedding's reduce, per
        # layer one after attention's output projection and one after the experts, and the
        # vocab-parallel loss's two (row max, row sums); nothing gathers the fused gate|up output
        planned = [n for n, src, dst, c, kind in r["all"] if c == "all_reduce" and kind == "redistribute"]
        assert len(planned) == 5, r["all"]
        assert r["forward_comms"] == {"all_reduce": 7}, r["forward_comms"]


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_experts_split_inside_each_expert_tp2(ranks2, lower):
    results = [ranks2.run(_shard_moe, name, lower) for name in MODELS]
    for per_rank in results:
        _check(per_rank, 2, lower)
        # both ranks agree on the plan and run the same collectives
        assert per_rank[0]["forward_comms"] == per_rank[1]["forward_comms"]


def test_experts_split_inside_each_expert_tp4(ranks4):
    for name in MODELS:
        _check(ranks4.run(_shard_moe, name, True), 4, True)


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_gpt_oss_interleaved_gate_up_split_tp2(ranks2, lower):
    """gpt-oss fuses gate and up interleaved (`gate_up[..., ::2]`, `gate_up[..., 1::2]`) in
    `[E, H, 2I]` weights with biases: a plain split of 2I gives each rank whole (gate, up) pairs,
    sliced locally; exact with the router whole and one reduce per MoE layer."""
    from tests.test_fused import _check_exact, _shard_family

    for r in ranks2.run(_shard_family, "gpt_oss", lower):
        _check_exact(r, lower)
        mlp = "model.layers.0.mlp"
        assert r["plan"][f"{mlp}.experts.gate_up_proj"] == "Shard(2)"
        assert r["plan"][f"{mlp}.experts.down_proj"] == "Shard(1)"
        assert r["plan"][f"{mlp}.router.weight"] == "Replicate()"
        e, h, two_i = r["local"][f"{mlp}.experts.gate_up_proj"]
        assert (e, h) == (4, 64) and two_i * 2 == r["local"][f"{mlp}.experts.down_proj"][1] * 4
