"""`python -m autoshard demo`: shard a bundled tiny Llama over CPU gloo ranks and show the plan.

Spawns `world_size` processes on 127.0.0.1, builds the same random-weight model on each, shards
it with `autoshard`, prints the plan report and the collectives one training step runs, and
checks logits, loss and every gradient against the unsharded model.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world_size: int, port: int, config: str, seq: int, html: str | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _demo(rank, world_size, config, seq, html)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _demo(rank: int, world_size: int, config: str, seq: int, html: str | None = None) -> None:
    import logging

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    import autoshard
    from autoshard.configs import build_model, load_config

    say = print if rank == 0 else (lambda *a, **k: None)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = build_model(load_config(config), seed=0).train()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, model.config.vocab_size, (2, seq), generator=g),
        "labels": torch.randint(0, model.config.vocab_size, (2, seq), generator=g),
    }
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    say(sharded.plan.report())
    if html and rank == 0:
        sharded.plan.to_html(html)
        say(f"plan page written to {html}")

    forward, backward = CommDebugMode(), CommDebugMode()
    with warnings.catch_warnings():  # CommDebugMode's module hooks cannot see into a ModelOutput: harmless
        warnings.filterwarnings("ignore", message="For backward hooks to be called")
        with forward:
            out = sharded(**batch)
        with backward:
            out.loss.backward()
    ref = reference(**batch)
    ref.loss.backward()

    def counts(mode):
        return {str(k).split(".")[-1]: v for k, v in sorted(mode.get_comm_counts().items(), key=str)}

    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    ref_params = dict(reference.named_parameters())
    grad_err = max((full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in sharded.named_parameters())
    say(f"\ncollectives, forward:  {counts(forward)}")
    say(f"collectives, backward: {counts(backward)}")
    say(f"loss   sharded {full(out.loss).item():.6f}  unsharded {ref.loss.item():.6f}")
    say(f"logits max |diff| {(full(out.logits) - ref.logits).abs().max().item():.2e}")
    say(f"grads  max |diff| {grad_err:.2e} over {sum(1 for _ in sharded.parameters())} parameters")
    ok = grad_err < 1e-4 and abs(full(out.loss).item() - ref.loss.item()) < 1e-4
    say("numerics match the unsharded model" if ok else "NUMERICS MISMATCH")
    if not ok:
        raise SystemExit(1)


def run_demo(world_size: int = 2, config: str = "tiny-llama", seq: int = 7, html: str | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world_size, port, config, seq, html), nprocs=world_size, start_method="spawn")
