"""Dataflow, not names: a hand-written decoder with arbitrary attribute names and its own
attention code (manual scores/softmax, constant head counts) gets the Megatron plan too."""

from __future__ import annotations

import torch

from tests.handwritten import TinyLM
from tests.helpers import ATOL, comm_counts, full, max_grad_diff, shard_and_copy


def _handwritten(seq: int):
    torch.manual_seed(0)
    model = TinyLM()
    tokens = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(3))
    sharded, ref = shard_and_copy(model, example_inputs=(tokens,))
    counts, _ = comm_counts(lambda: sharded(tokens))
    out, expect = full(sharded(tokens)), ref(tokens)
    out.pow(2).mean().backward()
    expect.pow(2).mean().backward()
    grad_diff, missing = max_grad_diff(sharded, ref)
    placements = {f: p.placement for f, p in sharded.plan.params.items()}
    return (out - expect).abs().max().item(), grad_diff, missing, counts, placements, sharded.plan.stream


def test_handwritten_decoder_gets_megatron_plan_and_exact_numerics(ranks2):
    logits_diff, grad_diff, missing, counts, placements, stream = ranks2.run(_handwritten, 7)[0]
    assert logits_diff < ATOL and grad_diff < ATOL and not missing
    assert stream == "sequence_parallel"
    for layer in (0, 1):
        for col in ("mix.alpha", "mix.beta", "mix.gamma", "feed.left", "feed.right"):
            assert placements[f"stack.{layer}.{col}.weight"] == "Shard(0)"
        for row in ("mix.omega", "feed.back"):
            assert placements[f"stack.{layer}.{row}.weight"] == "Shard(1)"
        for norm in ("pre", "post"):
            assert placements[f"stack.{layer}.{norm}.gain"] == "Replicate()"
    assert placements["table.weight"] == "Shard(0)" and placements["readout.weight"] == "Shard(0)"
    # per layer 2 all-gathers + 2 reduce-scatters; embedding RS; readout input AG + logits gather
    assert counts == {"all_gather": 2 * 2 + 2, "reduce_scatter": 2 * 2 + 1}
