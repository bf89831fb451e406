"""Expert parallel on real gloo: MoE experts split over ranks (`Shard(0)` of every expert tensor),
each rank routing its own tokens, rows to their expert's rank and back by all-to-all — exact
against the unsharded model; and the cost model weighing it against expert tensor parallel."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from tests.helpers import comm_counts, run_and_compare, tiny_model, tp_mesh
from tests.passes import fake_tp_mesh

HIDDEN, TOP_K = 64, 2  # the tiny MoE configs


def _build(name: str):
    if name.startswith("tiny-"):
        return tiny_model(name)
    from tests.families import build_tiny

    return build_tiny(name)[0]


def _shard(name: str, seq: int, sequence_parallel=None) -> dict:
    import autoshard

    torch.manual_seed(0)
    model = _build(name)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, seq))
    kw = {"input_ids": ids, "labels": ids}
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw, expert_parallel=True, sequence_parallel=sequence_parallel)
    res = run_and_compare(sharded, ref, kw)
    with torch.no_grad():
        res["comms"], _ = comm_counts(lambda: sharded(**kw))
    params = dict(sharded.named_parameters())
    res["placements"] = {f: params[f].placements[0] for f in sharded.plan.params if ".mlp." in f}
    res["local"] = {f: tuple(params[f].to_local().shape) for f in res["placements"]}
    res["blocks"] = dict(sharded.plan.expert_parallel)
    res["moves"] = [(b.node, b.src, b.bytes) for b in sharded.plan.boundaries if b.kind == "expert"]
    res["stream"], res["kind"] = sharded.plan.stream, sharded.execution.kind
    return res


def _check(r: dict, tp: int, seq: int) -> None:
    assert r["logits_diff"] < 1e-5 and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r
    assert not r["grad_missing"] and r["kind"] == "dtensor"
    assert len(r["blocks"]) == 2  # both MoE layers
    for fqn, placement in r["placements"].items():
        expert = ".experts." in fqn
        assert placement == (Shard(0) if expert else Replicate()), (fqn, placement)
        if expert:
            assert r["local"][fqn][0] == 4 // tp  # 4 experts: rank r holds 4/tp of them whole
    # per MoE layer: the counts, the rows out, the rows back (forward only: no_grad)
    assert r["comms"]["all_to_all_single"] == 3 * 2, r["comms"]
    rows = 2 * seq * TOP_K * HIDDEN * 4  # every (token, expert) row, fp32: the logical all-to-all size
    by_kind = {}
    for node, what, nbytes in r["moves"]:
        by_kind.setdefault(what, []).append(nbytes)
    assert by_kind["dispatch"] == by_kind["combine"] == [rows, rows], r["moves"]
    assert by_kind["counts"] == [8 * 4 * tp] * 2


@pytest.mark.parametrize("name,seq", [("tiny-mixtral", 8), ("tiny-qwen3-moe", 7), ("gpt_oss", 8)])
def test_expert_parallel_exact_tp2(ranks2, name, seq):
    """Mixtral, Qwen3-MoE on an odd sequence (uneven token shards), gpt-oss (expert biases gathered
    per row, interleaved gate/up): forward, loss and every gradient as unsharded."""
    for r in ranks2.run(_shard, name, seq):
        _check(r, 2, seq)


def test_expert_parallel_keeps_the_stream_sequence_sharded_tp4(ranks4):
    """Each rank routes its own sequence shard: the stream stays split through the MoE layers."""
    for r in ranks4.run(_shard, "tiny-mixtral", 8, True):
        _check(r, 4, 8)
        assert r["stream"] == "sequence_parallel"


def _plan(tp: int, seq: int, **options):
    import autoshard

    model = tiny_model("tiny-mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, seq))
    with fake_tp_mesh(tp) as mesh:
        return autoshard.plan(model, mesh, {"input_ids": ids, "labels": ids}, sequence_parallel=False, **options)


def _experts_region(plan):
    return next(r for r in plan.regions if any(".experts." in f for f in r.column))


@pytest.mark.parametrize("tp", [2, 4])
def test_cost_model_weighs_expert_parallel(tp):
    """Both prices are shown; by default expert tensor parallel (every rank an even share of every
    expert); under a memory budget only expert parallel's smaller activations meet, it is chosen
    for as few MoE layers as meet it."""
    default = _plan(tp, 256)
    assert default.expert_parallel == {}
    region = _experts_region(default)
    options = {o["strategy"]: o for o in region.candidates}
    assert {"tp", "ep"} <= set(options) and options["tp"]["chosen"] and not options["ep"]["chosen"]
    assert options["ep"]["comm_bytes"]["all_to_all"] > 0 and options["tp"]["comm_bytes"]["all_reduce"] > 0
    text = default.explain(region.name)
    assert "ep  est" in text and "tp  est" in text
    forced = _plan(tp, 256, expert_parallel=True)
    etp_memory, ep_memory = default.estimate["memory_bytes"]["total"], forced.estimate["memory_bytes"]["total"]
    assert ep_memory < etp_memory
    saved = etp_memory - ep_memory                 # both MoE layers' share: one layer saves half
    for budget, layers in ((ep_memory + saved // 2, 1), (ep_memory + saved // 4, 2)):
        tight = _plan(tp, 256, memory_budget=budget)
        assert len(tight.expert_parallel) == layers and set(tight.expert_parallel) <= set(forced.expert_parallel)
        assert tight.estimate["memory_bytes"]["total"] <= budget
    assert _plan(tp, 256, expert_parallel=False, memory_budget="none").expert_parallel == {}


def test_blocks_it_cannot_run_say_why():
    """Qwen2-MoE adds a shared expert to the routed ones before the block returns to the stream:
    not an expert-parallel block (it would replicate the shared expert); the reason names it."""
    from autoshard.graph.capture import capture
    from autoshard.graph.experts import ExpertBlock, find_expert_blocks

    for name, ok in (("tiny-mixtral", True), ("qwen2_moe", False)):
        model = _build(name)
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        cap = capture(model, {"input_ids": ids}, device="cpu")
        found = find_expert_blocks(cap.program.graph_module.graph, cap.param_fqns, set(cap.buffer_fqns))
        assert len(found) == 2
        for block in found.values():
            if ok:
                assert isinstance(block, ExpertBlock) and block.experts == 4 and len(block.expert_params) == 2
                assert sum(n.startswith("grouped_mm") for n in block.chain) == 2
            else:
                assert isinstance(block, str) and "shared expert" in block, block
