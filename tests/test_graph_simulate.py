"""Placement simulation on its own: DTensor's propagator over the graph, exact specs, no data."""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate, Shard

from tests.passes import MLP, fake_tp_mesh, mlp_inputs

UP, ACT, DOWN = "linear", "relu", "linear_1"  # export's names for MLP's nodes
SPLIT = {"up.weight": Shard(0), "up.bias": Shard(0)}


def _simulate(params: dict, boundaries: dict | None = None):
    from autoshard.graph.analyse import analyse
    from autoshard.graph.capture import capture
    from autoshard.graph.simulate import PlacementSimulator

    with fake_tp_mesh(2) as mesh:
        analysis = analyse(capture(MLP(), mlp_inputs(), device="cpu"))
        assert [n.name for n in analysis.linears()] == [UP, DOWN]
        return PlacementSimulator(analysis, mesh).run(params, boundaries)


def _moves(sim):
    return [(m.source, m.consumer, m.src, m.dst, m.collective, m.planned) for m in sim.redistributions]


def test_column_then_row_leaves_a_partial_sum_reduced_only_at_the_output():
    sim = _simulate({**SPLIT, "down.weight": Shard(1)})
    assert (sim.placement(UP), sim.placement(ACT), sim.placement(DOWN)) == ((Shard(2),), (Shard(2),), (Partial(),))
    # the only communication: the graph output gathered for the caller
    assert [m for m in _moves(sim) if m[4]] == [(DOWN, "output", "Partial()", "Replicate()", "all_reduce", True)]


def test_a_whole_row_weight_is_sliced_locally_not_the_activations_gathered():
    # DTensor's cheapest strategy for split features times a replicated weight: slice the weight
    # (recorded on the `t()` operand of linear's decomposition) and the bias (a local Partial)
    sim = _simulate(SPLIT)
    moves = _moves(sim)
    assert ("p_down_weight", DOWN, "Replicate()", "Shard(0)", None, False) in moves
    assert ("p_down_bias", DOWN, "Replicate()", "Partial()", None, False) in moves
    assert sim.placement(DOWN) == (Partial(),)
    assert sim.communication(planned=False) == []


def test_a_planned_boundary_is_planned_communication_and_later_nodes_see_its_layout():
    sim = _simulate({**SPLIT, "down.weight": Shard(1)}, {DOWN: Replicate()})
    planned = [(m.source, m.src, m.dst, m.collective) for m in sim.communication(planned=True)]
    assert planned == [(DOWN, "Partial()", "Replicate()", "all_reduce")]
    assert sim.communication(planned=False) == []
