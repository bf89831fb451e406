"""The plan-time dry run (autoshard.dry_run): a program that cannot run is refused naming the failing
node; one that needs data to run (`.item()`) is skipped, not refused; a good one runs."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import fx

from tests.helpers import tp_mesh


def _graph(fn, *example):
    gm = fx.symbolic_trace(fn)
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example):
        node.meta["val"] = value
    return gm


def _cases() -> dict:
    from autoshard.execute.dry_run import ProgramDoesNotRun, dry_run

    captured = SimpleNamespace(param_fqns={}, tied={}, model_name="Toy")
    plan = SimpleNamespace(placements=lambda: {})
    x = torch.randn(2, 6, requires_grad=True)
    out = {}
    out["runs"] = dry_run(captured, _graph(lambda a: (a * 2).sum(), x), plan, tp_mesh())
    try:
        dry_run(captured, _graph(lambda a: a.t().view(-1, 4).sum(), x), plan, tp_mesh())
        out["bad"] = "ran"
    except ProgramDoesNotRun as e:
        out["bad"] = str(e)
    out["data"] = dry_run(captured, _graph(lambda a: a.new_zeros(a.sum().long().item()).sum(), x), plan, tp_mesh())
    return out


def test_dry_run_refuses_what_cannot_run_and_skips_what_needs_data(ranks2):
    for r in ranks2.run(_cases):
        assert r["runs"] is None, r
        # a view the strides do not allow: refused, with the error and the model named
        assert "the sharded program of Toy does not run" in r["bad"] and "view" in r["bad"], r["bad"]
        assert r["data"].startswith("dry run skipped"), r["data"]
