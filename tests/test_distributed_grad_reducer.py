"""The gradient reducer on its own, on real gloo ranks: Partial gradients summed once per bucket."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tests.helpers import comm_counts, tp_mesh


def _reduce(buckets: list[list[str]], watch: bool = True) -> dict:
    from autoshard.distributed.parameters import GradReducer

    mesh = tp_mesh()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)  # rows split over the ranks: a sequence-parallel stream
    params = {n: torch.nn.Parameter(distribute_tensor(torch.randn(4, generator=g), mesh, [Replicate()])) for n in ("a", "b", "c")}
    reducer = GradReducer(buckets)
    for n, p in params.items():
        if watch:
            reducer.watch(n, p)
    xs = distribute_tensor(x, mesh, [Shard(0)])

    loss = sum(((xs * p) * (i + 1)).sum() for i, p in enumerate(params.values())).full_tensor()
    counts, _ = comm_counts(loss.backward)
    grads = {n: p.grad for n, p in params.items()}
    return {
        "placements": {n: tuple(map(repr, g.placements)) for n, g in grads.items()},
        "diff": max((g.full_tensor() - x.sum(0) * (i + 1)).abs().max().item() for i, g in enumerate(grads.values())),
        "all_reduce": counts.get("all_reduce", 0), "reductions": reducer.reductions,
        "dtensor": all(isinstance(g, DTensor) for g in grads.values()),
    }


def test_without_the_reducer_the_gradients_stay_partial(ranks2):
    for r in ranks2.run(_reduce, [["a", "b", "c"]], False):
        assert set(r["placements"].values()) == {("Partial(sum)",)} and r["all_reduce"] == 0, r


def test_partial_gradients_become_replicated_sums_one_all_reduce_per_bucket(ranks2):
    for r in ranks2.run(_reduce, [["a", "b"], ["c"]]):
        assert r["dtensor"] and set(r["placements"].values()) == {("Replicate()",)}
        assert r["diff"] < 1e-5
        assert r["reductions"] == 2 and r["all_reduce"] == 2, r  # two buckets: two all-reduces in backward


def test_a_parameter_outside_every_bucket_is_reduced_on_its_own(ranks2):
    for r in ranks2.run(_reduce, [["a", "b"]]):
        assert set(r["placements"].values()) == {("Replicate()",)} and r["diff"] < 1e-5
        assert r["reductions"] == 2 and r["all_reduce"] == 2, r
