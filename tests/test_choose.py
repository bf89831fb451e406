"""The cost model's choice flips where it must (issue: a plan that always applies Megatron TP+SP
is what hand plans do; a good auto-sharder knows when not to), and every candidate is explained."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import inputs, tiny_model, tp_mesh


def _strategies(plan) -> dict[str, str]:
    return {r.name: r.strategy for r in plan.regions}


def _slow_link():
    """cpu-gloo with a 5 ms per-collective latency: a congested or cross-datacenter link."""
    from autoshard.cost.hardware import get_profile

    base = get_profile("cpu-gloo")
    return dataclasses.replace(base, name="cpu-slow-link", intra_node=dataclasses.replace(base.intra_node, alpha_s=5e-3))


def _decisions() -> dict:
    import autoshard
    from autoshard import PlanError

    mesh, out = tp_mesh(), {}
    tiny = tiny_model("tiny-llama")
    ids = lambda seq: inputs(tiny.config.vocab_size, 2, seq)  # noqa: E731
    replicated = autoshard.plan(tiny, mesh, ids(8), hardware=_slow_link(), memory_budget="none")
    out["tiny, slow link, no budget"] = (set(_strategies(replicated).values()), replicated.estimate["time_s"]["communication"])
    sharded = autoshard.plan(tiny, mesh, ids(8), hardware=_slow_link())
    out["tiny, slow link, default budget"] = (set(_strategies(sharded).values()), sharded.estimate["budget"]["binding"],
                                               sharded.estimate["memory_bytes"]["total"], replicated.estimate["memory_bytes"]["total"])
    between = (sharded.estimate["memory_bytes"]["total"] + replicated.estimate["memory_bytes"]["total"]) // 2
    tight = autoshard.plan(tiny, mesh, ids(8), hardware=_slow_link(), memory_budget=between)
    out["tight budget"] = (set(_strategies(tight).values()), tight.estimate["budget"]["binding"], tight.estimate["memory_bytes"]["total"] <= between,
                           tight.estimate["time_s"]["total"] > replicated.estimate["time_s"]["total"])
    decode = autoshard.plan(tiny, mesh, ids(1))
    out["seq 1"] = (decode.stream, set(_strategies(decode).values()))
    long = autoshard.plan(tiny, mesh, ids(2048), memory_budget="none")  # compute dominates: shard, and SP over TP
    out["long seq"] = (long.stream, set(_strategies(long).values()))
    try:
        autoshard.plan(tiny, mesh, ids(8), memory_budget=1000)
        out["impossible"] = None
    except PlanError as e:
        out["impossible"] = (str(e), sharded.estimate["budget"]["smallest_feasible_bytes"])
    out["explain"] = sharded.explain("model.layers.0.mlp")
    costly = [autoshard.plan(tiny, mesh, ids(8), hardware=dataclasses.replace(_slow_link(), dispatch_overhead_s=d, dispatch_backward_s=b))
              for d, b in ((1e-3, None), (2e-3, None), (1e-3, 0.0))]
    out["dispatch"] = [sharded.estimate["time_s"]["compute"]] + [p.estimate["time_s"]["compute"] for p in costly]
    out["dispatch same plan"] = all(_strategies(p) == _strategies(sharded) and p.stream == sharded.stream for p in costly)
    out["estimate"] = sharded.estimate
    out["report"] = sharded.report()
    return out


@pytest.fixture(scope="module")
def decisions(ranks2):
    return ranks2.run(_decisions)[0]


def test_tiny_model_on_a_slow_link_replicates_when_memory_allows(decisions):
    strategies, comm = decisions["tiny, slow link, no budget"]
    assert strategies == {"replicated"} and comm == 0


def test_default_budget_shards_parameters_even_when_slower(decisions):
    strategies, binding, sharded_mem, replicated_mem = decisions["tiny, slow link, default budget"]
    assert strategies == {"sharded"} and binding and sharded_mem < replicated_mem


def test_tight_memory_budget_forces_sharding(decisions):
    strategies, binding, fits, slower = decisions["tight budget"]
    assert "sharded" in strategies and binding and fits and slower


def test_decode_step_uses_tensor_parallel_without_sequence_parallel(decisions):
    stream, strategies = decisions["seq 1"]
    assert stream == "replicated" and strategies == {"sharded"}


def test_long_sequences_use_sequence_parallel(decisions):
    stream, strategies = decisions["long seq"]
    assert stream == "sequence_parallel" and strategies == {"sharded"}


def test_impossible_budget_names_the_smallest_feasible_memory(decisions):
    message, smallest = decisions["impossible"]
    assert "memory_budget" in message and f"({int(smallest)} bytes" in message


def test_estimate_splits_time_and_memory(decisions):
    est = decisions["estimate"]
    t, m = est["time_s"], est["memory_bytes"]
    assert t["total"] == pytest.approx(t["compute"] + t["communication"]) and t["compute"] > 0 and t["communication"] > 0
    assert m["total"] == m["params"] + m["grads"] + m["optimizer"] + m["activations"]
    assert m["optimizer"] == 2 * 4 * m["params"] // 4  # two fp32 moments per fp32 parameter element


def test_explain_lists_every_candidate_with_time_memory_and_verdict(decisions):
    text = decisions["explain"]
    for strategy in ("tp_sp", "replicate", "tp"):
        assert f"legal   {strategy}  est " in text
    assert text.count("ms, ") >= 3 and text.count("MiB/rank") + text.count("KiB/rank") >= 3
    assert "chosen" in text and "lost:" in text


def test_eager_dispatch_overhead_is_paid_per_op_and_does_not_change_the_plan(decisions):
    base, one_ms, two_ms, forward_only = decisions["dispatch"]
    ops = (one_ms - base) / 1e-3  # forward ops + backward ops that go through DTensor dispatch
    assert ops > 50 and ops == pytest.approx(round(ops), abs=1e-6)
    assert two_ms - base == pytest.approx(2 * (one_ms - base))
    # a profile that measured the backward apart (dispatch_backward_s) prices it apart: with a free
    # backward only the forward ops pay, and the backward ops are those that need gradients
    forward_ops = (forward_only - base) / 1e-3
    assert forward_ops == pytest.approx(round(forward_ops), abs=1e-6)
    assert 0 < ops - forward_ops < forward_ops
    assert decisions["dispatch same plan"]


def test_report_shows_the_estimate(decisions):
    est, report = decisions["estimate"], decisions["report"]
    assert f"time    {est['time_s']['total'] * 1e3:.3f} ms = compute" in report
    assert "memory  " in report and "per rank = params" in report and "activations" in report
    assert "budget  default" in report and "binding: a faster plan needs more memory" in report
