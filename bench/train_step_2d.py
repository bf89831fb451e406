"""The dp 2 x tp 2 training step: autoshard (FSDP2 stages, eager and compiled) against the
hand-written TP+SP plan under FSDP2 (torchtitan's recipe), in one run.

    python -m bench.train_step_2d [--steps 8] [--backend inductor]   # writes bench/results/train_step_2d.md

4 gloo ranks (spawned; on this 2-core machine they share the cores, so only ratios within the
run mean anything), mesh ("dp", "tp") = (2, 2), the same model and per-dp-rank batches:
  1. hand eager     `apply_hand_plan` on "tp" (SP + loss parallel), `fully_shard` per decoder layer
                    and root on "dp";
  2. hand compiled  the same with each decoder block `torch.compile`d before `fully_shard`
                    (torchtitan's apply_compile then apply_fsdp);
  3. autoshard eager     `autoshard(model, mesh)`: TP on "tp", FSDP2 stages on "dp";
  4. autoshard compiled  `autoshard(model, mesh, compile=...)`: each stage's lowered slice compiled.
A step is forward, backward and AdamW (median after warm-up, barriers around each).
"""

from __future__ import annotations

import argparse
import os
import platform
import traceback
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from autoshard.distributed.mesh import free_port
from bench.train_step import CONFIG, _ids, _loss, _model, _time_steps, _why

BATCH, SEQ = 2, 128
VARIANTS = ["hand eager", "hand compiled", "autoshard eager", "autoshard compiled"]
# a failed collective on one rank leaves the others waiting: give up after this long, not gloo's 30 min
GLOO_TIMEOUT_S = 300


def _build(variant: str, mesh, backend: str):
    import autoshard
    from torch.distributed.fsdp import fully_shard

    from autoshard.testing.hand_plan import apply_hand_plan, finalize_grads, hand_plan_context

    model = _model()
    if variant.startswith("hand"):
        apply_hand_plan(model, mesh["tp"], sequence_parallel=True, loss_parallel=True)
        layers = model.model.layers
        for i, block in enumerate(layers):
            if variant == "hand compiled":
                block = torch.compile(block, backend=backend, dynamic=True)
                layers[i] = block
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model, (lambda: hand_plan_context(model)), (lambda: finalize_grads(model)), ""
    kw = _ids(model.config.vocab_size, BATCH, SEQ)
    sharded = autoshard.autoshard(model, mesh, example_inputs=kw,
                                  compile={"backend": backend} if variant == "autoshard compiled" else False)
    import contextlib

    return sharded, contextlib.nullcontext, (lambda: 0), sharded.execution.kind


def _variant(variant: str, mesh, args) -> dict:
    run, ctx, finalize, kind = _build(variant, mesh, args.backend)
    opt = torch.optim.AdamW(run.parameters(), lr=1e-4)
    kw = _ids(run.config.vocab_size, BATCH, SEQ + mesh["dp"].get_local_rank())  # each dp rank its own batch
    losses = []

    def step():
        with ctx():
            loss = _loss(run(**kw))
            loss.backward()
        finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    median, first = _time_steps(step, args.steps, args.warmup)
    return {"variant": variant, "kind": kind, "median": median, "first": first, "loss0": losses[0]}


def _rank(rank: int, ws: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=ws, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    rows = []
    for v in args.variants:
        try:
            rows.append(_variant(v, mesh, args))
        except Exception as e:  # noqa: BLE001 - a failed variant is a row of the report
            rows.append({"variant": v, "failed": _why(e), "trace": traceback.format_exc()[-1500:]})
            dist.barrier()
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: list[dict], args) -> str:
    hand = {r["variant"]: r for r in rows if r["variant"].startswith("hand") and "median" in r}
    lines = ["# Training step on dp 2 x tp 2: autoshard vs the hand-written TP+SP plan under FSDP2 (gloo, world size 4)", "",
             f"Model: {CONFIG[0]} with " + ", ".join(f"{k}={v}" for k, v in CONFIG[1].items()) +
             f"; per dp rank batch {BATCH} x seq {SEQ} (+ dp rank), fp32, labels (loss parallel in both). Backend "
             f"{args.backend}. Median of {args.steps} steps after {args.warmup} warm-up. {os.cpu_count()} CPU cores "
             f"shared by the 4 ranks ({platform.processor() or platform.machine()}, torch {torch.__version__}): "
             "absolute times are slow, ratios in the same run are what this measures.", "",
             "| variant | runs as | step (median) | vs hand, same mode | first step (compile) | loss, step 1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed']} | - | - | - | - |")
            continue
        mode = "compiled" if "compiled" in r["variant"] else "eager"
        ref = hand.get(f"hand {mode}")
        ratio = f"{r['median'] / ref['median']:.2f}x" if ref else "-"
        lines.append(f"| {r['variant']} | {r['kind'] or 'DTensor + FSDP2'} | {r['median'] * 1e3:.0f} ms | {ratio} | "
                     f"{r['first']:.1f} s | {r['loss0']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step_2d.md"))
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 4, port, args, q)) for r in range(4)]
    for p in procs:
        p.start()
    rows = q.get()
    for p in procs:
        p.join()
    text = report(rows, args)
    Path(args.out).write_text(text)
    print(text)
    for r in rows:
        if "trace" in r:
            print(r["variant"], r["trace"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
