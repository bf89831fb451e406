"""Find a model's stack of identical layers, and build a copy that keeps only the first few.

A decoder is a prefix (embedding, rotary tables, mask), `N` decoder layers that differ only in
their index, and a suffix (final norm, LM head, loss). Planning one of those layers plans them
all, so `truncated(model, stack, k)` gives a model with `k` layers (sharing the original's
modules, never copying or mutating a parameter) whose capture costs `k` layers instead of `N`.

"Identical" is checked, not assumed: every layer must have the same module tree, the same
parameter/buffer names, shapes and dtypes, and the same plain attributes (e.g. an
`attention_type` of "sliding_attention" on some layers makes them different), and the same
entries of config lists with one entry per layer (`layer_types`). Layers may also repeat in
groups (gpt-oss: sliding, full, sliding, full...): then a unit of `period` layers repeats.

    stack = find_layer_stack(model)        # LayerStack(path="model.layers", count=80, ...)
    small = truncated(model, stack, 3)     # same model, 3 layers, config.num_hidden_layers == 3
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

# attributes that name a layer's position, not its computation (used for KV-cache indexing)
_INDEX_ATTRS = {"layer_idx", "layer_id", "layer_index", "layer_number", "idx"}
_PLAIN = (int, float, bool, str, type(None))


MAX_PREFIX = 8   # distinct leading layers allowed before the identical run (DeepSeek-V3's 3 dense layers)
MAX_PERIOD = 8   # layers of a repeating group (gpt-oss alternates sliding and full attention: 2; Gemma 3: 6)


@dataclass(frozen=True)
class LayerStack:
    """The `nn.ModuleList` at `path` of `count` layers, identical from layer `start` to the end
    (the `start` layers before may differ: DeepSeek-V3's dense layers before its MoE ones), or,
    with `period` p > 1, repeating in groups of p layers from the first (layer i like layer i - p)."""

    path: str
    count: int
    params_per_layer: int
    start: int = 0
    period: int = 1

    @property
    def repeating(self) -> int:
        """Repeating units: layers, or groups of `period` layers."""
        return (self.count - self.start) // self.period

    def keep(self, units: int) -> int:
        """Layers a truncation to `units` repeating units (after the distinct leading layers) keeps."""
        return self.start + units * self.period


def layer_signature(layer: nn.Module) -> tuple:
    """Everything about a layer that can change the graph it traces, except its index."""
    sig = []
    for name, mod in layer.named_modules():
        attrs = tuple(
            sorted(
                (k, _plain(v))
                for k, v in vars(mod).items()
                if not k.startswith("_") and k not in _INDEX_ATTRS and _plain(v) is not _SKIP
            )
        )
        hooks = (len(mod._forward_hooks), len(mod._forward_pre_hooks))
        sig.append((name, type(mod).__qualname__, attrs, hooks))
    for name, p in layer.named_parameters(recurse=True):
        sig.append((name, tuple(p.shape), str(p.dtype), p.requires_grad))
    for name, b in layer.named_buffers(recurse=True):
        sig.append((name, tuple(b.shape), str(b.dtype)))
    return tuple(sig)


_SKIP = object()


def _plain(v):
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return tuple(v)
    return _SKIP


def find_layer_stack(model: nn.Module, min_count: int = 2) -> tuple[LayerStack | None, str]:
    """The largest `nn.ModuleList` of layers identical from some layer to the end (at most
    `MAX_PREFIX` distinct layers first, and fewer than the identical ones), or (None, why)."""
    best: LayerStack | None = None
    why = "no nn.ModuleList of layers"
    biggest, biggest_size = None, -1   # the decoder layers: the list holding the most parameters
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < min_count:
            continue
        total = sum(p.numel() for p in mod.parameters())
        if total > biggest_size:
            biggest, biggest_size = path, total
        config = getattr(model, "config", None)
        sigs = [(layer_signature(layer), _config_entries(config, i, len(mod))) for i, layer in enumerate(mod)]
        start = len(sigs) - 1
        while start > 0 and sigs[start - 1] == sigs[-1]:
            start -= 1
        period = 1
        if start and (start > MAX_PREFIX or len(sigs) - start < max(min_count, start + 1)):
            period = _period(sigs, min_count)
            if period is None:
                differ = next(i for i, sig in enumerate(sigs) if sig != sigs[0])
                why = f"{path}.{differ} differs from {path}.0 " + (
                    "in structure" if sigs[differ][0] != sigs[0][0] else f"in per-layer config ({_differing(sigs[0][1], sigs[differ][1])})")
                continue
            start = 0
        size = sum(p.numel() for layer in mod[len(mod) - period:] for p in layer.parameters()) // period
        if best is None or size * (len(mod) - start) > best.params_per_layer * (best.count - best.start):
            best = LayerStack(path, len(mod), size, start, period)
    if best is not None and best.path != biggest:
        # a smaller list (one layer's experts) is no stand-in for the layers that do not repeat
        return None, why
    return best, "" if best else why


def _period(sigs: list, min_units: int) -> int | None:
    """The smallest p > 1 with every layer like the one p before (the count a multiple of p, at
    least `min_units` groups), or None."""
    for p in range(2, MAX_PERIOD + 1):
        if len(sigs) % p == 0 and len(sigs) // p >= min_units and all(sigs[i] == sigs[i - p] for i in range(p, len(sigs))):
            return p
    return None


def _config_entries(config, i: int, n: int) -> tuple:
    """Layer i's entries of the config lists with one entry per layer (`layer_types`): part of
    what the layer computes, so they must repeat as the layers do."""
    if config is None or n < 2:
        return ()
    return tuple((k, str(v[i])) for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == n)


def _differing(a: tuple, b: tuple) -> str:
    return ", ".join(f"config.{k}: {x} vs {y}" for (k, x), (_, y) in zip(a, b) if x != y)


def truncated(model: nn.Module, stack: LayerStack, keep: int) -> nn.Module:
    """`model` with only the first `keep` layers of `stack` (the distinct leading ones
    included), sharing every other module.

    Modules on the path from the root to the layer list are shallow copies (their own
    `_modules` dicts), so the original is untouched; the config those modules hold is a copy with
    `num_hidden_layers = keep` and per-layer lists cut to `keep` entries.
    """
    if not 0 < keep <= stack.count:
        raise ValueError(f"keep must be in 1..{stack.count}, got {keep}")
    config = getattr(model, "config", None)
    small_config = _truncated_config(config, stack, keep) if config is not None else None

    def shallow(mod: nn.Module) -> nn.Module:
        out = copy.copy(mod)
        out._modules = dict(mod._modules)
        if small_config is not None and getattr(mod, "config", None) is config:
            out.config = small_config
        return out

    root = shallow(model)
    parent = root
    *ancestors, leaf = stack.path.split(".")
    for name in ancestors:
        child = shallow(parent._modules[name])
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = nn.ModuleList(list(parent._modules[leaf])[:keep])
    return root


def _truncated_config(config, stack: LayerStack, keep: int):
    small = copy.copy(config)
    small.__dict__ = dict(config.__dict__)
    for key, value in list(vars(small).items()):
        if isinstance(value, (list, tuple)) and len(value) == stack.count:
            setattr(small, key, type(value)(value[:keep]))
    if hasattr(small, "num_hidden_layers"):
        small.num_hidden_layers = keep
    return small
