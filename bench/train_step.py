"""Training-step and inference speed: autoshard against the hand-written Megatron TP+SP plan (issue 5).

    python -m bench.train_step [--steps 20] [--backend inductor]   # writes bench/results/train_step.md

In ONE run, 2 gloo ranks (spawned), the same model (a tiny-llama config scaled up so compute
dominates) and the same inputs, for each of
  1. hand plan, eager     (`bench.hand_plan.apply_hand_plan`, SP + loss parallel, best variant)
  2. hand plan, compiled  (torchtitan's `apply_compile`: each decoder block `torch.compile`d,
                          dynamic shapes; and, as "hand compiled whole", `torch.compile(model)`:
                          dynamic first, static if that fails — it fails for training in 2.13)
  3. autoshard, eager     (the DTensor program)
  3b. autoshard, lowered  (`autoshard(..., lower=True)`: the lowered local program, eager)
  4. autoshard, compiled  (`autoshard(..., compile=True)`: the lowered local program, dynamic)
it times a full training step — forward, backward, AdamW step (median of `--steps` after warm-up,
barriers around each step) — counts collectives per step by kind (count and bytes, CommDebugMode, compiled
variants included: their graphs call the functional collectives through the dispatcher) and times forward
only for a decode step (seq 1, no KV cache) and a long prefill. Compile time = the first step's
time minus the median step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from autoshard.distributed.mesh import free_port

CONFIG = ("tiny-llama", {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                         "num_key_value_heads": 8, "num_hidden_layers": 2, "vocab_size": 4096})
BATCH, SEQ, PREFILL = 2, 256, 512
VARIANTS = ["hand eager", "hand compiled", "hand compiled whole", "autoshard eager", "autoshard lowered", "autoshard compiled"]


def _model():
    from autoshard.configs import build_model, load_config

    cfg = load_config(CONFIG[0])
    for k, v in CONFIG[1].items():
        setattr(cfg, k, v)
    return build_model(cfg, seed=0).train()


def _ids(vocab: int, batch: int, seq: int, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seq)
    kw = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if labels:
        kw["labels"] = torch.randint(0, vocab, (batch, seq), generator=g)
    return kw


def _build(variant: str, mesh, backend: str, notes: list):
    """(module, step_context, finalize) for a variant."""
    import contextlib

    import autoshard
    from autoshard.testing.hand_plan import apply_hand_plan, finalize_grads, hand_plan_context

    model = _model()
    if variant.startswith("hand"):
        apply_hand_plan(model, mesh, sequence_parallel=True, loss_parallel=True)
        run = model
        if variant == "hand compiled":  # per block, as torchtitan compiles its TP models
            layers = model.model.layers
            for i, block in enumerate(layers):
                layers[i] = torch.compile(block, backend=backend, dynamic=True)
            notes.append("each decoder block torch.compile'd (torchtitan's apply_compile), dynamic=True; "
                         "embedding, final norm and the loss-parallel LM head run eagerly on DTensors")
        if variant == "hand compiled whole":
            run = torch.compile(model, backend=backend, dynamic=_HAND_DYNAMIC[0])
        return run, model, (lambda: hand_plan_context(model)), (lambda: finalize_grads(model))
    kw = _ids(model.config.vocab_size, BATCH, SEQ)
    sharded = autoshard.autoshard(model, mesh, example_inputs=kw, lower=variant == "autoshard lowered",
                                  compile={"backend": backend} if variant == "autoshard compiled" else False)
    notes.extend(getattr(sharded, "lowering_notes", []))
    return sharded, sharded, contextlib.nullcontext, (lambda: 0)


_HAND_DYNAMIC = [True]  # flipped to False (static) when the dynamic-shape compile fails


def _loss(out):
    loss = out.loss
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def _time_steps(fn, steps: int, warmup: int) -> tuple[float, float]:
    import torch.distributed as dist

    times = []
    for i in range(steps + warmup):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[warmup:])
    return med, times[0]


def _weigh(fn) -> dict:
    from tests.helpers import comm_bytes

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        weighed, _ = comm_bytes(fn)
    return weighed


def _why(e: BaseException) -> str:
    """The innermost error of a (possibly wrapped) compile failure, on one line."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _variant(variant: str, mesh, args, rank: int) -> dict:
    notes: list[str] = []
    row = {"variant": variant, "notes": notes}
    run, params_of, ctx, finalize = _build(variant, mesh, args.backend, notes)
    opt = torch.optim.AdamW(params_of.parameters(), lr=1e-4)
    kw = _ids(params_of.config.vocab_size, BATCH, SEQ)

    def step():
        with ctx():
            loss = _loss(run(**kw))
            loss.backward()
        finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        row["step_s"], first = _time_steps(step, args.steps, 3)
        row["compile_s"] = first - row["step_s"]
    except Exception as e:  # noqa: BLE001 - a failed compile is a result to record
        if variant == "hand compiled whole" and _HAND_DYNAMIC[0]:
            notes.append(f"dynamic-shape compile failed: {_why(e)}; static shapes instead")
            torch._dynamo.reset()
            _HAND_DYNAMIC[0] = False
            sub = _variant(variant, mesh, args, rank)
            sub["notes"] = notes + sub["notes"]
            return sub
        row["error"] = _why(e)
        if rank == 0:
            traceback.print_exc()
        return row
    row["comms"] = _weigh(step)  # CommDebugMode sees compiled code's collectives too (no recompile)
    # inference: forward only, no KV cache
    for name, (b, s) in {"decode": (BATCH, 1), "prefill": (1, PREFILL)}.items():
        ikw = _ids(params_of.config.vocab_size, b, s, labels=False)

        def fwd():
            with torch.no_grad(), ctx():
                logits = run(**ikw).logits
                # Inference needs the full logits (to sample): the hand plan's loss-parallel LM
                # head leaves them vocab-sharded, autoshard returns them full; gather to compare.
                if hasattr(logits, "full_tensor"):
                    logits.full_tensor()

        try:
            row[name + "_s"], first = _time_steps(fwd, max(5, args.steps // 2), 2)
            row[name + "_compile_s"] = first - row[name + "_s"]
            row[name + "_comms"] = _weigh(fwd)
        except Exception as e:  # noqa: BLE001
            row[name + "_error"] = _why(e)
    row["hand_dynamic"] = _HAND_DYNAMIC[0] if variant == "hand compiled whole" else None
    return row


def _rank(rank: int, ws: int, port: int, args, out) -> None:
    run_variants(rank, ws, port, args.variants, lambda v, mesh: _variant(v, mesh, args, rank), out)


def run_variants(rank: int, ws: int, port: int, variants, run, out, threads: int | None = None) -> None:
    """One spawned bench rank: a gloo group and a 1-D "tp" mesh, `run(variant, mesh)` -> row for
    each variant (rank 0 prints each row and puts them all on `out`), then the group torn down."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(threads or max(1, (os.cpu_count() or ws) // ws))
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    rows = []
    for v in variants:
        rows.append(run(v, mesh))
        if rank == 0:
            print(rows[-1], flush=True)
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(rank_fn, *args, world_size: int = 2):
    """Run `rank_fn(rank, world_size, port, *args, out)` on `world_size` spawned ranks; return
    what rank 0 put on `out`."""
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_fn, args=(world_size, free_port(), *args, out), nprocs=world_size, start_method="spawn")
    return out.get()


def write_result(text: str, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)


def _machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.machine())
    ram = next((int(l.split()[1]) // 2**20 for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), 0)
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPU(s) ({cpu}), {ram} GiB RAM, torch {torch.__version__}; `uptime`: {up}"


def _comms(c: dict | None) -> str:
    if not c:
        return "-"
    return ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.2f} MiB)" for k, v in sorted(c.items()))


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def report(rows: list[dict], machine_before: str, machine_after: str, args) -> str:
    by = {r["variant"]: r for r in rows}
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG[1].items())
    lines = ["# Training step: autoshard vs the hand-written Megatron TP+SP plan (gloo, world size 2)", "",
             f"Model: {CONFIG[0]} with {cfg}; batch {BATCH} x seq {SEQ}, fp32, labels (loss parallel in both). "
             f"Compile backend: {args.backend}, {'warm' if args.warm_cache else 'cold (fresh)'} inductor cache. Median of {args.steps} steps after 3 warm-up, barriers around each step.", "",
             f"Machine before: {machine_before}", f"Machine after: {machine_after}", "",
             "## Training step (forward + backward + AdamW)", "",
             "| variant | step (median) | vs hand, same mode | compile (first step - median) | collectives per step (CommDebugMode) |",
             "|---|---|---|---|---|"]
    for v in VARIANTS:
        r = by.get(v)
        if r is None:
            continue
        base = by.get("hand compiled" if "compiled" in v else "hand eager", {})
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if r.get("step_s") and base.get("step_s") else "-"
        if "error" in r:
            lines.append(f"| {v} | failed: {r['error']} | - | - | - |")
            continue
        lines.append(f"| {v} | {_ms(r.get('step_s'))} | {ratio} | {r.get('compile_s', 0):.1f} s | {_comms(r.get('comms'))} |")
    lines += ["", "## Inference (forward only, no KV cache; full logits out: the hand plan's vocab-sharded logits are gathered)", "",
              f"| variant | decode (batch {BATCH} x seq 1) | prefill (1 x {PREFILL}) | vs hand (decode / prefill) | collectives (decode; prefill) |",
              "|---|---|---|---|---|"]
    for v in VARIANTS:
        r = by.get(v)
        if r is None or "error" in r:
            continue
        base = by.get("hand compiled" if "compiled" in v else "hand eager", {})
        rat = [f"{r[k] / base[k]:.2f}x" if r.get(k) and base.get(k) else "-" for k in ("decode_s", "prefill_s")]
        dec = r.get("decode_error") or _ms(r.get("decode_s"))
        pre = r.get("prefill_error") or _ms(r.get("prefill_s"))
        lines.append(f"| {v} | {dec} | {pre} | {' / '.join(rat)} | {_comms(r.get('decode_comms'))}; {_comms(r.get('prefill_comms'))} |")
    lines += ["", "## Notes", ""]
    for r in rows:
        for n in r.get("notes", []):
            lines.append(f"- {r['variant']}: {n}")
        if r.get("hand_dynamic") is not None:
            lines.append(f"- {r['variant']}: compiled with dynamic={r['hand_dynamic']}")
        for k in ("decode", "prefill"):
            if r.get(k + "_compile_s") is not None and "compiled" in r["variant"]:
                lines.append(f"- {r['variant']}: {k} first call (compile) {r[k + '_compile_s']:.1f} s")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--out", default="bench/results/train_step.md")
    ap.add_argument("--warm-cache", action="store_true",
                    help="reuse inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    args = ap.parse_args()
    if not args.warm_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    before = _machine()
    rows = spawn_ranks(_rank, args)
    write_result(report(rows, before, _machine(), args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
