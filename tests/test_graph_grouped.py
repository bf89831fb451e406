"""graph/grouped: what a grouped (expert) matmul and a fused chunk produce on local shards, and
the labels they give a captured MoE (fake process group, tp 2)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.graph.grouped import grouped_mm_placement
from tests.passes import fake_tp_mesh


def test_grouped_mm_rules():
    R = Replicate()
    assert grouped_mm_placement(R, R) == R
    assert grouped_mm_placement(R, Shard(2)) == Shard(1)                       # column: N split
    assert grouped_mm_placement(R, _StridedShard(2, split_factor=2)) == _StridedShard(1, split_factor=2)  # fused gate|up
    assert grouped_mm_placement(Shard(1), Shard(1)) == Partial()               # row: K split
    assert grouped_mm_placement(Shard(0), R) is None                           # tokens split: not local
    assert grouped_mm_placement(R, Shard(1)) is None                           # K split, x whole: not local
    assert grouped_mm_placement(R, Shard(0)) is None                           # experts split: expert parallel, not this


def test_strided_shard_is_the_fused_layout():
    """DTensor's `_StridedShard(0, sf=2)` gives each rank its slice of the first part and of the
    second: chunking the local rows in two gives that rank's gate and up."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    with fake_tp_mesh(2) as mesh:
        w = torch.arange(8.0).view(8, 1)
        local = distribute_tensor(w, mesh, [_StridedShard(0, split_factor=2)]).to_local()
        assert dist.get_rank() == 0 and local.flatten().tolist() == [0.0, 1.0, 4.0, 5.0]


def test_moe_labels_pair_experts_column_and_row():
    from autoshard.configs import build_model
    from autoshard.graph.analyse import analyse
    from autoshard.graph.capture import capture
    from autoshard.graph.label import label
    from autoshard.graph.simulate import PlacementSimulator

    model = build_model("tiny-mixtral")
    captured = capture(model, {"input_ids": torch.randint(0, 256, (2, 8))}, device="cpu")
    analysis = analyse(captured)
    with fake_tp_mesh(2) as mesh:
        labels = label(analysis, PlacementSimulator(analysis, mesh))
    experts = [c for c in labels.legal() if c.kind == "column_row" and any(".experts." in analysis.weight(analysis.nodes[n]).fqn for n in c.column_nodes)]
    assert len(experts) == 2  # one per layer
    for c in experts:
        (col,), (row,) = c.column_nodes, c.row_nodes
        up, down = analysis.weight(analysis.nodes[col]), analysis.weight(analysis.nodes[row])
        assert up.fqn.endswith("experts.gate_up_proj") and down.fqn.endswith("experts.down_proj")
        assert c.placements[up.fqn] == _StridedShard(1, split_factor=2)
        assert c.placements[down.fqn] == Shard(2)
    router = [c for c in labels.candidates if c.kind != "embedding" and any(analysis.weight(analysis.nodes[n]).fqn.endswith("mlp.gate.weight") for n in c.column_nodes)]
    assert router and not any(c.legal for c in router)  # softmax over experts needs them all
