"""`autoshard plan`: plan a real-scale model for a GPU mesh on a laptop, with no GPU and no memory.

The model is built from a transformers config on `meta`, a *fake* process group of the mesh's
world size stands in for the cluster (`torch.testing._internal.distributed.fake_pg`), and the
plan comes from `plan_layers_once` (a few identical layers captured, the plan grown to all).
Printed: the plan (per-layer rows folded into `layers.*`), which parameters stay replicated and
why, per-rank memory and the estimated step time; progress of the slow phases on stderr.

    autoshard plan --config llama-3.1-70b --mesh tp=8 --hardware h100 --seq 8192
    autoshard plan --config qwen2.5-0.5b --mesh tp=4 --mesh tp=8 --json plan.json
    autoshard plan --config mixtral-8x7b --mesh tp=8 --html mixtral.html
    python -m autoshard plan --config path/to/config.json --mesh dp=16,tp=8
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="bundled config name (autoshard.configs.list_configs()), a config.json path or a directory holding one")
    p.add_argument("--mesh", action="append", default=None, metavar="DIM=SIZE[,DIM=SIZE]",
                   help="mesh to plan for, e.g. tp=8 or dp=16,tp=8 (sharding runs over 'tp'); repeat to compare meshes (default tp=8)")
    p.add_argument("--hardware", default="h100", help="hardware profile name or a profile JSON path (default h100)")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="per-rank memory limit for the cost model: bytes, '70GiB', 'device' or 'none' (default: the smallest memory "
                        "a legal plan reaches, the fastest there). A byte limit plans every layer (slower): it does not scale with layers")
    p.add_argument("--seq", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size per data-parallel rank (default 1)")
    p.add_argument("--inference", action="store_true", help="plan a forward without labels (no loss in the graph)")
    p.add_argument("--dtype", default="auto", help="parameter dtype: 'auto' (the config's), bfloat16, float32, ... (default auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, VALUE parsed as JSON (e.g. --set num_key_value_heads=2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the plan as JSON (one file per mesh: PATH, or PATH with the mesh inserted)")
    p.add_argument("--html", default=None, metavar="PATH", help="write the plan as a self-contained HTML page (one per mesh, as --json)")
    p.add_argument("--full-report", action="store_true", help="print Plan.report() unabridged (one row per layer)")
    p.add_argument("--full-capture", action="store_true", help="capture every layer instead of a few (slow; for checking)")
    p.add_argument("--verify", action="store_true", help="also plan one layer more and check the grown plan against it")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")


def parse_mesh(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """"dp=16,tp=8" -> (("dp", "tp"), (16, 8)); a single dim may be given as just "8" (tp)."""
    names, sizes = [], []
    for part in text.replace(" ", "").split(","):
        name, eq, size = part.partition("=")
        if not eq:
            name, size = "tp", name
        if not name or not size.isdigit() or int(size) < 1:
            raise SystemExit(f"autoshard plan: bad --mesh {text!r}: expected DIM=SIZE[,DIM=SIZE], e.g. tp=8 or dp=16,tp=8")
        names.append(name)
        sizes.append(int(size))
    if len(names) > 1 and "tp" not in names:
        raise SystemExit(f"autoshard plan: --mesh {text!r} has several dims and none named 'tp' to shard over")
    if len(set(names)) != len(names):
        raise SystemExit(f"autoshard plan: --mesh {text!r} repeats a dim name")
    return tuple(names), tuple(sizes)


class Progress:
    """One line per phase on stderr; on a terminal the line shows the phase while it runs."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self.detail = ""

    def __call__(self, phase: str, detail: str, seconds: float | None) -> None:
        if not self.enabled:
            return
        if seconds is None:
            self.detail = f" ({detail})" if detail else ""
            if self.tty:
                self.stream.write(f"\r[autoshard] {phase}{self.detail} ...")
                self.stream.flush()
            return
        back = "\r" if self.tty else ""
        self.stream.write(f"{back}[autoshard] {phase}{self.detail}: {seconds:.2f} s\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    progress = Progress(not args.quiet)
    t0 = time.perf_counter()
    import torch

    from autoshard.configs import build_model, load_config

    config = load_config(args.config)
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"autoshard plan: bad --set {item!r}: expected KEY=VALUE")
        try:
            setattr(config, key, json.loads(value))
        except json.JSONDecodeError:
            setattr(config, key, value)
    progress("build", f"{args.config} on meta", None)
    t = time.perf_counter()
    model = build_model(config, device="meta", dtype=args.dtype)
    progress("build", "", time.perf_counter() - t)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids} if args.inference else {"input_ids": ids, "labels": ids}

    from autoshard.cost import get_profile

    profile = get_profile(args.hardware)
    meshes = [parse_mesh(m) for m in (args.mesh or ["tp=8"])]
    for i, (names, sizes) in enumerate(meshes):
        result = plan_on_fake_mesh(model, names, sizes, inputs, args, profile, progress)
        if i:
            print("\n" + "=" * 100 + "\n")
        print(render(result, model, args, profile, names, sizes))
        if args.json:
            path = args.json if len(meshes) == 1 else _mesh_path(args.json, names, sizes)
            with open(path, "w", encoding="utf-8") as f:
                f.write(result.plan.to_json())
            print(f"\nplan written to {path}")
        if args.html:
            path = args.html if len(meshes) == 1 else _mesh_path(args.html, names, sizes)
            result.plan.to_html(path)
            print(f"\nplan page written to {path}")
    if not args.quiet:
        planning = time.perf_counter() - t0
        since_start = _process_age()
        total = f"; {since_start:.2f} s since the process started (imports of torch, transformers, autoshard included)" if since_start else ""
        sys.stderr.write(f"[autoshard] planning {planning:.2f} s{total}\n")
    return 0


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None elsewhere."""
    try:
        import os

        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _mesh_path(path: str, names, sizes) -> str:
    tag = "-".join(f"{n}{s}" for n, s in zip(names, sizes))
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{tag}.{ext}" if dot else f"{path}-{tag}"


def plan_on_fake_mesh(model, names, sizes, inputs, args, profile, progress):
    """Plan `model` for a mesh of `sizes` with a fake process group of that world size."""
    import logging
    import math

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autoshard.scale import plan_layers_once

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    logging.getLogger("torch._export.non_strict_utils").setLevel(logging.ERROR)
    world = math.prod(sizes)
    if dist.is_initialized():
        raise SystemExit("autoshard plan: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
        attempts = () if args.full_capture else (4, 6)
        return plan_layers_once(model, mesh, inputs, progress=progress, verify=args.verify, attempts=attempts,
                                hardware=profile, memory_budget=args.memory_budget)
    finally:
        dist.destroy_process_group()


def render(result, model, args, profile, names, sizes) -> str:
    from autoshard.scale.summary import render_summary

    if args.full_report:
        return result.plan.report()
    return render_summary(result, model, profile, batch=args.batch, seq=args.seq, training=not args.inference)
