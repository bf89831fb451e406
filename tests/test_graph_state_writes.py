"""Which in-place writes of module state run exactly on local shards, and with what placement."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard

from autoshard.graph.capture import capture
from autoshard.graph.state_writes import local_write_placement, reads_before_write, written_placeholder


class _Cache(torch.nn.Module):
    def __init__(self, read_first: bool = False):
        super().__init__()
        self.register_buffer("k", torch.zeros(2, 4, 8, 3))
        self.read_first = read_first

    def forward(self, x, pos):
        before = self.k.sum() if self.read_first else 0
        self.k.index_copy_(2, pos, x)
        return self.k * 2 + before


def _write(read_first=False):
    cap = capture(_Cache(read_first), (torch.randn(2, 4, 5, 3), torch.arange(5)))
    node = next(n for n in cap.program.graph.nodes if n.target is torch.ops.aten.index_copy_.default)
    return cap, node


def test_index_copy_along_the_sequence_keeps_a_head_split():
    cap, node = _write()
    buffer = written_placeholder(node)
    assert cap.buffer_fqns[buffer.name] == "k"
    assert local_write_placement(node, Shard(1)) == Shard(1)      # heads split: each rank writes its heads
    assert local_write_placement(node, Replicate()) == Replicate()
    assert local_write_placement(node, Shard(2)) is None          # the indexed dim cannot be split
    assert not reads_before_write(node, buffer)


def test_a_read_before_the_write_is_seen():
    cap, node = _write(read_first=True)
    assert reads_before_write(node, written_placeholder(node))
