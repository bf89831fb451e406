"""`autoshard.init_weights(sharded, model)`: a model built on `meta`, initialised in its shards.

Training from scratch without ever holding the model whole: the model's own initialisers run on
each module's parameters, made whole on CPU just before (one module at a time: peak memory is
the largest module's own parameters), and each rank keeps its shard of the result. Every rank
draws the same numbers from the same seed, so replicated parameters are identical on all ranks
and every parameter equals what the unsharded model's own init gives under that seed
(transformers: `model.initialize_weights()`; other models: each module's `reset_parameters()`).

Modules are visited children first, as transformers' `initialize_weights` does (a sub-model
dispatching to its own `_init_weights`); a tied weight stays whole until the end, so an
initialiser that writes it twice (embedding, then LM head) leaves the value it leaves unsharded.

    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(config)
    >>> sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    >>> torch.manual_seed(0)
    >>> autoshard.init_weights(sharded, model)
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from autoshard.schema.errors import PlanError
from autoshard.schema.fused_parts import shard_tensor

Init = Callable[[nn.Module], None]


def init_weights(sharded: nn.Module, model: nn.Module, *, init: Init | None = None, device=None) -> nn.Module:
    """Initialise `sharded`'s parameters with `model`'s initialisers (`model`: the module
    `sharded` was made from, on meta or not; it is left as it was). `init(module)` overrides the
    per-module initialiser. Returns `sharded`."""
    if any(t.is_meta for t in sharded.parameters()):
        mesh = getattr(sharded, "device_mesh", None)
        sharded.to_empty(device=device or (mesh.device_type if mesh is not None else "cpu"))
    _refuse_meta_buffers(sharded)
    targets = dict(sharded.named_parameters(remove_duplicate=False))
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    whole: dict[int, nn.Parameter] = {}
    written: set[int] = set()

    def visit(module: nn.Module, path: str, fn: Init) -> None:
        for name, child in module.named_children():
            visit(child, f"{path}{name}.", _initialiser(child, init) or fn)
        originals = {}
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in whole:   # NaN until an initialiser writes it: what none writes is refused
                    empty = torch.full(p.shape, float("nan"), dtype=p.dtype) if p.is_floating_point() else torch.zeros(p.shape, dtype=p.dtype)
                    whole[id(p)] = nn.Parameter(empty, requires_grad=p.requires_grad)
                originals[name] = p
                module._parameters[name] = whole[id(p)]
        try:
            with torch.no_grad():
                fn(module)
        finally:
            for name, p in originals.items():
                module._parameters[name] = p
        for name, p in originals.items():
            _keep_shard(whole[id(p)], targets[f"{path}{name}"])
            if not (whole[id(p)].is_floating_point() and whole[id(p)].isnan().any()):
                written.add(id(p))
            if counts[id(p)] == 1:
                del whole[id(p)]   # not tied: written once, freed now

    visit(model, "", _initialiser(model, init) or _reset)
    missing = [f for f, p in model.named_parameters() if id(p) not in written]
    if missing:
        raise PlanError(f"init_weights: no initialiser wrote all of {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}; pass init=fn(module) that initialises it")
    return sharded


def _initialiser(module: nn.Module, init: Init | None) -> Init | None:
    if init is not None:
        return init
    own = getattr(module, "_init_weights", None)   # a transformers (sub-)model: its own init
    return own if callable(own) and hasattr(module, "config") else None


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _keep_shard(value: torch.Tensor, target: torch.Tensor) -> None:
    """This rank's shard of `value` into `target` (no communication: every rank holds `value`)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            local = shard_tensor(value.detach().to(target.device_mesh.device_type), target.device_mesh,
                                 target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(value)


def _refuse_meta_buffers(sharded: nn.Module) -> None:
    unset = sorted(getattr(sharded, "unset_buffers", ()))
    if unset:
        raise PlanError(f"init_weights: buffer {', '.join(unset[:4])} holds no value (built on meta, in no checkpoint); "
                        "build the model under autoshard.meta_init()")
