"""The layer cut (`graph/units.py`): repeated blocks from parameter names, reads through views."""

from __future__ import annotations

import torch
from torch import fx

from autoshard.graph.units import layer_units, reads, segments


def test_layer_units_are_the_indexed_blocks_with_siblings():
    names = ["model.embed.weight", "model.layers.0.attn.q.weight", "model.layers.0.mlp.experts.3.w",
             "model.layers.1.attn.q.weight", "lm_head.weight"]
    assert layer_units(names) == ["model.layers.0", "model.layers.1"]
    assert layer_units(["model.layers.0.w", "head.weight"]) == []   # one block is not a stack


def test_reads_follow_views_to_their_users():
    g = fx.Graph()
    w, x = g.placeholder("w"), g.placeholder("x")
    t = g.call_function(torch.ops.aten.t.default, (w,))
    mm = g.call_function(torch.ops.aten.mm.default, (x, t))
    add = g.call_function(torch.ops.aten.add.Tensor, (mm, mm))
    g.output(add)
    assert reads(w) == {t, mm}          # the transpose is a view: its user reads w's storage
    assert add not in reads(w)


def test_segments_end_at_the_next_unit_and_the_last_at_its_last_read():
    nodes = list(range(10))
    member = segments(nodes, [(2, 3, "a"), (5, 7, "b")])
    assert [member.get(n) for n in nodes] == [None, None, "a", "a", "a", "b", "b", "b", None, None]
