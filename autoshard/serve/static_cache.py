"""A transformers causal LM with its KV cache as module state: the program `generate` shards.

`CachedLM(model, batch, max_len)` shares `model`'s submodules (so every parameter keeps its name)
and owns one key and one value buffer per attention layer, `[batch, kv_heads, max_len, head_dim]`,
written in place at the slots it is given (transformers' `StaticLayer.update`, at explicit
positions). Its forward is what one generation step needs::

    logits = cached(input_ids, attention_mask, position_ids, cache_position)

- `attention_mask` `[batch, max_len]`: 1 where a slot holds a real token (left padding is 0);
- `position_ids` `[batch, seq]`: rotary positions (a left-padded row starts later);
- `cache_position` `[seq]`: the slots this step writes;
- returns the last position's logits, `[batch, 1, vocab]`.

Captured like any model, the in-place cache writes are graph nodes: the planner gives each
cache buffer the placement of the keys/values written into it (split by KV heads with the
attention; whole when K/V are replicated), so every rank stores only its heads.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from autoshard.schema.errors import PlanError


class _SlotLayer:
    """One layer's cache: `update` writes the new keys/values at `slots` and returns the whole
    cache; with `repeat` > 1 each KV head is stored `repeat` times (see `CachedLM`)."""

    is_sliding = False
    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeat: int = 1):
        self.keys, self.values, self.slots, self.repeat = keys, values, None, repeat
        self.is_initialized = True
        self.max_cache_len = keys.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        if self.repeat > 1:
            key_states = key_states.repeat_interleave(self.repeat, dim=1)
            value_states = value_states.repeat_interleave(self.repeat, dim=1)
        self.keys.index_copy_(2, self.slots, key_states)
        self.values.index_copy_(2, self.slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs):
        return self.max_cache_len, 0

    def get_seq_length(self):
        raise PlanError("the sharded cache is addressed by explicit position_ids and cache_position")

    def get_max_cache_shape(self):
        return self.max_cache_len


class _Buffers(nn.Module):
    """Holds the cache tensors (their FQNs: `autoshard_kv_cache.keys_<i>` / `values_<i>`)."""


class CachedLM(nn.Module):
    CACHE = "autoshard_kv_cache"

    def __init__(self, model: nn.Module, batch: int, max_len: int, shapes: list[tuple[tuple, tuple, torch.dtype]] | None = None,
                 kv_repeat: int = 1):
        super().__init__()
        shapes = shapes if shapes is not None else cache_shapes(model, batch, max_len)
        if kv_repeat > 1:
            model = repeated_kv_heads(model, kv_repeat)
            shapes = [(_heads_times(k, kv_repeat), _heads_times(v, kv_repeat), dtype) for k, v, dtype in shapes]
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self._model = [model]   # not a submodule: its children are ours, under the same names
        self.batch, self.max_len, self.kv_repeat = batch, max_len, kv_repeat
        self.shapes = shapes   # (keys, values, dtype) per layer, as stored
        device = next(model.parameters()).device
        cache = _Buffers()
        for i, (k, v, dtype) in enumerate(shapes):
            cache.register_buffer(f"keys_{i}", torch.zeros(k, dtype=dtype, device=device), persistent=False)
            cache.register_buffer(f"values_{i}", torch.zeros(v, dtype=dtype, device=device), persistent=False)
        self.add_module(self.CACHE, cache)
        self.n_layers = len(shapes)
        if kv_repeat > 1:   # each rank stores the one KV head group its query heads read
            from torch.distributed.tensor import Shard

            self.autoshard_state_layouts = {f"{self.CACHE}.{kind}_{i}": Shard(1) for i in range(self.n_layers) for kind in ("keys", "values")}
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def config(self):
        return getattr(self._model[0], "config", None)

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        from transformers.cache_utils import Cache

        cache_mod = getattr(self, self.CACHE)
        layers = [_SlotLayer(getattr(cache_mod, f"keys_{i}"), getattr(cache_mod, f"values_{i}"), self.kv_repeat) for i in range(self.n_layers)]
        for layer in layers:
            layer.slots = cache_position
        cache = Cache(layers=layers)
        mask = step_mask(attention_mask, cache_position, self._dtype())
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self._model[0](input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                             use_cache=True, **extra)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]

    def _dtype(self) -> torch.dtype:
        return next(t.dtype for t in self.parameters() if t.is_floating_point())


def _heads_times(shape: tuple, k: int) -> tuple:
    return (shape[0], shape[1] * k, *shape[2:])


def repeated_kv_heads(model: nn.Module, repeat: int) -> nn.Module:
    """A copy of `model` whose attention expects each KV head `repeat` times in the cache: every
    module's `num_key_value_groups` (how many query heads share a KV head: transformers' eager
    and SDPA paths repeat K/V by it) divided by `repeat`. With tp > KV heads and `repeat` =
    tp / KV heads, the cache has tp heads, and splitting it by heads gives each rank exactly
    the KV head its query heads read (vLLM's replicated KV heads)."""
    model = copy.deepcopy(model)
    found = False
    for mod in model.modules():
        groups = getattr(mod, "num_key_value_groups", None)
        if isinstance(groups, int):
            if groups % repeat:
                raise PlanError(f"{type(mod).__name__}.num_key_value_groups={groups} is not a multiple of {repeat}")
            mod.num_key_value_groups = groups // repeat
            found = True
    if not found:
        raise PlanError(f"{type(model).__name__} has no attention module with num_key_value_groups to repeat KV heads for")
    return model


def step_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask `[batch, 1, seq, max_len]` of one step: a query at slot `p` sees
    the slots `<= p` that hold real tokens (transformers passes a 4-D mask through untouched)."""
    slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    causal = slots[None, :] <= cache_position[:, None]                     # [seq, max_len]
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # [batch, 1, seq, max_len]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def cache_shapes(model: nn.Module, batch: int, max_len: int, device: str = "cpu") -> list[tuple[tuple, tuple, torch.dtype]]:
    """Each attention layer's key and value cache shapes, read off one step of `model` on fake
    tensors of `device` (whatever the heads and head dims are: GQA, MLA's unequal k/v dims).
    The step runs in bfloat16 (the dtype every kernel has, grouped expert matmuls included);
    the cache takes the model's own floating dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.cache_utils import DynamicCache

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, object] = {}
    with mode:
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in memo:
                fake = torch.empty(t.shape, dtype=torch.bfloat16 if t.is_floating_point() else t.dtype, device=device)
                memo[id(t)] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake
    skeleton = copy.deepcopy(model, memo)
    cache = DynamicCache(config=getattr(model, "config", None))
    with mode, torch.no_grad():
        skeleton(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=device), past_key_values=cache, use_cache=True)
    shapes = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.ndim != 4:
            raise PlanError(f"{type(model).__name__} layer {i} caches {type(layer).__name__}, not keys/values "
                            "[batch, heads, seq, dim]; sharded generate supports attention caches only")
        shapes.append(((batch, keys.shape[1], max_len, keys.shape[3]), (batch, values.shape[1], max_len, values.shape[3]), dtype))
    return shapes


def sliding_window_limit(config) -> int | None:
    """The smallest attention window the model uses, if any: the cache here is a full static one,
    so longer generations would attend past it."""
    if config is None:
        return None
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    uses = any("sliding" in str(t) for t in types) or (window is not None and getattr(config, "use_sliding_window", True))
    return int(window) if uses and window else None
