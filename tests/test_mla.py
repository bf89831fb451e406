"""Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite) on real gloo: the
low-rank down-projections (`q_a_proj`, `kv_a_proj_with_mqa`) and their norms stay whole, the
up-projections to heads (`q_b_proj`, `kv_b_proj`) are columns of one region that meets in the
attention, `o_proj` the row; exact, on DTensors and lowered."""

from __future__ import annotations

import pytest

from tests.test_fused import _check_exact, _shard_family


def _check_mla(r: dict, lower: bool) -> None:
    _check_exact(r, lower)
    attn = "model.layers.0.self_attn"
    assert r["plan"][f"{attn}.q_a_proj.weight"] == "Replicate()"
    assert r["plan"][f"{attn}.kv_a_proj_with_mqa.weight"] == "Replicate()"
    assert r["plan"][f"{attn}.q_b_proj.weight"] == "Shard(0)"
    assert r["plan"][f"{attn}.kv_b_proj.weight"] == "Shard(0)"
    assert r["plan"][f"{attn}.o_proj.weight"] == "Shard(1)"


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_deepseek_v3_mla_heads_split_tp2(ranks2, lower):
    for r in ranks2.run(_shard_family, "deepseek_v3", lower):
        _check_mla(r, lower)
        # 4 heads of (nope 16 + v 16) per rank pair: each rank its 2 heads of kv_b_proj's output
        assert r["local"]["model.layers.0.self_attn.kv_b_proj.weight"][0] * 2 == 4 * 32, r["local"]


@pytest.mark.slow  # tp 2 covers the rule on every CI run; this width, with the full sweep
def test_deepseek_v3_mla_tp4(ranks4):
    for r in ranks4.run(_shard_family, "deepseek_v3", True):
        _check_mla(r, True)


@pytest.mark.slow  # DeepSeek-V3 covers MLA on every CI run; MiniCPM3 with the full sweep
def test_minicpm3_mla_tp2(ranks2):
    for r in ranks2.run(_shard_family, "minicpm3", True):
        _check_mla(r, True)


def test_deepseek_v32_sparse_attention_keeps_mla_heads_split_tp2(ranks2):
    """DeepSeek-V3.2's indexer reads `kv_a_proj_with_mqa`'s rope part too: a split kv_a_proj (its
    shared rope part gathered) with kv_b_proj as its row must not displace the heads split."""
    for r in ranks2.run(_shard_family, "deepseek_v32", True):
        _check_mla(r, True)
