"""Peak host memory of each rank while a ~1B-parameter checkpoint loads into its shards.

    python -m bench.load_memory [--dir /tmp/autoshard-1b]    # writes bench/results/load_memory.md

1. writes, once, a random-weight Llama of ~1.1B parameters (TinyLlama-1.1B's shape, fp32) with
   `save_pretrained` in 1 GB files (the sharded-with-index layout);
2. 2 gloo ranks each build the model on `meta`, shard it at tp 2 and `autoshard.load` the
   directory; each reports its resident memory before the load and its peak (`ru_maxrss`);
3. the target (issue: train a real model at scale): peak growth during the load at most 0.6x
   the checkpoint plus its largest tensor — a rank must never hold the whole checkpoint.
   For reference, the same measure for `from_pretrained` of the whole model in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from autoshard.distributed.mesh import free_port

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """This process's peak resident memory (VmHWM: not inherited across exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5": the peak restarts from the current RSS
        f.write("5")


def _config():
    import transformers

    return transformers.LlamaConfig(**SHAPE)


def write_checkpoint(path: Path) -> dict:
    import transformers

    if not (path / "model.safetensors.index.json").exists():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(_config())
        model.save_pretrained(path, max_shard_size="1GB")
        del model
    from safetensors import safe_open

    total, largest = 0, 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                n = torch.Size(s.get_shape()).numel() * 4
                total, largest = total + n, max(largest, n)
    return {"bytes": total, "largest": largest, "files": len(list(path.glob("*.safetensors")))}


def _rank(rank: int, ws: int, port: int, path: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config())
    ids = torch.zeros(1, 16, dtype=torch.long)
    t0 = time.perf_counter()
    sharded = autoshard.autoshard(model, mesh, example_inputs={"input_ids": ids})
    plan_s = time.perf_counter() - t0
    planned_peak = _peak()
    _reset_peak()
    before, peak_before = _rss(), _peak()
    t0 = time.perf_counter()
    autoshard.load(sharded, path)
    load_s = time.perf_counter() - t0
    local = sum(p.to_local().numel() * p.element_size() for p in sharded.parameters())
    with torch.no_grad():
        logits = sharded(input_ids=ids).logits
    out.put({"rank": rank, "before": before, "peak_before": peak_before, "peak": _peak(), "after": _rss(),
             "local_bytes": local, "planned_peak": planned_peak, "plan_s": plan_s, "load_s": load_s, "finite": bool(torch.isfinite(logits).all())})
    dist.barrier()
    dist.destroy_process_group()


def _whole(path: str, out) -> None:
    import transformers

    torch.set_num_threads(1)
    _reset_peak()
    before, peak_before = _rss(), _peak()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():   # its tensors may map the files: touch every page, as training would
        sum(float(p.sum()) for p in model.parameters())
    out.put({"before": before, "peak_before": peak_before, "peak": _peak()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/autoshard-1b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_memory.md"))
    args = ap.parse_args()
    path = Path(args.dir)
    ckpt = write_checkpoint(path)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(path), q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = sorted((q.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    w = ctx.Process(target=_whole, args=(str(path), q))
    w.start()
    whole = q.get()
    w.join()
    write(ckpt, rows, whole, Path(args.out))


def write(ckpt: dict, rows: list[dict], whole: dict, out: Path) -> None:
    gib = 2**30
    target = 0.6 * ckpt["bytes"] + ckpt["largest"]
    lines = [
        "# Peak host memory while loading a checkpoint into the shards",
        "",
        f"`python -m bench.load_memory` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. Checkpoint: random-weight Llama (TinyLlama-1.1B shape), fp32, "
        f"{ckpt['bytes'] / gib:.2f} GiB in {ckpt['files']} safetensors files (`save_pretrained`, with index); "
        f"largest tensor {ckpt['largest'] / gib:.3f} GiB. Model built on `meta`, tp 2, `autoshard.load`.",
        "",
        f"Target: growth of a rank's peak resident memory during the load <= 0.6 x checkpoint + largest tensor "
        f"= {target / gib:.2f} GiB.",
        "",
        "| rank | shards held (GiB) | peak while planning (GiB) | RSS before load (GiB) | peak during load (GiB) | growth (GiB) | growth / checkpoint | target met | load (s) | plan (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        growth = r["peak"] - max(r["before"], r["peak_before"])
        lines.append(f"| {r['rank']} | {r['local_bytes'] / gib:.2f} | {r['planned_peak'] / gib:.2f} | {r['before'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                     f"{growth / gib:.2f} | {growth / ckpt['bytes']:.2f}x | {'yes' if growth <= target else 'NO'} | "
                     f"{r['load_s']:.1f} | {r['plan_s']:.1f} |")
    wg = whole["peak"] - max(whole["before"], whole["peak_before"])
    lines += ["", f"Reference, `from_pretrained` of the whole model in one process (every weight then read once): growth {wg / gib:.2f} GiB "
              f"({wg / ckpt['bytes']:.2f}x the checkpoint).", "",
              "Peaks are the kernel's VmHWM, reset (`/proc/self/clear_refs`) just before the load, so growth is the "
              "load's own; they count the checkpoint files' pages a rank has touched while it has them open (safetensors "
              "maps each file), which is most of the growth above the shards. Logits after loading finite on every rank: "
              f"{all(r['finite'] for r in rows)}.", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    json.dump({"ckpt": ckpt, "rows": rows, "whole": whole}, sys.stderr)


if __name__ == "__main__":
    main()
