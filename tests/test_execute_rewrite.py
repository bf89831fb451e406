"""The rewrite on its own: the plan's boundaries, and only those, become explicit DTensor ops."""

from __future__ import annotations

from torch.distributed.tensor import Replicate

from tests.passes import MLP, fake_tp_mesh, mlp_inputs


def _rewritten(model, **plan_kwargs):
    from autoshard.api import plan_model
    from autoshard.execute.rewrite import rewrite_graph

    with fake_tp_mesh(2) as mesh:
        run = plan_model(model, mesh, mlp_inputs(), **plan_kwargs)
        gm = rewrite_graph(run.captured, run.plan, run.simulation, mesh)
    mods = [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    return run, gm, mods


def test_each_planned_boundary_is_one_redistribute_right_after_its_producer():
    from autoshard.execute.dtensor_ops import ConsistentGrad, Redistribute, ToFull

    run, gm, mods = _rewritten(MLP(), sequence_parallel=False)  # default budget: smallest memory, sharded
    assert run.plan.boundary_placements() == {"linear_1": Replicate()}  # the row linear's partial sums reduced
    def producer(n):  # through the gradient-layout guard the rewrite puts after every linear
        a = n.args[0]
        return producer(a) if a.op == "call_module" and isinstance(gm.get_submodule(a.target), ConsistentGrad) else a

    redistributes = [(producer(n).name, m.placements) for n, m in mods if isinstance(m, Redistribute)]
    assert redistributes == [("linear_1", (Replicate(),))]
    # the output is a DTensor: gathered to a plain tensor for the caller
    output = next(n for n in gm.graph.nodes if n.op == "output")
    (ret,) = output.args[0]
    assert isinstance(gm.get_submodule(ret.target), ToFull)
    # every linear is followed by a gradient-layout guard, and nothing else reads the linear itself
    for n in gm.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            (user,) = n.users
            assert isinstance(gm.get_submodule(user.target), ConsistentGrad)


def test_a_replicated_plan_adds_no_boundary():
    from autoshard.execute.dtensor_ops import Redistribute

    # no memory limit: on cpu-gloo's latency the cost model replicates a model this small
    run, gm, mods = _rewritten(MLP(), memory_budget="none")
    assert all(p.placement == "Replicate()" for p in run.plan.params.values())
    assert not [m for _, m in mods if isinstance(m, Redistribute)]
    assert run.plan.boundary_placements() == {}


def _mlp_output() -> dict:
    import torch
    from torch.distributed.tensor import DTensor

    import autoshard
    from tests.helpers import tp_mesh

    torch.manual_seed(0)
    model = MLP()
    (x,) = mlp_inputs()
    sharded = autoshard.autoshard(model, tp_mesh(), (x,), sequence_parallel=False)
    out = sharded(x)
    return {"plain": type(out) is torch.Tensor and not isinstance(out, DTensor), "diff": (out - model(x)).abs().max().item(),
            "sharded": sorted(f for f, p in sharded.plan.params.items() if p.placement != "Replicate()")}


def test_a_row_linear_returned_as_the_output_comes_back_as_a_plain_tensor(ranks2):
    for r in ranks2.run(_mlp_output):
        assert r["sharded"] == ["down.weight", "up.bias", "up.weight"]
        assert r["plain"] and r["diff"] < 1e-6, r
