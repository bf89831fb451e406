"""Rank-side helpers shared by the multi-rank tests: build tiny models, compare with the unsharded
model, count collectives."""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

ATOL = 2e-5


def tp_mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))


def tiny_model(name: str, seed: int = 0, **overrides):
    from autoshard.configs import build_model, load_config

    cfg = load_config(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return build_model(cfg, seed=seed).train()


def inputs(vocab: int, batch: int, seq: int, seed: int = 1, labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if labels:
        out["labels"] = torch.randint(0, vocab, (batch, seq), generator=g)
    return out


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def comm_counts(fn) -> tuple[dict[str, int], object]:
    mode = CommDebugMode()
    with mode:
        result = fn()
    counts = {str(k).split(".")[-1].replace("_into_tensor", "").replace("_tensor", ""): v for k, v in mode.get_comm_counts().items()}
    return counts, result


def max_grad_diff(sharded, ref) -> tuple[float, list[str]]:
    worst, missing = 0.0, []
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        r = ref_params[name]
        if p.grad is None or r.grad is None:
            if (p.grad is None) != (r.grad is None):
                missing.append(name)
            continue
        worst = max(worst, (full(p.grad) - r.grad).abs().max().item())
    return worst, missing


def run_and_compare(sharded, ref, kwargs: dict) -> dict:
    """Forward both models, compare logits (and loss), backward, compare every gradient."""
    out = sharded(**kwargs)
    expect = ref(**kwargs)
    logits = full(out.logits)
    res = {"logits_diff": (logits - expect.logits).abs().max().item()}
    if "labels" in kwargs:
        res["loss_diff"] = abs(full(out.loss).item() - expect.loss.item())
        full(out.loss).backward()
        expect.loss.backward()
    else:
        logits.float().pow(2).mean().backward()
        expect.logits.float().pow(2).mean().backward()
    res["grad_diff"], res["grad_missing"] = max_grad_diff(sharded, ref)
    return res


def shard_and_copy(model, **autoshard_kwargs):
    import autoshard

    ref = copy.deepcopy(model)
    sharded = autoshard.autoshard(model, tp_mesh(), **autoshard_kwargs)
    return sharded, ref


def comm_bytes(fn) -> tuple[dict[str, dict[str, int]], object]:
    """Run `fn` and measure its collectives as NCCL counts them: {kind: {"count", "bytes"}} with
    S = the full logical tensor (an all-gather's output, a reduce-scatter's input, an
    all-reduce's buffer). `CommDebugMode` counts calls; this subclass also weighs them."""
    import torch.utils._pytree as pytree

    class _Weigh(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.weighed: dict[str, dict[str, int]] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = sum(self.comm_counts.values())
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if out is not NotImplemented and sum(self.comm_counts.values()) > before:
                name = str(func._overloadpacket).split(".")[-1]
                kind = next(k for k in ("all_gather", "reduce_scatter", "all_reduce", "allreduce", "all_to_all", "alltoall", "broadcast")
                            if k in name)
                tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                nbytes = tensors[0].numel() * tensors[0].element_size() if "all_gather" not in kind else 0
                if kind == "all_gather":
                    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                    nbytes = outs[0].numel() * outs[0].element_size()
                kind = {"allreduce": "all_reduce", "alltoall": "all_to_all"}.get(kind, kind)   # c10d's own ops
                entry = self.weighed.setdefault(kind, {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += nbytes
            return out

    mode = _Weigh()
    with mode:
        result = fn()
    return mode.weighed, result
