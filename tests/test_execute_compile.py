"""Lowered and compiled autoshard modules on real gloo ranks (ws 2): the same numbers as the
unsharded model, the Megatron collectives and nothing else, one compiled graph for every length.

`aot_eager` runs the same lowered graph through dynamo + AOT autograd (what inductor receives)
in seconds; the inductor run itself is marked slow (minutes of C++ compilation on 2 cores).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ATOL, comm_counts, full, inputs, max_grad_diff, tiny_model, tp_mesh

MODELS = ["tiny-llama", "tiny-qwen3"]
AOT = {"backend": "aot_eager"}


def _compare(sharded, ref, kw: dict, call=None) -> dict:
    out, expect = (sharded if call is None else call)(**kw), ref(**kw)
    res = {"logits": (full(out.logits) - expect.logits).abs().max().item(),
           "loss": abs(full(out.loss).item() - expect.loss.item())}
    full(out.loss).backward()
    expect.loss.backward()
    res["grad"], res["missing"] = max_grad_diff(sharded, ref)
    res["grads"] = sum(p.grad is not None for p in sharded.parameters())
    sharded.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return res


def _build(name: str, seq: int, **kw):
    import autoshard

    model = tiny_model(name)
    ref = copy.deepcopy(model)
    example = inputs(model.config.vocab_size, 2, seq, labels=True)
    return autoshard.autoshard(model, tp_mesh(), example_inputs=example, **kw), ref, example


def _lowered_eager(name: str, seq: int) -> dict:
    sharded, ref, kw = _build(name, seq, lower=True)
    fwd, _ = comm_counts(lambda: sharded(**kw))
    out = sharded(**kw)
    bwd, _ = comm_counts(lambda: full(out.loss).backward())
    sharded.zero_grad(set_to_none=True)
    res = _compare(sharded, ref, kw)
    code = sharded.lowered_graph_module.code
    res.update(fwd=fwd, bwd=bwd, notes=sharded.lowering_notes, layers=ref.config.num_hidden_layers,
               kind=sharded.execution.kind, params=len(list(ref.parameters())),
               in_code={k: code.count(f"local_ops_{k}(") for k in ("all_gather", "reduce_scatter", "all_reduce", "reduce_grad")})
    return res


def _check(r: dict) -> None:
    assert r["logits"] < ATOL and r["loss"] < ATOL and r["grad"] < ATOL, r
    assert not r["missing"], r["missing"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seq", [8, 7])
def test_lowered_eager_matches_unsharded_with_megatron_collectives(ranks2, name, seq):
    results = ranks2.run(_lowered_eager, name, seq)
    for r in results:
        _check(r)
        assert r["grads"] == r["params"]  # every parameter got its gradient
        assert r["kind"] == "lowered" and r["notes"] == []
        layers = r["layers"]
        # forward: per layer 2 all-gathers + 2 reduce-scatters (SP), the embedding's reduce-scatter,
        # the LM head's all-gather, the vocab-parallel loss's 2 row all-reduces.
        assert r["fwd"] == {"all_gather": 2 * layers + 1, "reduce_scatter": 2 * layers + 1, "all_reduce": 2}, r["fwd"]
        # backward: the Megatron pairing (all-gather <-> reduce-scatter), and one bucketed all-reduce
        # of the replicated parameters' (norm weights') partial gradients (autoshard.distribute).
        assert r["bwd"] == {"all_gather": 2 * layers + 1, "reduce_scatter": 2 * layers + 1, "all_reduce": 1}, r["bwd"]
        # printed graph: every collective by name (the loss's all-reduces are inside its function)
        assert r["in_code"] == {"all_gather": 2 * layers + 1, "reduce_scatter": 2 * layers + 1, "all_reduce": 0, "reduce_grad": 0}


def _compiled_lengths(name: str, options: dict, lengths: tuple) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sharded, ref, _ = _build(name, lengths[0], compile=options)
    res = {"runs": [], "kind": sharded.execution.kind, "notes": sharded.lowering_notes}
    for seq in lengths:
        r = _compare(sharded, ref, inputs(ref.config.vocab_size, 2, seq, seed=seq, labels=True))
        r.update(seq=seq, graphs=counters["stats"]["unique_graphs"], programs=len(sharded._programs))
        res["runs"].append(r)
    res["recompiles"] = dict(counters["recompiles"])
    return res


@pytest.mark.parametrize("name", MODELS)
def test_compiled_matches_unsharded_and_never_recompiles_for_a_new_length(ranks2, name):
    # lengths divisible and not divisible by tp; one compiled graph serves them all
    for res in ranks2.run(_compiled_lengths, name, AOT, (8, 7, 12)):
        assert res["kind"] == "compiled" and res["notes"] == []
        for r in res["runs"]:
            _check(r)
            assert r["graphs"] == 1 and r["programs"] == 1, r
        assert res["recompiles"] == {}, res["recompiles"]


@pytest.mark.slow
def test_inductor_matches_unsharded_and_never_recompiles(ranks2):
    for res in ranks2.run(_compiled_lengths, "tiny-llama", {"backend": "inductor"}, (8, 7)):
        for r in res["runs"]:
            _check(r)
            assert r["graphs"] == 1, r
        assert res["recompiles"] == {}


def _user_compile(name: str) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    sharded, ref, kw = _build(name, 7)
    sharded.compile_options = AOT       # what a user's torch.compile(sharded) lowers and compiles with
    compiled = torch.compile(sharded)
    res = _compare(sharded, ref, kw, call=compiled)
    res.update(kind=sharded.execution.kind, compiled=sharded.execution.options, notes=sharded.lowering_notes)
    return res


def test_user_torch_compile_of_the_sharded_module(ranks2):
    # Dynamo cannot trace the DTensor program for training ("as_strided not supported with
    # DTensor"); the module leaves dynamo and compiles its lowered program instead.
    for r in ranks2.run(_user_compile, "tiny-llama"):
        _check(r)
        assert r["kind"] == "compiled" and r["compiled"]["backend"] == "aot_eager" and r["notes"] == []


def _optimizer_step(name: str) -> dict:
    sharded, ref, kw = _build(name, 7, compile=AOT)
    # Adam's first update is ~lr * sign(grad): an fp32 rounding difference in a gradient near 0
    # moves that element by up to lr, so lr is kept at 1e-3 and the moments are compared too.
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (sharded, ref)]
    for m, opt in zip((sharded, ref), opts):
        out = m(**kw)
        full(out.loss).backward()
        opt.step()
        opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    diff = max((full(p) - ref_params[n]).abs().max().item() for n, p in sharded.named_parameters())
    moments = max((full(opts[0].state[p][k]) - opts[1].state[ref_params[n]][k]).abs().max().item()
                  for n, p in sharded.named_parameters() for k in ("exp_avg", "exp_avg_sq"))
    after = _compare(sharded, ref, kw)  # the next step's forward and gradients agree too
    return {"param_diff": diff, "moments": moments, "after": after}


def test_one_adamw_step_matches_unsharded(ranks2):
    for r in ranks2.run(_optimizer_step, "tiny-qwen3"):
        assert r["param_diff"] < ATOL and r["moments"] < ATOL, r
        _check(r["after"])


def _fallback(name: str) -> dict:
    import warnings

    import autoshard.execute.runners as ac
    from autoshard.execute.lower import LoweringError

    def refuse(*a, **k):
        raise LoweringError("test: pretend the program has an op the lowering cannot express")

    original, ac.lower_graph = ac.lower_graph, refuse
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded, ref, kw = _build(name, 7, compile=AOT)
    finally:
        ac.lower_graph = original
    res = _compare(sharded, ref, kw)
    res.update(notes=sharded.lowering_notes, warned=[str(w.message) for w in caught if "not lowered" in str(w.message)],
               lowered=sharded.lowered)
    return res


def test_what_cannot_be_lowered_stays_on_dtensors_and_says_why(ranks2):
    for r in ranks2.run(_fallback, "tiny-llama"):
        _check(r)
        assert r["lowered"] == [None]
        assert len(r["notes"]) == 1 and "not lowered, runs on DTensors eagerly: test: pretend" in r["notes"][0]
        assert r["warned"] == r["notes"]
