"""torch.distributed.checkpoint for DTensors whose local shard is several blocks of the tensor.

DCP describes a DTensor's local shard as one chunk (an offset and a size per dim, from
`compute_local_shape_and_global_offset`). A fused projection split part by part holds
`_StridedShard(0, split_factor=3)`: rank 0's rows of a q|k|v weight are q[:n/2], k[:n/2] and
v[:n/2] — three blocks, not one. Handed to DCP as they are, torch saves overlapping chunks (the
save fails its global plan check) and would load the wrong rows. DCP asks each value to describe
itself (`__create_chunk_list__`, `__create_write_items__`, `__get_tensor_shard__`):
`BlockShardedDTensor`, the same DTensor (same local tensor, same placements), lists each block
as its own chunk, a view into the local shard, so checkpoints keep the model's own layout and
reshard to any mesh. `describe_blocks` puts it in a state dict where a shard has several blocks.

    >>> state = sharded.state_dict()           # autoshard's state_dict hook: already described
    >>> dcp.save(state, checkpoint_id=path)
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.schema.fused_parts import moved, shard_tensor
from autoshard.schema.placements import splits

Block = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]   # (global offsets, sizes, local offsets)


def local_runs(shape: tuple[int, ...], mesh, placements, dim: int) -> list[tuple[int, int, int]]:
    """This rank's indices along `dim` as maximal runs `(global start, length, local start)`,
    by distributing an index vector the way the tensor is distributed (torch's own semantics,
    `_StridedShard` and uneven shards included; no communication)."""
    return _runs(tuple(shape), mesh, tuple(placements), dim, tuple(mesh.get_coordinate() or ()))


@lru_cache(maxsize=4096)
def _runs(shape, mesh, placements, dim, _coordinate) -> list[tuple[int, int, int]]:
    # only the placements that split `dim` decide which of its indices this rank holds: distribute
    # that dim's index vector alone (the others act as Replicate on it)
    along = [(moved(p, 0) if isinstance(p, _StridedShard) else Shard(0)) if splits(p) and p.dim % len(shape) == dim
             else Replicate() for p in placements]
    if all(p.is_replicate() for p in along):
        return [(0, shape[dim], 0)]
    index = torch.arange(shape[dim], device=mesh.device_type)
    mine = shard_tensor(index, mesh, along, src_data_rank=None).to_local().tolist()
    runs: list[list[int]] = []
    for pos, g in enumerate(mine):
        if runs and runs[-1][0] + runs[-1][1] == g:
            runs[-1][1] += 1
        else:
            runs.append([g, 1, pos])
    return [tuple(r) for r in runs]


def local_blocks(t: torch.Tensor) -> list[tuple[tuple[int, int, int], ...]]:
    """Every block of this rank's shard of `t` (a plain tensor: the whole of it), each as one
    `(global start, size, local start)` per dim."""
    if not isinstance(t, DTensor):
        return [tuple((0, n, 0) for n in t.shape)]
    per_dim = [local_runs(tuple(t.shape), t.device_mesh, t.placements, d) for d in range(t.ndim)]
    return list(itertools.product(*per_dim))


def block_view(local: torch.Tensor, block: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """The view of a local shard that holds `block` (as `local_blocks` gives it)."""
    for d, (_, size, start) in enumerate(block):
        local = local.narrow(d, start, size)
    return local


def blocks(t: DTensor) -> list[Block] | None:
    """The blocks of `t`'s local shard as (offsets, sizes, local offsets), or None when it is
    one block (or empty): DCP's own description is right then."""
    if not any(isinstance(p, _StridedShard) for p in t.placements) or t._local_tensor.numel() == 0:
        return None
    found = local_blocks(t)
    if len(found) <= 1:
        return None
    return [tuple(zip(*block)) for block in found]  # type: ignore[misc]


class BlockShardedDTensor(DTensor):
    """A DTensor that describes its local shard to DCP block by block (see the module doc)."""

    @staticmethod
    def of(t: DTensor) -> "BlockShardedDTensor":
        return BlockShardedDTensor(t._local_tensor, t._spec, requires_grad=False)

    def _blocks(self) -> list[Block]:
        self._raise_if_contains_partial_placements()
        return blocks(self) or []

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)) for off, size, _ in self._blocks()]

    def __create_write_items__(self, fqn, object):
        properties = TensorProperties.create_from_tensor(self._local_tensor)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(off)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)),
                    properties=properties,
                    size=self.size(),
                ),
            )
            for off, size, _ in self._blocks()
        ]

    def __get_tensor_shard__(self, index):
        for block in self._blocks():
            if index.offset is None or tuple(index.offset) == block[0]:
                return block_view(self._local_tensor, tuple(zip(*block)))
        raise ValueError(f"no block of the local shard of {index.fqn} starts at {tuple(index.offset)}")


def describe_blocks(state: dict) -> dict:
    """`state` with every DTensor whose local shard is several blocks as a `BlockShardedDTensor`
    (in place; Parameters, from `state_dict(keep_vars=True)`, are left as they are)."""
    for name, value in state.items():
        if type(value) is DTensor and blocks(value) is not None:
            state[name] = BlockShardedDTensor.of(value)
    return state


def describe_blocks_hook(module, state, prefix, local_metadata) -> None:
    """`register_state_dict_post_hook` form of `describe_blocks`."""
    describe_blocks(state)
