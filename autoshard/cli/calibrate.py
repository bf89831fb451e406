"""Measure this machine and write a `cpu-gloo-calibrated` HardwareProfile.

Collectives: a real gloo world of `world_size` ranks on 127.0.0.1 times all_reduce, all_gather
and reduce_scatter over message sizes; per kind we fit `t = alpha + factor * S / busbw` (comm.py
conventions). Compute: fp32 matmul throughput (best of a few sizes), bf16/fp16 matmul, a large
copy for memory bandwidth, and a tiny op for the per-op overhead, each measured with the thread
count one rank gets when `world_size` ranks share the box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from autoshard.distributed.mesh import free_port

from autoshard.cost.comm import bus_factor
from autoshard.cost.hardware import HardwareProfile, LinkProfile

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = [4 * KiB * 4**i for i in range(7)]  # 4 KiB .. 16 MiB
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB]
CALIBRATED_KINDS = ("all_reduce", "all_gather", "reduce_scatter")
_RANK_TIMEOUT_S = 300.0


@dataclass
class Measurements:
    world_size: int
    threads_per_rank: int
    # kind -> [(S bytes, median seconds)], S in nccl-tests convention (full logical size)
    comm: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    fits: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind -> (alpha, busbw)
    matmul_flops: dict[str, float] = field(default_factory=dict)  # dtype -> best FLOP/s
    mem_bw: float = 0.0
    launch_s: float = 0.0
    dispatch_s: float = 0.0            # eager DTensor host time per op, forward
    dispatch_backward_s: float = 0.0   # ... and for that op's backward


# -- collectives (runs in each rank process) -----------------------------------------------------
def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _reps_for(size: int, reps: int) -> int:
    # Loopback gloo on a small box has a heavy tail (scheduler hiccups of 2-5 ms in ~1 call of
    # 5 next to a ~0.5 ms typical small all_reduce); small messages are cheap, so time more of
    # them to keep the median on the typical value. Same count on every rank.
    return reps * 4 if size <= 1 * MiB else reps


def _rank_main(rank: int, world_size: int, port: int, sizes: list[int], reps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch.distributed as dist

        torch.set_num_threads(_threads_per_rank(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        # torch 2.13 deprecates the *_tensor names in favour of *_single; keep both working.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        out: dict[str, list[tuple[int, float]]] = {}
        for kind in CALIBRATED_KINDS:
            out[kind] = []
            for size in sizes:
                numel = max(world_size, size // 4 // world_size * world_size)  # fp32, divisible by ws
                full = torch.ones(numel)
                shard = torch.ones(numel // world_size)
                op = {
                    "all_reduce": lambda: dist.all_reduce(full),
                    "all_gather": lambda: all_gather(full, shard),
                    "reduce_scatter": lambda: reduce_scatter(shard, full),
                }[kind]
                for _ in range(2):  # warm-up: connection setup and buffer allocation
                    op()
                n_reps = _reps_for(size, reps)
                times = torch.empty(n_reps, dtype=torch.float64)
                for i in range(n_reps):
                    dist.barrier()  # start together so a rank does not time its peer's lateness
                    t0 = time.perf_counter()
                    op()
                    times[i] = time.perf_counter() - t0
                # A collective ends when its slowest rank does (nccl-tests reports the same way).
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
                out[kind].append((numel * 4, statistics.median(times.tolist())))
        dispatch = _dtensor_dispatch_seconds(world_size)  # (forward, backward)
        if rank == 0:
            results.put(("ok", (out, dispatch)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def measure_collectives(world_size: int, sizes: list[int], reps: int) -> tuple[dict[str, list[tuple[int, float]]], tuple[float, float]]:
    """(collective timings per kind, DTensor dispatch seconds per op (forward, backward)), from
    `world_size` ranks."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, sizes, reps, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        status, payload = results.get(timeout=_RANK_TIMEOUT_S)
    except queue.Empty:
        raise TimeoutError(f"calibration ranks did not report within {_RANK_TIMEOUT_S:.0f}s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    # Exit codes are ignored: gloo teardown sometimes aborts after a clean finish.
    if status != "ok":
        raise RuntimeError(f"calibration failed on a rank:\n{payload}")
    return payload


def fit_alpha_busbw(kind: str, n: int, points: list[tuple[int, float]]) -> tuple[float, float]:
    """Fit t = alpha + factor(kind, n) * S / busbw to (S, t) points; returns (alpha, busbw).

    Minimises the sum of |relative residuals| (iteratively reweighted least squares): relative,
    so every message size counts (plain least squares lets the largest message decide and often
    returns a negative alpha); L1, so one size hit by a scheduler hiccup or a neighbour's load
    does not drag the line.
    """
    xs = [bus_factor(kind, n) * s for s, _ in points]
    ts = [t for _, t in points]

    def solve(ws: list[float]) -> tuple[float, float]:
        sw, sx = sum(ws), sum(w * x for w, x in zip(ws, xs))
        st, sxx = sum(w * t for w, t in zip(ws, ts)), sum(w * x * x for w, x in zip(ws, xs))
        sxt = sum(w * x * t for w, x, t in zip(ws, xs, ts))
        det = sw * sxx - sx * sx
        if det <= 0:
            return 0.0, 0.0
        return (sxx * st - sx * sxt) / det, (sw * sxt - sx * st) / det

    ws = [1.0 / (t * t) for t in ts]  # squared-relative-error weights
    alpha, beta = solve(ws)
    for _ in range(30):
        rel = [max(abs(alpha + beta * x - t) / t, 1e-3) for x, t in zip(xs, ts)]
        alpha, beta = solve([w / r for w, r in zip(ws, rel)])  # L1 via IRLS
    if beta <= 0:  # time did not grow with size (noise): charge all of the biggest one to bandwidth
        i = max(range(len(xs)), key=xs.__getitem__)
        alpha, beta = 0.0, ts[i] / xs[i]
    if alpha <= 0:  # pin latency at half the smallest message's time, refit the slope through it
        alpha = 0.5 * min(ts)
        num = sum(w * x * (t - alpha) for w, x, t in zip(ws, xs, ts))
        beta = max(num / sum(w * x * x for w, x in zip(ws, xs)), 1e-15)
    return alpha, 1.0 / beta


# -- compute (runs in the parent, with the world already gone) ----------------------------------
def _dtensor_dispatch_seconds(world_size: int, chain: int = 50, reps: int = 30) -> tuple[float, float]:
    """(forward, backward) host time of one eager DTensor op beyond the same op on plain tensors.

    A chain of `y = y * w` on tiny tensors that require grad, as a training step runs them:
    forward records autograd and propagates shardings; backward runs the autograd engine and
    two DTensor ops per mul (the gradient of both inputs). Eager autoshard pays both per op."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))

    def per_op(dtensor: bool, backward: bool) -> float:
        def leaf():
            t = torch.ones(world_size * 2, 8)
            return (distribute_tensor(t, mesh, [Shard(0)]) if dtensor else t[:2]).requires_grad_()

        x, w = leaf(), leaf()

        def run():
            y = x
            for _ in range(chain):
                y = y * w
            if backward:
                y.sum().backward()

        for _ in range(5):  # warm the sharding-propagation cache, as a training loop does
            run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / chain

    t = {(dtensor, backward): per_op(dtensor, backward) for dtensor in (True, False) for backward in (False, True)}
    fwd = t[True, False] - t[False, False]
    bwd = (t[True, True] - t[True, False]) - (t[False, True] - t[False, False])
    return max(0.0, fwd), max(0.0, bwd)


def _best_time(fn, min_reps: int = 3, budget_s: float = 0.3) -> float:
    fn()  # warm-up
    best, spent, i = float("inf"), 0.0, 0
    while i < min_reps or spent < budget_s and i < 50:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, i = min(best, dt), spent + dt, i + 1
    return best


def measure_compute(m: Measurements, quick: bool) -> None:
    prev = torch.get_num_threads()
    torch.set_num_threads(m.threads_per_rank)
    try:
        with torch.no_grad():
            fp32_sizes = [256, 512] if quick else [256, 512, 1024, 2048]
            for dtype, sizes in (("float32", fp32_sizes), ("bfloat16", [256]), ("float16", [256])):
                best = 0.0
                for n in sizes:
                    a = torch.randn(n, n).to(getattr(torch, dtype))
                    b = torch.randn(n, n).to(getattr(torch, dtype))
                    best = max(best, 2 * n**3 / _best_time(lambda: torch.mm(a, b)))
                m.matmul_flops[dtype] = best
            numel = (32 if quick else 128) * MiB // 4
            src, dst = torch.ones(numel), torch.empty(numel)
            m.mem_bw = 2 * numel * 4 / _best_time(lambda: dst.copy_(src))  # read + write
            x, y, z = torch.ones(8), torch.ones(8), torch.empty(8)
            iters = 2000
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.add(x, y, out=z)
            m.launch_s = (time.perf_counter() - t0) / iters
    finally:
        torch.set_num_threads(prev)


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def format_table(m: Measurements) -> str:
    lines = [f"gloo collectives, world size {m.world_size}, {m.threads_per_rank} thread(s) per rank",
             f"{'kind':<15}{'bytes':>10}{'median us':>12}{'algbw MB/s':>12}{'busbw MB/s':>12}"]
    for kind, pts in m.comm.items():
        for s, t in pts:
            algbw = s / t
            lines.append(f"{kind:<15}{s:>10}{t * 1e6:>12.1f}{algbw / 1e6:>12.1f}"
                         f"{algbw * bus_factor(kind, m.world_size) / 1e6:>12.1f}")
    lines.append("fit t = alpha + factor*S/busbw:")
    for kind, (a, bw) in m.fits.items():
        lines.append(f"  {kind:<15} alpha {a * 1e6:9.1f} us   busbw {bw / 1e9:8.3f} GB/s")
    lines.append("compute (per rank):")
    for dtype, f in m.matmul_flops.items():
        lines.append(f"  matmul {dtype:<9} {f / 1e9:9.2f} GFLOP/s")
    lines.append(f"  copy bandwidth   {m.mem_bw / 1e9:9.2f} GB/s")
    lines.append(f"  per-op overhead  {m.launch_s * 1e6:9.2f} us")
    lines.append(f"  DTensor dispatch {m.dispatch_s * 1e6:9.2f} us per op forward, "
                 f"{m.dispatch_backward_s * 1e6:.2f} us its backward (beyond plain tensors)")
    return "\n".join(lines)


def calibrate(world_size: int = 2, sizes: list[int] | None = None, reps: int = 5, *,
              quick: bool = False, verbose: bool = False) -> HardwareProfile:
    """Measure this machine's gloo collectives and compute, return a `cpu-gloo-calibrated` profile.

    `sizes` are message sizes in bytes (default 4 KiB..16 MiB; `quick`: 4 KiB..4 MiB and
    smaller compute benchmarks). `verbose` prints the measurement table.
    """
    return run_calibration(world_size, sizes, reps, quick=quick, verbose=verbose)[0]


def run_calibration(world_size: int = 2, sizes: list[int] | None = None, reps: int = 5, *,
                    quick: bool = False, verbose: bool = False) -> tuple[HardwareProfile, Measurements]:
    """`calibrate`, also returning the raw measurements."""
    if world_size < 2:
        raise ValueError("calibration needs world_size >= 2 (a collective over one rank is free)")
    sizes = sorted(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    if len(sizes) < 2:
        raise ValueError("need at least two message sizes to fit alpha and busbw")
    m = Measurements(world_size=world_size, threads_per_rank=_threads_per_rank(world_size))
    m.comm, (m.dispatch_s, m.dispatch_backward_s) = measure_collectives(world_size, sizes, reps)
    m.fits = {kind: fit_alpha_busbw(kind, world_size, pts) for kind, pts in m.comm.items()}
    measure_compute(m, quick)
    if verbose:
        print(format_table(m))

    # all_reduce is the default for kinds not measured (all_to_all, broadcast): it is the
    # collective plain TP issues most, and gloo's ring makes it the best-understood fit.
    ar_alpha, ar_bw = m.fits["all_reduce"]
    link = LinkProfile("gloo-loopback-calibrated", ar_alpha, ar_bw, dict(m.fits))
    cpu = os.cpu_count() or world_size
    profile = HardwareProfile(
        name="cpu-gloo-calibrated",
        device_memory_bytes=_physical_memory_bytes() // world_size,
        peak_flops=dict(m.matmul_flops),
        mem_bw_bytes_per_s=m.mem_bw,
        efficiency=1.0,  # the peaks are measured best achieved rates, not datasheet numbers
        launch_overhead_s=m.launch_s,
        dispatch_overhead_s=m.dispatch_s,
        dispatch_backward_s=m.dispatch_backward_s,
        intra_node=link,
        inter_node=link,  # every rank is on this host; there is no second node to measure
        devices_per_node=max(world_size, cpu),
        notes=(f"measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu} CPU(s), torch {torch.__version__}, "
               f"gloo world size {world_size}, {m.threads_per_rank} thread(s)/rank, sizes "
               f"{sizes[0]}..{sizes[-1]} B, {reps} reps (median). Fits hold for this world size; "
               "gloo's algorithms may scale differently with more ranks."),
    )
    return profile, m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="autoshard calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--world-size", type=int, default=2, help="gloo ranks to spawn (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per message size")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller sizes (~10 s)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    profile, m = run_calibration(args.world_size, reps=args.reps, quick=args.quick, verbose=True)
    # The raw points ride along for inspection; HardwareProfile.from_json ignores them.
    doc = profile.to_dict() | {"measurements": asdict(m)}
    Path(args.out).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {profile.name} to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
