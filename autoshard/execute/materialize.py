"""Models built on `meta`: the buffers no checkpoint holds, computed for real.

A model built on `meta` (to shard a 70B that no rank can hold whole) has every tensor on `meta`.
Its parameters come from a checkpoint (`autoshard.load`), but its *non-persistent* buffers —
rotary `inv_freq`, precomputed `freqs_cis`, masks — are in no checkpoint: `to_empty` leaves
them as whatever memory held (a Llama's logits then differ by 5e-3, silently). They are computed
here, by the model's own code:

- `meta_init()` builds any model with its parameters on `meta` and its buffers on CPU, so the
  buffers are real from the start (as accelerate's `init_empty_weights(include_buffers=False)`);
- for a transformers model built on `meta`, `recompute_buffers` runs transformers' own
  `_init_weights` on a CPU copy of each module owning such a buffer (what `from_pretrained` does
  after loading), and keeps only values it actually wrote.

A buffer neither gives stays unset: the sharded module refuses to run with it (`unset_buffers`).

    >>> with autoshard.meta_init():
    ...     model = Transformer(args)            # parameters on meta, freqs_cis computed
    >>> sharded = autoshard.autoshard(model, mesh, checkpoint="ckpt/")
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook


@contextmanager
def meta_init():
    """Parameters registered inside are moved to `meta` as they are created (one at a time: peak
    memory is the largest parameter); buffers stay where the model's code computed them."""

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            return type(param)(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        yield
    finally:
        handle.remove()


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-persistent buffer by dotted name (the ones `state_dict()` leaves out)."""
    out = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            value = module._buffers.get(name)
            if value is not None:
                out[f"{path}.{name}" if path else name] = value
    return out


def recompute_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU values for the non-persistent buffers of `model` that are on `meta`, by transformers'
    `_init_weights` on a CPU copy of the module owning them; a buffer it does not write is left
    out (the caller refuses to run with it)."""
    init = getattr(model, "_init_weights", None)
    meta = {f: b for f, b in non_persistent_buffers(model).items() if b.is_meta}
    if init is None or not meta:
        return {}
    owners = {f.rpartition(".")[0] for f in meta}
    out: dict[str, torch.Tensor] = {}
    for path in sorted(owners):
        owner = model.get_submodule(path)
        if any(True for _ in owner.parameters()):  # only parameter-free modules (rotary embeddings) are copied
            continue
        twin = copy.deepcopy(owner).to_empty(device="cpu")
        for b in twin.buffers():
            if b.is_floating_point():
                b.fill_(float("nan"))   # what `_init_weights` leaves untouched stays NaN: not taken
        with torch.no_grad():
            init(twin)
        for name, b in twin.named_buffers():
            fqn = f"{path}.{name}" if path else name
            if fqn in meta and b.is_floating_point() and not b.isnan().any():
                out[fqn] = b
    return out


def unset_message(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"buffer {shown} holds no value: it is non-persistent (no checkpoint has it) and was built on meta, "
            "and autoshard cannot compute it. Build the model under `autoshard.meta_init()` (parameters on meta, "
            "buffers computed on CPU), or on CPU, before autoshard()")
