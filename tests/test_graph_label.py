"""The label pass on its own: regions found from dataflow, legal only where no communication is needed."""

from __future__ import annotations

import torch

from tests.passes import MLP, fake_tp_mesh, mlp_inputs


def _labels(model, tp: int = 2):
    from autoshard.api import plan_model

    with fake_tp_mesh(tp) as mesh:
        run = plan_model(model, mesh, mlp_inputs(), memory_budget="none")
    lin = {n.name: run.analysis.param_of(n.args[1]) for n in run.analysis.linears()}
    return run, [(c.kind, [lin[n] for n in c.column_nodes], [lin[n] for n in c.row_nodes], c.legal, c.reason) for c in run.labels.candidates]


def test_a_column_row_pair_is_one_legal_region():
    _, cands = _labels(MLP())
    assert cands[0][:4] == ("column_row", ["up.weight"], ["down.weight"], True)
    assert all(c[0] != "column_row" or c[1] == ["up.weight"] for c in cands)


def test_a_reduction_over_the_split_features_makes_the_region_illegal_and_says_where():
    _, cands = _labels(MLP(softmax=True))
    pair = [c for c in cands if c[1] == ["up.weight"]]
    assert pair and not any(c[3] for c in pair)
    assert all("softmax" in c[4] for c in pair), pair


class _Renamed(MLP):
    """The same computation under other names: labels come from dataflow."""

    def __init__(self):
        super().__init__()
        self.alpha, self.omega = self.up, self.down
        del self.up, self.down

    def forward(self, x):
        return self.omega(torch.relu(self.alpha(x)))


def test_labels_do_not_depend_on_names():
    _, cands = _labels(_Renamed())
    assert cands[0][:4] == ("column_row", ["alpha.weight"], ["omega.weight"], True)
