"""Linear-attention and state-space mixers sharded by heads, on gloo: Qwen3.5's gated delta net
(fused `in_proj_qkv` through a depthwise causal conv, the chunked delta rule, a gated RMSNorm
over `[b * s * h, d]` rows), Kimi-Linear's (separate q, k, v concatenated for one conv) and
Mamba-2's (one `in_proj` cut into z | x | B | C | dt, the scan's einsums, B and C of one group
shared by every head), Mamba-1's (x_proj a row inside the mixer, as in vLLM) and RecurrentGemma's
RG-LRU. Exact forward, loss and every gradient; each rank holds its heads of
every projection."""

from __future__ import annotations

import pytest

from tests.test_fused import _check_exact, _shard_family


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_qwen3_5_gated_delta_net_splits_by_heads_tp2(ranks2, lower):
    for r in ranks2.run(_shard_family, "qwen3_5_text", lower):
        _check_exact(r, lower)
        attn = "model.layers.0.linear_attn"
        # q | k | v of 2, 2 and 4 heads of 16: each rank its head of q and k, two of v
        assert r["plan"][f"{attn}.in_proj_qkv.weight"] == "_StridedShard(0, parts=32|32|64)"
        assert r["local"][f"{attn}.in_proj_qkv.weight"] == (64, 64)
        for name in ("in_proj_z", "in_proj_b", "in_proj_a"):
            assert r["plan"][f"{attn}.{name}.weight"] == "Shard(0)"
        assert r["plan"][f"{attn}.out_proj.weight"] == "Shard(1)"
        # per-head and per-channel vectors stay whole (a few numbers per head)
        assert r["plan"][f"{attn}.conv1d.weight"] == "Replicate()" and r["plan"][f"{attn}.A_log"] == "Replicate()"
        # one row reduce per mixer (gated delta net, then full attention) and per MLP, and the
        # vocab-parallel embedding's: nothing gathered inside the mixer
        assert r["planned"] == 5, r["boundaries"]


def test_kimi_linear_concatenated_qkv_splits_by_heads_tp2(ranks2):
    for r in ranks2.run(_shard_family, "kimi_linear", False):
        _check_exact(r, False)
        attn = "model.layers.0.self_attn"
        for name in ("q_proj", "k_proj", "v_proj"):
            assert r["plan"][f"{attn}.{name}.weight"] == "Shard(0)"
        assert r["plan"][f"{attn}.o_proj.weight"] == "Shard(1)"


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_mamba2_mixer_splits_by_heads_with_shared_b_and_c_gathered_tp2(ranks2, lower):
    for r in ranks2.run(_shard_family, "mamba2", lower, True):
        _check_exact(r, lower)
        mixer = "backbone.layers.0.mixer"
        # z | x | B | C | dt of 128, 128, 8, 8 and 4: each rank its half of every part
        assert r["plan"][f"{mixer}.in_proj.weight"] == "_StridedShard(0, parts=128|128|8|8|4)"
        assert r["local"][f"{mixer}.in_proj.weight"] == (138, 64)
        assert r["plan"][f"{mixer}.out_proj.weight"] == "Shard(1)"
        # B and C (one group, read by all heads) gathered whole right after the cut, 2 per layer;
        # the gated norm's mean square over the whole width reduced per token, 1 per layer
        gathers = [b for b in r["boundaries"] if "gathered" in b]
        assert len(gathers) == 4, r["boundaries"]
        assert len(r["stats"]) == 2, r["stats"]


def test_nemotron_h_groups_repeated_to_heads_lower_exactly_tp2(ranks2):
    """Its B and C have one group per rank, repeated to heads with the global `output_size`."""
    for r in ranks2.run(_shard_family, "nemotron_h", True):
        _check_exact(r, True)
        assert r["plan"]["model.layers.0.mixer.out_proj.weight"] == "Shard(1)"


@pytest.mark.parametrize("lower", [False, True], ids=["dtensor", "lowered"])
def test_mamba_mixer_splits_channels_with_x_proj_as_its_row_tp2(ranks2, lower):
    for r in ranks2.run(_shard_family, "mamba", lower):
        _check_exact(r, lower)
        mixer = "backbone.layers.0.mixer"  # the first layer too: export reads seq_len off in_proj's output
        assert r["plan"][f"{mixer}.in_proj.weight"] == "_StridedShard(0, sf=2)"  # x | gate, channels split
        # x_proj contracts the channels into dt | B | C: reduced inside the mixer; dt_proj (rank
        # to channels, small) whole, its output read by each rank's channels
        assert r["plan"][f"{mixer}.x_proj.weight"] == "Shard(1)"
        assert r["plan"][f"{mixer}.dt_proj.weight"] == "Replicate()"
        assert r["plan"][f"{mixer}.out_proj.weight"] == "Shard(1)"


def test_recurrent_gemma_recurrent_block_splits_tp2(ranks2):
    for r in ranks2.run(_shard_family, "recurrent_gemma", True):
        _check_exact(r, True)
        block = "model.layers.0.temporal_block"
        assert r["plan"][f"{block}.linear_x.weight"] == "Shard(0)"
        assert r["plan"][f"{block}.linear_out.weight"] == "Shard(1)"
