"""How long `autoshard plan` takes for Llama-3.1 8B / 70B / 405B on this machine (issue 6).

    python -m bench.plan_speed [--repeats 3] [--tree DIR]   # writes bench/results/plan_speed.md

Each run is a fresh Python process (imports are part of what a user waits for, and nothing is
cached between models) doing what `autoshard plan --config NAME --mesh tp=8 --hardware h100
--seq 8192` does: build the model on `meta`, plan it on a fake process group of 8 ranks with
`plan_layers_once` (4 layers captured, the plan grown to all), render the summary. The table
gives the median of `--repeats` runs of each phase:

  import   `import torch`, autoshard and the model's transformers module
  build    the model on meta from the bundled config
  capture  torch.export of the 4-layer truncation          analyse  networkx view of the graph
  label    DTensor propagation over the candidate regions  cost     pricing every strategy (choose)
  solve    the exact solver (choose)                        choose*  the rest of choose (assembly, estimate)
  expand   the plan grown to all layers                     estimate the cost model's numbers scaled to all layers
  report   the printed summary

`--tree DIR` times another checkout (e.g. a `git worktree` of an older commit) for a before/after.
For reference, meta-pytorch/autoparallel reports ~30-50 s to plan Llama-3-8B (on a GPU host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"]
TP, SEQ, HARDWARE = 8, 8192, "h100"
PHASES = ["import", "build", "capture", "analyse", "label", "cost", "solve", "choose*", "expand", "estimate", "report"]
ROOT = Path(__file__).resolve().parent.parent


def one(config: str) -> dict:
    """Plan `config` in this (fresh) process; seconds per phase."""
    import gc

    gc.disable()  # as `autoshard plan` does (autoshard/__main__.py: a short-lived process)
    t0, c0 = time.perf_counter(), time.process_time()
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autoshard.configs import build_model, load_config

    try:
        from autoshard.cost import get_profile
        from autoshard.scale import plan_layers_once
        from autoshard.scale.summary import render_summary
    except ImportError:  # a checkout from before the packages (--tree of an older commit)
        from autoshard.cost_models import get_profile
        from autoshard.planning import plan_layers_once
        from autoshard.planning.summary import render_summary
    cfg = load_config(config)
    import transformers

    getattr(transformers, cfg.architectures[0])  # the model's module: an import, not the build
    out = {"import": time.perf_counter() - t0}
    c1 = time.process_time()
    t = time.perf_counter()
    model = build_model(cfg, device="meta", dtype="auto")
    out["build"] = time.perf_counter() - t
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    profile = get_profile(HARDWARE)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP)
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    result = plan_layers_once(model, mesh, {"input_ids": ids, "labels": ids}, hardware=profile)
    timings = dict(result.timings)
    solver = (result.plan.estimate or {}).get("solver", {})
    out.update({k: timings.get(k, 0.0) for k in ("capture", "analyse", "label", "expand", "estimate")})
    # an older checkout scaled the estimate by extrapolating every number, these timings included
    split = "planned_layers" in solver
    out["cost"] = solver.get("pricing_seconds", 0.0) if split else float("nan")
    out["solve"] = solver.get("seconds", 0.0) if split else float("nan")
    out["choose*"] = timings.get("choose", 0.0) - (out["cost"] + out["solve"] if split else 0.0)
    t = time.perf_counter()
    render_summary(result, model, profile, batch=1, seq=SEQ, training=True)
    out["report"] = time.perf_counter() - t
    out["total"] = time.perf_counter() - t0
    out["planning"] = out["total"] - out["import"]
    # CPU seconds of this process: what the work costs, whatever else shares the CPUs
    out["import_cpu"] = c1 - c0
    out["planning_cpu"] = time.process_time() - c1
    out["layers"] = f"{result.captured_layers} of {result.stack.count}" if result.captured_layers else f"all ({result.fallback})"
    est = result.plan.estimate or {}
    out["step_ms"] = est.get("time_s", {}).get("total", 0.0) * 1e3
    out["memory_gib"] = est.get("memory_bytes", {}).get("total", 0) / 2**30
    dist.destroy_process_group()
    gc.freeze()  # as the CLI does at exit: teardown does not walk the planning objects again
    return out


def run(config: str, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_speed.py"), "--one", config], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process"] = wall  # interpreter start and exit included
    # what a user waits for: the command itself, start to exit
    cmd = [sys.executable, "-m", "autoshard", "plan", "--config", config, "--mesh", f"tp={TP}", "--hardware", HARDWARE,
           "--seq", str(SEQ), "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=tree, capture_output=True, check=True)
    out["cli"] = time.perf_counter() - t
    return out


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    import torch
    import transformers

    return [f"- CPU: {cpu}, `nproc` = {len(os.sched_getaffinity(0))}", f"- RAM: {mem / 2**20:.1f} GiB",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"]


def load() -> str:
    """1, 5 and 15 minute load averages: above `nproc`, other jobs shared the CPUs."""
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout to time (default: this one)")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: print only)")
    args = p.parse_args(argv)
    if args.one:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print(json.dumps(one(args.one)))
        return 0
    rows = []
    load_before = load()
    for config in args.models:
        runs = [run(config, args.tree) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
        med["layers"] = runs[0]["layers"]
        med["spread"] = (min(r["planning"] for r in runs), max(r["planning"] for r in runs))
        rows.append((config, med))
        print(f"{config}: planning {med['planning']:.2f} s (min {med['spread'][0]:.2f}, max {med['spread'][1]:.2f}; "
              f"CPU {med['planning_cpu']:.2f} s), imports {med['import']:.2f} s, process {med['process']:.2f} s, "
              f"`autoshard plan` {med['cli']:.2f} s", flush=True)
    table = render(rows, args.repeats, load_before, load())
    print(table)
    if args.out:
        head = [f"# `autoshard plan` speed: Llama-3.1 at tp={TP}, {HARDWARE}, seq {SEQ}, batch 1", "",
                "`python -m bench.plan_speed` on:", "", *machine(), f"- checkout: `{args.tree}`", ""]
        args.out.write_text("\n".join(head) + "\n" + table)
    return 0


def render(rows, repeats: int, load_before: str, load_after: str) -> str:
    head = ["model", "layers planned", *PHASES, "planning (no import)", "import + planning", "process wall", "`autoshard plan` wall",
            "planning CPU", "import CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, m in rows:
        cells = [config, m["layers"], *("–" if m[k] != m[k] else f"{m[k]:.2f}" for k in PHASES), f"**{m['planning']:.2f}**", f"{m['total']:.2f}", f"{m['process']:.2f}", f"**{m['cli']:.2f}**",
                 f"**{m['planning_cpu']:.2f}**", f"{m['import_cpu']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nSeconds, median of {repeats} fresh processes per model; phases are wall-clock; *CPU* columns are the "
        f"process's CPU seconds (`time.process_time`), which other jobs on the machine do not inflate. "
        f"Load average (1 / 5 / 15 min) {load_before} before, {load_after} after.\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT)) if "PYTHONPATH" not in os.environ else None
    sys.exit(main())
