"""`CachedLM`: the model with its KV cache as module state steps exactly as transformers'
`generate` does (single process, unsharded), and its mask is the one transformers builds."""

from __future__ import annotations

import torch

from autoshard.serve.static_cache import CachedLM, cache_shapes, sliding_window_limit, step_mask
from tests.helpers import tiny_model


def test_cached_steps_equal_generate_with_left_padding():
    model = tiny_model("tiny-llama").eval()
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    expect = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 5:]
    cached = CachedLM(model, 2, 16).eval()
    full = torch.zeros(2, 16, dtype=torch.long)
    full[:, :5] = mask
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    tokens = []
    with torch.no_grad():
        logits = cached(ids, full, pos, torch.arange(5))
        last = pos[:, -1:]
        for t in range(6):
            tokens.append(logits[:, -1].argmax(-1))
            full[:, 5 + t] = 1
            last = last + 1
            logits = cached(tokens[-1][:, None], full, last, torch.tensor([5 + t]))
    assert torch.equal(torch.stack(tokens, 1), expect)
    # the model's own parameters, under their own names; the cache is extra, non-persistent state
    assert set(dict(cached.named_parameters())) == set(dict(model.named_parameters()))
    assert set(cached.state_dict()) == set(model.state_dict())


def test_cache_shapes_follow_kv_heads_and_dtype():
    model = tiny_model("tiny-llama").to(torch.bfloat16)
    shapes = cache_shapes(model, 3, 32)
    assert len(shapes) == model.config.num_hidden_layers
    assert shapes[0] == ((3, 2, 32, 16), (3, 2, 32, 16), torch.bfloat16)


def test_step_mask_is_causal_over_real_slots():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    m = step_mask(mask, torch.tensor([1, 2]), torch.float32)
    allowed = m == 0
    assert m.shape == (2, 1, 2, 4)
    assert allowed[0, 0].tolist() == [[False, True, False, False], [False, True, True, False]]
    assert allowed[1, 0].tolist() == [[True, True, False, False], [True, True, True, False]]


def test_sliding_window_limit():
    model = tiny_model("tiny-mistral")
    window = getattr(model.config, "sliding_window", None)
    assert sliding_window_limit(model.config) == (int(window) if window else None)
    assert sliding_window_limit(tiny_model("tiny-llama").config) is None
