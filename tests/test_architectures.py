"""Decoders beyond the Llama family, built from transformers configs with random weights: each
shards with equal logits, loss and every gradient, whatever the plan decides for it (sharded,
replicated where it must be) — never a crash, never a mismatch.

- GPT-2: `Conv1D` projections (weights stored [in, out]) and a fused qkv projection;
- Gemma: RMSNorm written as `x * (1 + w)`, scaled embeddings, tied head;
- Phi-3: fused `qkv_proj` and `gate_up_proj`;
- Qwen3-MoE: routed experts; on CPU transformers runs them through its own custom op
  (`grouped_mm_fallback`), which DTensor has no rule for, and picks a device-specific `histc`:
  capture follows the mesh's device; the experts split inside each expert on local shards
  (`tests/test_experts.py` asserts the placements).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ATOL, full, max_grad_diff, tp_mesh

ARCHS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=128),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, pad_token_id=0),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128),
}


def _shard_and_compare(arch: str, **options) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import autoshard

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **ARCHS[arch])).train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs={"input_ids": ids, "labels": ids}, **options)
    out, expect = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids, use_cache=False)
    full(out.loss).backward()
    expect.loss.backward()
    grads, missing = max_grad_diff(sharded, ref)
    return {
        "logits": (full(out.logits) - expect.logits).abs().max().item(),
        "loss": abs(full(out.loss).item() - expect.loss.item()),
        "grads": grads, "missing": missing,
        "sharded": sorted(f for f, p in sharded.plan.params.items() if p.placement.startswith("Shard")),
        "kind": sharded.execution.kind, "lowering_notes": getattr(sharded, "lowering_notes", None),
    }


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_matches_unsharded(ranks2, arch):
    for r in ranks2.run(_shard_and_compare, arch):
        assert r["logits"] < ATOL and r["loss"] < ATOL and r["grads"] < ATOL and not r["missing"], r
        assert r["sharded"], "something should shard: every family has an MLP or attention that splits over 2"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_lowers_to_local_tensors_exactly(ranks2, arch):
    # the compile path: every family lowers whole (GPT-2's and Qwen3-MoE's ops that run whole on
    # every rank included: they become the plain op on the replicated local tensors)
    for r in ranks2.run(_shard_and_compare, arch, lower=True):
        assert r["logits"] < ATOL and r["loss"] < ATOL and r["grads"] < ATOL and not r["missing"], r
        assert r["kind"] == "lowered" and r["lowering_notes"] == [], r["lowering_notes"]
