"""Small plain models and a fake tp mesh for the per-pass tests (no processes, no data)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore


@contextlib.contextmanager
def fake_tp_mesh(tp: int):
    """A 1-D "tp" mesh of `tp` ranks on the fake process group (planning only: no collective runs)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        yield init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


class MLP(nn.Module):
    """x -> up -> act -> down: one column -> row pair (`softmax=True`: the activation reduces over
    the features the column linear splits, so the pair cannot shard)."""

    def __init__(self, dim: int = 8, hidden: int = 16, softmax: bool = False):
        super().__init__()
        self.up, self.down, self.softmax = nn.Linear(dim, hidden), nn.Linear(hidden, dim), softmax

    def forward(self, x):
        h = self.up(x)
        h = torch.softmax(h, dim=-1) if self.softmax else torch.relu(h)
        return self.down(h)


def mlp_inputs(batch: int = 2, seq: int = 6, dim: int = 8) -> tuple:
    return (torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(0)),)
