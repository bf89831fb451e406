"""The family sweep: every causal-LM family transformers ships, built tiny and random, sharded by
autoshard, and classified — exact, refused at plan time, or one of the failure classes.

`tiny_config(model_type)` shrinks a family's default config generically (every size-like
attribute under any of its common names, sub-configs likewise); `sweep_one(model_type, lower)`
runs on every rank of a gloo world (tests.dist.RankPool) and always returns a dict whose
"verdict" is one of VERDICTS. `bench/families.py` runs it over every family and writes
`bench/results/families.md`; `tests/test_families.py` checks a fast subset.
"""

from __future__ import annotations

import copy
import math
import traceback
import warnings

import torch

SIZE = dict(hidden=64, layers=2, heads=4, kv=2, head_dim=16, ffn=128, vocab=256, positions=512,
            experts=4, top_k=2, moe_ffn=64)

# capture-failed / plan-crashed: a non-PlanError exception inside autoshard() (in passes/capture.py or
# elsewhere); rank-disagree and pool-timeout are set by the caller (merge_ranks, bench/families.py).
VERDICTS = ("exact", "refused", "capture-failed", "plan-crashed", "crash-after-plan", "mismatch", "build-failed",
            "rank-disagree", "pool-timeout")
FAILURES = ("capture-failed", "plan-crashed", "crash-after-plan", "mismatch", "rank-disagree", "pool-timeout")  # autoshard bugs
TOL = 1e-4

# Attribute names, by role. A name is only touched when the config already has it (not None).
_HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embed_dim", "model_dim", "word_embed_proj_dim",
           "embedding_size", "emb_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "encoder_attention_heads",
          "attention_heads")
_KV = ("num_key_value_heads", "n_kv_heads", "multi_query_group_num", "num_kv_heads", "num_key_value_groups_count")
_HEAD_DIM = ("head_dim", "kv_channels", "attention_head_dim", "global_head_dim", "d_head")
_FFN = ("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "d_ff",
        "inner_hidden_size", "dim_ff", "mlp_dim", "hidden_dim_ffn", "d_inner")
_POS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length",
        "max_length_positions")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts", "n_experts")
_TOPK = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "top_k_experts", "num_selected_experts")
_MOE_FFN = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
            "moe_shared_expert_intermediate_size", "moe_ffn_hidden_size", "expert_ffn_hidden_size")
_SMALL_INTS = {  # misc. sizes that would otherwise stay large or inconsistent with the tiny model
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8, "mamba_d_conv": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "sliding_window": 4, "attention_window_size": 4,
    "num_codebooks": 2, "audio_vocab_size": 64,
    "hidden_size_per_head": 16, "hidden_size_per_layer_input": 16, "num_kv_shared_layers": 0,
    "zero_expert_num": 2, "rotary_dim": 8, "rotary_emb_dim": 8,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_expand": 2, "mamba_headdim": 16, "n_mamba_heads": 8,
    "mamba_d_ssm": 128, "mamba_num_heads": 8, "mamba_head_dim": 16,
    # sizes of side modules that otherwise keep their full-scale width on the 64-wide model (a
    # sparse-attention indexer of 64 heads x 128 was 79 % of tiny DeepSeek-V3.2)
    "index_n_heads": 4, "index_head_dim": 16, "o_lora_rank": 32, "lru_width": 64,
    "linear_num_heads": 4, "linear_head_dim": 16, "attention_hidden_size": 64,
    "input_embedding_size": 32, "output_embedding_size": 96,
}

# Per-family overrides, applied after the generic rule, only where it cannot work. Keep it small.
OVERRIDES: dict[str, dict] = {
    # mamba2 asserts num_heads * head_dim == expand * hidden_size (4 * 32 == 2 * 64)
    "mamba2": {"num_heads": 4, "head_dim": 32, "n_groups": 1, "expand": 2},
    # reformer: the axial position embedding's shape must multiply to the padded sequence length and
    # its dims sum to hidden; the default chunking wants sequences a multiple of 64
    # lfm2_moe's default leaves layer_types None, which its decoder layers index
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": (32, 32), "axial_pos_shape": (8, 8), "attn_layers": ["local", "lsh"],
                 "local_attn_chunk_length": 8, "lsh_attn_chunk_length": 8},
}


def _has(cfg, name: str) -> bool:
    return name in cfg.__dict__ or (hasattr(type(cfg), name) and not callable(getattr(type(cfg), name)))


def _set(cfg, names, value) -> None:
    for n in names:
        v = cfg.__dict__.get(n)
        # 0 usually means "disabled": leave it; so are bools
        if n in cfg.__dict__ and v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and v != 0:
            new = value
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            new = type(v)(value if x else 0 for x in v)  # per-layer sizes (Gemma3n's intermediate_size)
        else:
            continue
        try:
            setattr(cfg, n, new)
        except Exception:  # noqa: BLE001 - a read-only property; leave it
            pass


def _token_ids(cfg) -> dict[str, int | list]:
    return {k: v for k, v in cfg.__dict__.items()
            if (k.endswith("_token_id") or k.endswith("_token_index") or k.endswith("_token_ids"))
            and (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, list) and all(isinstance(x, int) for x in v))}


def _layer_count(cfg) -> int | None:
    for n in _LAYERS:
        v = cfg.__dict__.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _shrink(cfg, model_type: str) -> None:
    """Shrink one (sub-)config in place."""
    from transformers import PretrainedConfig

    old_layers = _layer_count(cfg)
    d = cfg.__dict__
    _set(cfg, _HIDDEN, SIZE["hidden"])
    _set(cfg, _LAYERS, SIZE["layers"])
    _set(cfg, _HEADS, SIZE["heads"])
    kv = [n for n in _KV if isinstance(d.get(n), int)]
    for n in kv:
        # keep multi-query (1 KV head) multi-query; otherwise grouped with 2 KV heads
        setattr(cfg, n, 1 if d[n] == 1 else SIZE["kv"])
    _set(cfg, _HEAD_DIM, SIZE["head_dim"])
    heads = next((d[n] for n in _HEADS if isinstance(d.get(n), int)), None)
    if heads is not None:
        # head_dim / KV heads left None are read directly by several families' attention modules
        if "head_dim" in d and d["head_dim"] is None:
            cfg.head_dim = SIZE["head_dim"]
        if "num_key_value_heads" in d and d["num_key_value_heads"] is None:
            cfg.num_key_value_heads = SIZE["kv"]
    _set(cfg, _FFN, SIZE["ffn"])
    _set(cfg, _POS, SIZE["positions"])
    _set(cfg, _EXPERTS, SIZE["experts"])
    _set(cfg, _TOPK, SIZE["top_k"])
    if any(isinstance(d.get(n), int) for n in _EXPERTS):
        for n in _TOPK:
            if n in d and d[n] is None:
                setattr(cfg, n, SIZE["top_k"])
    _set(cfg, _MOE_FFN, SIZE["moe_ffn"])
    for n, v in _SMALL_INTS.items():
        _set(cfg, [n], v)
    if "qk_rope_head_dim" in d or "kv_lora_rank" in d:
        # multi-head latent attention: the rotary embedding is sized by head_dim = qk_rope_head_dim,
        # and K/V come out of the latent with one head per query head
        if "head_dim" in d:
            cfg.head_dim = d.get("qk_rope_head_dim") or SIZE["head_dim"]
        for n in kv:
            setattr(cfg, n, SIZE["heads"])
    # deterministic training forward: no dropout, no router jitter, no layer drop
    for k, v in list(d.items()):
        if isinstance(v, float) and any(s in k for s in ("dropout", "drop", "jitter")):
            setattr(cfg, k, 0.0)
    # per-layer lists: keep layers 0 and the first layer unlike layer 0 (so hybrid stacks keep both kinds)
    if old_layers and old_layers > SIZE["layers"]:
        keep = [0]
        types = d.get("layer_types") or next((v for k, v in d.items() if isinstance(v, list) and len(v) == old_layers), None)
        if types:
            j = next((i for i, t in enumerate(types) if t != types[0]), None)
            keep.append(j if j is not None else 1)
        else:
            keep.append(1)
        for k, v in list(d.items()):
            if isinstance(v, (list, tuple)) and len(v) == old_layers and k not in ("eos_token_id",):
                setattr(cfg, k, type(v)(v[i] for i in keep))
    # block patterns / periods longer than the model
    for k in ("attn_layer_period", "expert_layer_period"):
        if isinstance(d.get(k), int) and d[k] > SIZE["layers"]:
            setattr(cfg, k, SIZE["layers"])
    for k in ("attn_layer_offset", "expert_layer_offset"):
        if isinstance(d.get(k), int) and d[k] >= SIZE["layers"]:
            setattr(cfg, k, SIZE["layers"] - 1)
    # vocabulary, and special token ids clamped into it (distinct ids from the top down)
    if isinstance(d.get("vocab_size"), int):
        vocab = SIZE["vocab"]
        cfg.vocab_size = vocab
        for n in ("decoder_vocab_size", "vocab_size_per_layer_input"):
            if isinstance(d.get(n), int):
                setattr(cfg, n, vocab)
        seen: dict[int, int] = {}

        def clamp(x: int) -> int:
            if 0 <= x < vocab:
                return x
            if x not in seen:
                seen[x] = vocab - 1 - len(seen)
            return seen[x]

        for k, v in _token_ids(cfg).items():
            setattr(cfg, k, [clamp(x) for x in v] if isinstance(v, list) else clamp(v))
    # rope sections that must sum to half the rotary dim
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rope, dict):
        if isinstance(rope.get("mrope_section"), list):
            half = int(SIZE["head_dim"] * rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0) or 1.0)) // 2
            n = len(rope["mrope_section"])
            rope["mrope_section"] = [half // n + (1 if i < half % n else 0) for i in range(n)]
        if "original_max_position_embeddings" in rope and isinstance(rope["original_max_position_embeddings"], int):
            rope["original_max_position_embeddings"] = min(rope["original_max_position_embeddings"], SIZE["positions"])
    for k, v in list(d.items()):
        if isinstance(v, PretrainedConfig):
            _shrink(v, model_type)
        elif isinstance(v, dict) and v.get("model_type"):  # a sub-config still held as a dict
            try:
                from transformers import AutoConfig

                sub = AutoConfig.for_model(**v)
                _shrink(sub, model_type)
                setattr(cfg, k, sub)
            except Exception:  # noqa: BLE001 - leave it as given
                pass


def tiny_config(model_type: str):
    """A tiny random-init config for `model_type` (a key of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES).
    Raises whatever the family's config class raises; callers record it."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    _shrink(cfg, model_type)
    for k, v in OVERRIDES.get(model_type, {}).items():
        setattr(cfg, k, v)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def build_tiny(model_type: str, seed: int = 0):
    """Build the tiny model as `autoshard.configs.build_model` does: seeded, float32, train mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.train(), cfg


def vocab_of(cfg) -> int:
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "get_text_config", lambda: None)()):
        if c is not None and isinstance(getattr(c, "vocab_size", None), int):
            return c.vocab_size
    return SIZE["vocab"]


def example_inputs(cfg, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """input_ids and labels avoiding every special token id (image/audio placeholders would ask
    multimodal models for pixels)."""
    vocab = vocab_of(cfg)
    special = set()
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None:
            for v in _token_ids(c).values():
                special.update(v if isinstance(v, list) else [v])
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    g = torch.Generator().manual_seed(seed)
    pick = lambda: allowed[torch.randint(0, len(allowed), (batch, seq), generator=g)]  # noqa: E731
    return {"input_ids": pick(), "labels": pick()}


# ---- classification helpers --------------------------------------------------------------------

def _frames(exc: BaseException) -> tuple[str, str | None]:
    tb = traceback.extract_tb(exc.__traceback__)
    inner = f"{tb[-1].filename.split('/site-packages/')[-1]}:{tb[-1].lineno}" if tb else "?"
    ours = [f for f in tb if "/autoshard/" in f.filename and "/tests/" not in f.filename]
    mine = f"autoshard/{ours[-1].filename.split('/autoshard/')[-1]}:{ours[-1].lineno} ({ours[-1].name})" if ours else None
    return inner, mine


def _error(exc: BaseException) -> dict:
    inner, mine = _frames(exc)
    return {"error_type": type(exc).__name__, "error": str(exc)[:300], "frame": inner, "autoshard_frame": mine}


def _logits(out):
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out):
    loss = getattr(out, "loss", None)
    return loss


def _scalar_for_backward(out):
    from tests.helpers import full

    loss = _loss(out)
    if loss is not None:
        loss = full(loss)
        if torch.isfinite(loss).all():
            return loss, True
    return full(_logits(out)).float().pow(2).mean(), False


def _replicated(plan) -> dict[str, str]:
    return {fqn: p.reason for fqn, p in plan.params.items() if p.placement == "Replicate()"}


def sweep_one(model_type: str, lower: bool, seq: int = 7) -> dict:
    """Rank-side: build, shard, run, compare; classify. Never raises."""
    res: dict = {"model_type": model_type, "lower": lower, "seq": seq}
    if not torch.is_grad_enabled():  # a previous task left it off; do not inherit that
        res["grad_mode_was_off"] = True
    try:
        import torch.distributed as dist

        res["tp"] = dist.get_world_size()
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            res.update(_sweep(model_type, lower, seq))
            if not torch.is_grad_enabled():
                # something (the model, autoshard) switched grad mode off and never restored it
                res["left_grad_disabled"] = True
    except BaseException as e:  # noqa: BLE001 - one family must never kill the rank pool
        res.update(verdict="build-failed", **_error(e))
        res["error"] = "(sweep harness error) " + res["error"]
    finally:
        torch.set_grad_enabled(True)
    return res


def _sweep(model_type: str, lower: bool, seq: int) -> dict:
    import autoshard
    from autoshard import PlanError
    from tests.helpers import full, max_grad_diff, tp_mesh

    import time

    res: dict = {}
    t0 = time.perf_counter()
    # 1. build the tiny model and the reference numbers (failures here are not autoshard's)
    try:
        model, cfg = build_tiny(model_type)
        kw = example_inputs(cfg, seq=seq)
        ref = copy.deepcopy(model)
        expect = ref(**kw, use_cache=False)
        ref_scalar, used_loss = _scalar_for_backward(expect)
        ref_scalar.backward()
        expect_logits = _logits(expect).detach().float()
        expect_loss = float(ref_scalar.detach())
    except BaseException as e:  # noqa: BLE001
        return {"verdict": "build-failed", **_error(e)}
    total = sum(p.numel() for p in model.parameters())
    res["params"] = total
    t1 = time.perf_counter()
    res["t_build"] = round(t1 - t0, 2)
    # 2. plan + rewrite
    try:
        sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=kw, lower=lower)
    except PlanError as e:
        return {**res, "verdict": "refused", **_error(e)}
    except BaseException as e:  # noqa: BLE001
        err = _error(e)
        af = err["autoshard_frame"] or ""
        return {**res, "verdict": "capture-failed" if "passes/capture.py" in af or af == "" else "plan-crashed", **err}
    t2 = time.perf_counter()
    res["t_autoshard"] = round(t2 - t1, 2)
    try:
        from torch.distributed.tensor import DTensor

        local = sum((p.to_local().numel() if isinstance(p, DTensor) else p.numel()) for p in sharded.parameters())
        res["param_fraction"] = local / total if total else 1.0
        res["replicated"] = _replicated(sharded.plan)
        res["plan_notes"] = list(sharded.plan.notes)[:10]
        res["stream"] = sharded.plan.stream
    except BaseException as e:  # noqa: BLE001
        res["inspect_error"] = f"{type(e).__name__}: {e}"[:200]
    # 3. run the sharded module
    phase = "forward"
    try:
        out = sharded(**kw)
        scalar, _ = _scalar_for_backward(out)
        logits = full(_logits(out)).detach().float()
        phase = "backward"  # errors raised by autograd carry no autoshard frame
        scalar.backward()
    except BaseException as e:  # noqa: BLE001
        return {**res, "verdict": "crash-after-plan", "phase": phase, **_error(e), **_lowering(sharded, lower)}
    res.update(_lowering(sharded, lower))
    res["t_run"] = round(time.perf_counter() - t2, 2)
    # 4. compare
    try:
        diffs = {}
        if logits.shape != expect_logits.shape:
            diffs["logits_shape"] = f"{list(logits.shape)} vs {list(expect_logits.shape)}"
            ok = False
        else:
            scale = max(1.0, expect_logits.abs().max().item())
            diffs["logits"] = (logits - expect_logits).abs().max().item() / scale
            diffs["loss"] = abs(float(scalar.detach()) - expect_loss) / max(1.0, abs(expect_loss))
            gdiff, missing = max_grad_diff(sharded, ref)
            gscale = max([1.0] + [p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None])
            diffs["grads"] = gdiff / gscale
            diffs["grads_abs"] = gdiff
            if missing:
                diffs["grad_missing"] = missing[:5]
            ok = all(not math.isnan(diffs[k]) and diffs[k] <= TOL for k in ("logits", "loss", "grads")) and not missing
        res["diffs"] = diffs
        res["verdict"] = "exact" if ok else "mismatch"
    except BaseException as e:  # noqa: BLE001
        return {**res, "verdict": "crash-after-plan", **_error(e)}
    return res


def _lowering(sharded, lower: bool) -> dict:
    if not lower:
        return {}
    notes = list(getattr(sharded, "lowering_notes", None) or [])
    return {"lowered": not notes, "lowering_notes": [n[:300] for n in notes]}


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def try_build(model_type: str) -> str | None:
    """Local (no process group): None if the tiny model builds and runs forward, else why."""
    try:
        model, cfg = build_tiny(model_type)
        kw = example_inputs(cfg)
        out = model(**kw, use_cache=False)
        _scalar_for_backward(out)[0].backward()
        return None
    except BaseException as e:  # noqa: BLE001
        err = _error(e)
        return f"{err['error_type']}: {err['error'][:200]} @ {err['frame']}"


def merge_ranks(results: list[dict]) -> dict:
    """One record for a family from every rank's dict; ranks that disagree are a failure."""
    verdicts = {r.get("verdict") for r in results}
    rec = dict(results[0])
    if len(verdicts) != 1:
        rec["verdict"] = "rank-disagree"
        rec["error"] = "; ".join(f"rank {i}: {r.get('verdict')} {r.get('error_type', '')} {r.get('error', '')[:120]}"
                                 for i, r in enumerate(results))
        bad = next((r for r in results if r.get("autoshard_frame")), None)
        if bad:
            rec["autoshard_frame"] = bad["autoshard_frame"]
    return rec
