"""Hand-written parallel ops that the sharding passes substitute for aten nodes."""

from autoshard.ops.loss_parallel import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy"]
