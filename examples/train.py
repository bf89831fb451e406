"""Train a bundled tiny decoder with tensor + data parallelism: autoshard on "tp", FSDP2 on "dp".

    torchrun --nproc-per-node 4 examples/train.py                  # CPU: gloo, mesh dp=2 x tp=2
    torchrun --nproc-per-node 8 examples/train.py --tp 4           # GPUs: NCCL, the same script
    torchrun --nproc-per-node 4 examples/train.py --bf16 --checkpoint /tmp/ckpt

The data is a learnable synthetic task (arithmetic progressions of token ids: each token follows
from the two before it), so the printed loss falls within a few dozen steps. Each data-parallel
rank trains on its slice of every global batch; the printed loss is the global batch's.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import autoshard
from autoshard.configs import build_model, load_config


def progressions(vocab: int, batch: int, seq: int, seed: int):
    """Endless batches of `start + stride * t (mod vocab)` sequences, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        yield (start + stride * torch.arange(seq)) % vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-llama", help="bundled config name or a config.json path")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size; the rest of the world is dp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over dp)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 master weights")
    ap.add_argument("--checkpoint", help="save a DCP checkpoint of the model here at the end")
    args = ap.parse_args()
    # torch warns that clipping a 2-D mesh's grad norm takes two all-reduces; that is expected here.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.tp:
        raise SystemExit(f"world size {world} is not a multiple of --tp {args.tp}")
    # init_device_mesh starts the process group: gloo on CPU, NCCL on CUDA.
    mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    if args.batch % dp:
        raise SystemExit(f"--batch {args.batch} is not a multiple of the data-parallel size {dp}")
    local = args.batch // dp
    rank0 = dist.get_rank() == 0

    model = build_model(load_config(args.config), device=device, seed=0).train()
    data = progressions(model.config.vocab_size, args.batch, args.seq, seed=0)

    def my_slice(ids: torch.Tensor) -> torch.Tensor:
        return ids[dp_rank * local:(dp_rank + 1) * local].to(device)

    example = my_slice(next(data))
    fsdp = {}
    if args.bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fsdp["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    t0 = time.perf_counter()
    sharded = autoshard.autoshard(model, mesh, example_inputs={"input_ids": example, "labels": example}, fsdp=fsdp)
    if rank0:
        print(f"autoshard: {type(model).__name__} on mesh dp={dp} x tp={args.tp} ({device}) in {time.perf_counter() - t0:.1f} s", flush=True)
    opt = torch.optim.AdamW(sharded.parameters(), lr=args.lr, weight_decay=0.0)

    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = my_slice(next(data))
        loss = sharded(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad()
        # the global batch's loss: the mean of the data-parallel ranks' means (equal token counts)
        report = (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().float().clone()
        dist.all_reduce(report, group=mesh["dp"].get_group())
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if rank0:
            ms = (time.perf_counter() - t0) * 1e3
            print(f"step {step:3d}  loss {report.item() / dp:.4f}  grad-norm {norm.item():.3f}  {ms:.0f} ms", flush=True)

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded.state_dict(), checkpoint_id=args.checkpoint)
        if rank0:
            print(f"saved {args.checkpoint}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
