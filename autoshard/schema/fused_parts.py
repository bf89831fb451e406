"""A fused weight whose parts have different widths, split part by part.

Phi-3's `qkv_proj` holds q | k | v as 64 | 32 | 32 output rows (more query heads than KV heads)
and slices its output. To run the attention on local heads, rank r must hold its slice of each
part: q[r*32:(r+1)*32], k[r*16:(r+1)*16], v[r*16:(r+1)*16]. DTensor's `_StridedShard(0, sf=3)`
says that only for equal parts. `StridedParts` is the same idea with the part widths spelled out:
a `_StridedShard` (every rule autoshard has for fused layouts applies: the local linear, the cut
into parts, the checkpoint block description) whose split and gather follow the parts, so
`full_tensor()`, `redistribute` to `Replicate` and checkpoints see the model's own row order.

    >>> p = StridedParts(0, (64, 32, 32))      # each part divisible by tp
    >>> w = DTensor.from_local(local_rows(weight, p, tp, rank), mesh, [p], shape=weight.shape)
    >>> torch.equal(w.full_tensor(), weight)
    True

DTensor builds a plain `_StridedShard` when it normalises a negative dim or propagates through
its own rules, which would lose the widths: autoshard only makes these with non-negative dims
and runs every op that reads one on local shards (`graph.grouped`).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, distribute_tensor, Replicate
from torch.distributed.tensor.placement_types import Placement, _StridedShard


class StridedParts(_StridedShard):
    """`_StridedShard(dim, sf=len(sizes))` with parts of the given widths (each divisible by the mesh size)."""

    def __init__(self, dim: int, sizes: tuple[int, ...]):
        super().__init__(dim, split_factor=len(sizes))
        self.sizes = tuple(int(s) for s in sizes)

    def local_sizes(self, n: int) -> list[int]:
        """Each part's width on one of `n` ranks."""
        return [s // n for s in self.sizes]

    def at(self, dim: int) -> "StridedParts":
        """The same parts on another dim (a linear's output features, from its weight's rows)."""
        return StridedParts(dim, self.sizes)

    def _split_tensor(self, tensor, num_chunks, *, with_padding=True, contiguous=True):
        per_part = [p.chunk(num_chunks, self.dim) for p in tensor.split(list(self.sizes), self.dim)]
        shards = [torch.cat([chunks[r] for chunks in per_part], self.dim) for r in range(num_chunks)]
        return [s.contiguous() if contiguous else s for s in shards], [0] * num_chunks

    def _to_replicate_tensor(self, local_tensor, mesh, mesh_dim, current_logical_shape):
        n = mesh.size(mesh_dim)
        gathered = funcol.all_gather_tensor(local_tensor.contiguous(), gather_dim=self.dim, group=(mesh, mesh_dim))
        if isinstance(gathered, funcol.AsyncCollectiveTensor):
            gathered = gathered.wait()
        ranks = [r.split(self.local_sizes(n), self.dim) for r in gathered.chunk(n, self.dim)]
        return torch.cat([ranks[r][k] for k in range(len(self.sizes)) for r in range(n)], self.dim)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StridedParts) and other.dim == self.dim and other.sizes == self.sizes

    def __hash__(self) -> int:
        return hash((self.dim, self.sizes))

    def __repr__(self) -> str:
        return f"StridedParts(dim={self.dim}, sizes={self.sizes})"

    def __str__(self) -> str:
        return f"_S({self.dim}, {'|'.join(map(str, self.sizes))})"


def parts_of(p: Placement) -> int | tuple[int, ...]:
    """What `units.split_len` splits a dim laid out `p` by: part widths, an equal-part count, or 1."""
    return p.sizes if isinstance(p, StridedParts) else getattr(p, "split_factor", 1)


def divides(p: Placement, width: int, tp: int) -> bool:
    """Can a fused layout split `width` evenly: every part (equal parts for `_StridedShard`) a multiple of tp."""
    if isinstance(p, StridedParts):
        return sum(p.sizes) == width and all(s % tp == 0 for s in p.sizes)
    return width % (tp * p.split_factor) == 0


def moved(p: _StridedShard, dim: int) -> _StridedShard:
    """`p`'s fused layout on `dim` (the output of a linear whose weight is laid out `p`)."""
    return p.at(dim) if isinstance(p, StridedParts) else _StridedShard(dim, split_factor=p.split_factor)


def shard_tensor(tensor: torch.Tensor, mesh, placements, src_data_rank: int | None = 0) -> DTensor:
    """`distribute_tensor`, also for `StridedParts` (which DTensor would rebuild as equal parts):
    its rows taken from `src_data_rank`'s tensor (broadcast first; None: this rank's own), split
    mesh dim by mesh dim (FSDP's dp split is on another tensor dim than the parts')."""
    placements = list(placements)
    if not any(isinstance(p, StridedParts) for p in placements):
        return distribute_tensor(tensor, mesh, placements, src_data_rank=src_data_rank)
    if src_data_rank is not None:
        tensor = distribute_tensor(tensor, mesh, [Replicate()] * mesh.ndim, src_data_rank=src_data_rank).to_local()
    local, coordinate = tensor, mesh.get_coordinate()
    for i, p in enumerate(placements):
        if isinstance(p, _StridedShard) or p.is_shard():
            local = p._split_tensor(local, mesh.size(i), with_padding=False)[0][coordinate[i]]
    return DTensor.from_local(local.contiguous(), mesh, placements, run_check=False, shape=tensor.shape, stride=tensor.stride())
