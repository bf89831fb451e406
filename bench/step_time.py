"""Predicted vs measured training-step time on this machine's calibrated gloo profile (issue 3).

    python -m bench.step_time [--quick]      # writes bench/results/step_time.md

1. `autoshard calibrate` measures gloo collectives (alpha, bus bandwidth per kind) and matmul /
   memory rates over 2 ranks and writes a profile;
2. for each model below, 2 gloo ranks plan with that profile (`hardware=`), then time a full
   training step (forward, backward, AdamW step) — median of many after warm-up;
3. the table compares `plan.estimate["time_s"]` with the median, split into compute and
   communication as the model splits it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = [  # (config, overrides, batch, seq)
    ("tiny-llama", {}, 2, 64),
    ("tiny-llama", {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 4}, 2, 256),
    ("tiny-llama", {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 8}, 2, 256),
]


def _rank(rank: int, ws: int, port: int, profile_path: str, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard
    from autoshard.configs import build_model, load_config

    torch.set_num_threads(max(1, (os.cpu_count() or ws) // ws))  # as calibrate measured
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    rows = []
    for name, overrides, batch, seq in MODELS:
        cfg = load_config(name)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        model = build_model(cfg, seed=0).train()
        g = torch.Generator().manual_seed(0)
        kw = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}
        kw["labels"] = kw["input_ids"].clone()
        sharded = autoshard.autoshard(model, mesh, example_inputs=kw, hardware=profile_path)
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-4)
        times, opt_times = [], []
        for i in range(steps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            loss = sharded(**kw).loss
            loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
            loss.backward()
            dist.barrier()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            dist.barrier()
            if i >= 3:
                times.append(t1 - t0)
                opt_times.append(time.perf_counter() - t1)
        est = sharded.plan.estimate["time_s"]
        rows.append({"model": f"{name} h={cfg.hidden_size} L={cfg.num_hidden_layers}", "batch": batch, "seq": seq,
                     "stream": sharded.plan.stream, "measured_s": statistics.median(times), "optimizer_s": statistics.median(opt_times),
                     "predicted": est})
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/step_time.md")
    args = ap.parse_args()
    profile = Path(tempfile.mkdtemp()) / "profile.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoshard", "calibrate", "--out", str(profile)] + (["--quick"] if args.quick else []),
                   check=True, stdout=subprocess.DEVNULL)
    calibrate_s = time.perf_counter() - t0
    from bench.train_step import spawn_ranks

    rows = spawn_ranks(_rank, str(profile), args.steps)
    lines = ["# Predicted vs measured training-step time (gloo, world size 2)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
             f"load average before the run {os.getloadavg()[0]:.2f}; calibrated in {calibrate_s:.0f} s "
             f"({'quick' if args.quick else 'full'} calibration).", "",
             "Step = forward + backward (what `plan.estimate` prices); the AdamW step is timed apart.", "",
             "| model | batch x seq | stream | predicted (compute + comm) | measured median | error | AdamW step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        err = (p["total"] - r["measured_s"]) / r["measured_s"]
        lines.append(f"| {r['model']} | {r['batch']}x{r['seq']} | {r['stream']} | {p['total'] * 1e3:.1f} ms "
                     f"({p['compute'] * 1e3:.1f} + {p['communication'] * 1e3:.1f}) | {r['measured_s'] * 1e3:.1f} ms | {err:+.0%} | {r['optimizer_s'] * 1e3:.1f} ms |")
    prof = json.loads(profile.read_text())
    lines += ["", f"DTensor dispatch per op (calibrated): {prof['dispatch_overhead_s'] * 1e6:.0f} us forward, "
              f"{(prof.get('dispatch_backward_s') or prof['dispatch_overhead_s']) * 1e6:.0f} us backward; "
              f"all_reduce alpha {prof['intra_node']['per_kind']['all_reduce'][0] * 1e6:.0f} us.",
              "", "The profile: " + prof.get("notes", "")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
