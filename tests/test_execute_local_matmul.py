"""`runtime.LocalMatmul`'s operand placements: each operand gets what makes the local product split
like the output, and an operand held whole next to a split output gets a partial gradient.
(End to end: Inkling-2's head-sharded scores @ a replicated 2-D matrix, in the family fast subset.)"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from autoshard.execute.dtensor_ops import _grads_of, operand_placement


def test_batch_split_output_splits_both_operands_alike_and_keeps_broadcast_ones_whole():
    a, b = torch.empty(2, 4, 5, 8), torch.empty(2, 4, 8, 5)
    assert operand_placement(Shard(1), a, 4, "a") == Shard(1)
    assert operand_placement(Shard(1), b, 4, "b") == Shard(1)
    matrix = torch.empty(8, 6)                           # broadcast over every batch dim
    assert operand_placement(Shard(1), matrix, 4, "b") == Replicate()
    one_head = torch.empty(2, 1, 8, 5)                   # broadcast over the split dim
    assert operand_placement(Shard(1), one_head, 4, "b") == Replicate()
    lower_rank = torch.empty(4, 8, 5)                    # aligned from the right
    assert operand_placement(Shard(1), lower_rank, 4, "b") == Shard(0)


def test_row_or_column_split_output_splits_one_operand():
    a, b = torch.empty(2, 4, 5, 8), torch.empty(8, 6)
    assert (operand_placement(Shard(2), a, 4, "a"), operand_placement(Shard(2), b, 4, "b")) == (Shard(2), Replicate())
    assert (operand_placement(Shard(3), a, 4, "a"), operand_placement(Shard(3), b, 4, "b")) == (Replicate(), Shard(1))
    assert operand_placement(Replicate(), a, 4, "a") == Replicate()


def test_whole_operands_of_a_split_product_get_partial_gradients():
    ins = ((Shard(1),), (Replicate(),))
    assert _grads_of(ins, Shard(1)) == ((Shard(1),), (Partial(),))
    assert _grads_of(((Replicate(),), (Replicate(),)), Replicate()) == ((Replicate(),), (Replicate(),))
