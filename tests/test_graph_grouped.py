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


def test_equal_parts_of_chunk_and_split():
    from torch import fx

    from autoshard.graph.grouped import equal_parts, fused_linear_placement, part_sizes
    from autoshard.schema.fused_parts import StridedParts

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 3, 12)
    aten = torch.ops.aten
    cases = [
        (aten.chunk.default, (x, 3, -1), (3, 2)),
        (aten.split.Tensor, (x, 4, 2), (3, 2)),                   # nanoGPT: split(n_embd, dim=2)
        (aten.split.Tensor, (x, 5, 2), None),                     # 5 + 5 + 2: unequal
        (aten.split_with_sizes.default, (x, [6, 6], -1), (2, 2)),
        (aten.split_with_sizes.default, (x, [8, 2, 2], -1), None),  # Phi-3 q | k | v with 2 KV heads of 4
        (aten.chunk.default, (x, 1, -1), None),
    ]
    for op, args, expect in cases:
        assert equal_parts(g.call_function(op, args)) == expect, (op, args)
    # part_sizes: the widths of every cut into parts, equal or not
    assert part_sizes(g.call_function(aten.split_with_sizes.default, (x, [8, 2, 2], -1))) == ((8, 2, 2), 2)
    assert part_sizes(g.call_function(aten.chunk.default, (x, 3, -1))) == ((4, 4, 4), 2)
    assert part_sizes(g.call_function(aten.split_with_sizes.default, (x, [1, 2], 1))) == ((1, 2), 1)
    assert part_sizes(g.call_function(aten.split_with_sizes.default, (x, [8, 2], -1))) is None  # not the whole width
    R = Replicate()
    parts = StridedParts(0, (8, 2, 2))
    assert fused_linear_placement(R, parts, 3) == StridedParts(2, (8, 2, 2))
    assert fused_linear_placement(R, parts, 3) != _StridedShard(2, split_factor=3)  # the widths are kept
    assert fused_linear_placement(R, _StridedShard(0, split_factor=3), 3) == _StridedShard(2, split_factor=3)
    assert fused_linear_placement(Shard(2), _StridedShard(0, split_factor=3), 3) is None
    assert fused_linear_placement(R, Shard(0), 3) is None  # a plain column linear: DTensor's own rule


def test_interleaved_part_of_a_split_value():
    from torch import fx
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    from autoshard.graph.grouped import interleaved_part

    aten = torch.ops.aten
    with fake_tp_mesh(2) as mesh:
        val = torch.empty(6, 8)
        spec = lambda p: DTensorSpec(mesh, (p,), TensorMeta(val.shape, val.stride(), val.dtype))  # noqa: E731
        g = fx.Graph()
        x = g.placeholder("x")
        big = 2**63 - 1
        assert interleaved_part(g.call_function(aten.slice.Tensor, (x, 1, 0, big, 2)), spec(Shard(1)), 2) == 1   # gate_up[..., ::2]
        assert interleaved_part(g.call_function(aten.slice.Tensor, (x, -1, 1, big, 2)), spec(Shard(1)), 2) == 1  # gate_up[..., 1::2]
        assert interleaved_part(g.call_function(aten.slice.Tensor, (x, 1, 0, 4)), spec(Shard(1)), 2) is None      # a block: not local
        assert interleaved_part(g.call_function(aten.slice.Tensor, (x, 1, 0, big, 2)), spec(Replicate()), 2) is None
        assert interleaved_part(g.call_function(aten.slice.Tensor, (x, 1, 0, big, 2)), spec(Shard(1)), 8) is None  # 8 % (8 * 2)
