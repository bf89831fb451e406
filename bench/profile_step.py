"""Where a training step's time goes: a torch.profiler breakdown per variant (issue 5).

    python -m bench.profile_step [--steps 3]     # writes bench/results/train_step_profile.md

Same model, inputs and 2 gloo ranks as `bench.train_step`. For each variant it warms up, then
profiles `--steps` full training steps (forward, backward, AdamW) on rank 0 and groups the
self-CPU time into matmuls, waiting on collectives, attention and everything else, so the table
says what compiling can and cannot speed up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.train_step import BATCH, SEQ, CONFIG, _build, _ids, _loss, _machine, spawn_ranks

VARIANTS = ["hand eager", "hand compiled", "autoshard eager", "autoshard lowered", "autoshard compiled"]
GROUPS = {  # profiler op name prefix -> group (first match wins)
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
    "_c10d_functional::wait_tensor": "collectives (wait)", "c10d::": "collectives (wait)",
    "aten::_scaled_dot_product": "attention", "## Call CompiledFxGraph": "inductor kernels (fused)",
}


def _group(name: str) -> str:
    return next((g for prefix, g in GROUPS.items() if name.startswith(prefix)), "other ops + Python")


def _rank(rank: int, ws: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(max(1, (os.cpu_count() or ws) // ws))
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    rows = {}
    for variant in args.variants:
        run, params_of, ctx, finalize = _build(variant, mesh, "inductor", [])
        opt = torch.optim.AdamW(params_of.parameters(), lr=1e-4)
        kw = _ids(params_of.config.vocab_size, BATCH, SEQ)

        def step():
            with ctx():
                _loss(run(**kw)).backward()
            finalize()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        dist.barrier()
        groups: dict[str, float] = {}
        for e in prof.key_averages():
            groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + e.self_cpu_time_total / 1e3 / args.steps
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        rows[variant] = {"groups": groups, "top": [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps) for e in top]}
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: dict, machine: str, steps: int) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG[1].items())
    names = ["matmul", "collectives (wait)", "attention", "inductor kernels (fused)", "other ops + Python"]
    lines = ["# Where the training step's time goes (rank 0 of 2 gloo ranks, torch.profiler)", "",
             f"Model: {CONFIG[0]} with {cfg}; batch {BATCH} x seq {SEQ}, fp32. Self-CPU ms per step, "
             f"mean of {steps} profiled steps after 3 warm-up. Machine: {machine}", "",
             "| variant | " + " | ".join(names) + " | total |", "|---" * (len(names) + 2) + "|"]
    for v, r in rows.items():
        g = r["groups"]
        lines.append(f"| {v} | " + " | ".join(f"{g.get(n, 0):.1f}" for n in names) + f" | {sum(g.values()):.1f} |")
    lines += ["", "Top ops by self-CPU time (ms per step, calls per step):", ""]
    for v, r in rows.items():
        lines.append(f"- {v}: " + "; ".join(f"`{k[:48]}` {ms:.1f} ({n})" for k, ms, n in r["top"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--out", default="bench/results/train_step_profile.md")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    machine = _machine()
    text = report(spawn_ranks(_rank, args), machine, args.steps)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
