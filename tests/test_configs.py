"""Bundled configs: every one loads offline and builds; real-scale ones match their published sizes."""

import json
import time

import pytest
import torch
from transformers import PretrainedConfig

from autoshard.configs import (
    UnknownConfigError,
    build_model,
    config_source,
    list_configs,
    load_config,
)

REAL = {
    # name: (architecture class, published parameter count from the model card / hub)
    "llama-3.1-8b": ("LlamaForCausalLM", 8.03e9),
    "llama-3.1-70b": ("LlamaForCausalLM", 70.55e9),
    "llama-3.1-405b": ("LlamaForCausalLM", 405.8e9),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", 0.494e9),
    "qwen3-32b": ("Qwen3ForCausalLM", 32.8e9),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 30.5e9),
    "mistral-7b": ("MistralForCausalLM", 7.24e9),
    "mixtral-8x7b": ("MixtralForCausalLM", 46.7e9),
    "deepseek-v3": ("DeepseekV3ForCausalLM", 671e9),
    "gpt-oss-120b": ("GptOssForCausalLM", 116.8e9),
    "olmo-2-32b": ("Olmo2ForCausalLM", 32.2e9),
}
TINY = {
    "tiny-llama": "LlamaForCausalLM",
    "tiny-qwen2": "Qwen2ForCausalLM",
    "tiny-qwen3": "Qwen3ForCausalLM",
    "tiny-mistral": "MistralForCausalLM",
    "tiny-qwen3-moe": "Qwen3MoeForCausalLM",
    "tiny-mixtral": "MixtralForCausalLM",
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


def test_list_configs_is_exactly_the_bundled_set():
    assert list_configs() == sorted(set(REAL) | set(TINY))


@pytest.mark.parametrize("name", sorted(set(REAL) | set(TINY)))
def test_loads_and_builds_on_meta(name):
    cfg = load_config(name)
    assert isinstance(cfg, PretrainedConfig)
    assert cfg.architectures and cfg.model_type
    model = build_model(cfg, device="meta")
    assert type(model).__name__ == cfg.architectures[0]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert config_source(name)  # every bundled file says where its values come from


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_scale_parameter_count_matches_published(name):
    arch, published = REAL[name]
    model = build_model(name, device="meta")
    assert type(model).__name__ == arch
    count = n_params(model)
    assert abs(count - published) / published < 0.01, f"{name}: {count:,} params vs published {published:,.0f}"


def test_exact_counts_for_well_known_checkpoints():
    # Exact safetensors totals, a stricter check that nothing (bias, norm, tying) is off.
    assert n_params(build_model("llama-3.1-8b", device="meta")) == 8_030_261_248
    assert n_params(build_model("mistral-7b", device="meta")) == 7_241_732_096


def test_405b_builds_fast_on_meta():
    build_model("llama-3.1-8b", device="meta")  # pay the one-off transformers module import first
    t0 = time.perf_counter()
    model = build_model("llama-3.1-405b", device="meta")
    elapsed = time.perf_counter() - t0
    assert n_params(model) > 400e9
    assert elapsed < 10.0, f"405B meta build took {elapsed:.1f}s"


def test_llama31_rope_scaling_kept():
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"):
        cfg = load_config(name)
        rope = cfg.rope_parameters
        assert rope["rope_type"] == "llama3"
        assert rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 8192
        assert rope["rope_theta"] == 500000.0
        assert cfg.num_key_value_heads == 8


def test_qwen25_05b_heads_and_tying():
    cfg = load_config("qwen2.5-0.5b")
    assert cfg.num_attention_heads == 14
    assert cfg.num_key_value_heads == 2
    assert cfg.tie_word_embeddings
    model = build_model(cfg, device="meta")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_moe_configs():
    cfg = load_config("qwen3-30b-a3b")
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (128, 8, 768)
    cfg = load_config("mixtral-8x7b")
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_builds_on_cpu_and_runs_forward(name):
    model = build_model(name, device="cpu")
    assert type(model).__name__ == TINY[name]
    assert not model.training
    assert n_params(model) <= 300_000
    p = next(model.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (2, 8, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_llama_shape():
    cfg = load_config("tiny-llama")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size in (128, 176) and cfg.vocab_size == 256 and not cfg.tie_word_embeddings


def test_tiny_family_features():
    qwen2 = build_model("tiny-qwen2")
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    attn = qwen2.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    qwen3 = build_model("tiny-qwen3")
    attn = qwen3.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert attn.q_proj.out_features != qwen3.config.hidden_size  # heads * head_dim != hidden, as in Qwen3-32B


def test_seed_makes_weights_reproducible():
    a, b, c = (build_model("tiny-llama", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_model_dtype_and_no_config_mutation():
    cfg = load_config("tiny-mixtral")
    before = cfg.to_dict()
    model = build_model(cfg, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert cfg.to_dict() == before
    assert next(build_model("llama-3.1-8b", device="meta", dtype="auto").parameters()).dtype == torch.bfloat16


def test_name_lookup_is_case_insensitive():
    assert load_config("Llama-3.1-8B").hidden_size == 4096
    assert load_config("QWEN2.5-0.5B").num_attention_heads == 14
    assert load_config("tiny_llama").hidden_size == 64


def test_pretrained_config_returned_as_is():
    cfg = load_config("tiny-llama")
    assert load_config(cfg) is cfg


def test_dict_and_path(tmp_path):
    values = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "_note": "ignored"}
    cfg = load_config(values)
    assert type(cfg).__name__ == "LlamaConfig" and cfg.hidden_size == 32
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert load_config(str(path)).num_key_value_heads == 1
    assert load_config(tmp_path).hidden_size == 32  # directory holding config.json
    with pytest.raises(ValueError, match="model_type"):
        load_config({"hidden_size": 32})


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:
        load_config("llama-9000b")
    msg = str(info.value)
    assert "llama-9000b" in msg
    for name in list_configs():
        assert name in msg
    with pytest.raises(ValueError):  # UnknownConfigError is both
        build_model("nope", device="meta")
    assert issubclass(UnknownConfigError, KeyError) and issubclass(UnknownConfigError, ValueError)


def test_json_files_are_package_data():
    from importlib import resources

    files = {p.name for p in resources.files("autoshard.configs").iterdir() if p.name.endswith(".json")}
    assert files == {f"{n}.json" for n in list_configs()}
