"""Generation speed: `sharded.generate` against a hand-written TP plan driving transformers'
own `generate`, and against the unsharded model (issue 16).

    python -m bench.generate [--new 32] [--repeats 3]     # writes bench/results/generate.md

In ONE run, 2 gloo ranks (spawned), the same model (tiny-llama scaled up, GQA) and the same
left-padded prompts, greedy, eos off so every variant generates the same number of tokens:
  1. unsharded   `model.generate` on rank 0 alone (the other rank idle at a barrier);
  2. hand plan   transformers' `base_model_tp_plan` for Llama written with `parallelize_module`
                 (q/k/v/gate/up `ColwiseParallel`, o/down `RowwiseParallel`, lm_head column with
                 gathered output; local outputs, so transformers' DynamicCache holds each rank's
                 heads), driven by `model.generate`;
  3. autoshard   `sharded.generate` (KV cache split by heads, prefill + decode programs) on a
                 module made plainly ("dtensor"), with `lower=True` and with `compile=` (inductor).
                 generate runs its cached programs lowered in the first two (no backward, no
                 DTensor dispatch per token), so those rows differ by noise only.
Prefill = a generate of 1 new token; a decode step = (generate of N tokens - prefill) / (N - 1);
decode tokens/s = batch / decode step. Medians of `--repeats` after one warm-up generate (which
also plans and compiles autoshard's programs; that time is reported separately).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CONFIG = ("tiny-llama", {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "num_hidden_layers": 4, "vocab_size": 4096})
BATCH, PROMPT = 4, 48
VARIANTS = ["unsharded", "hand plan", "autoshard dtensor", "autoshard lowered", "autoshard compiled"]


def _model():
    from autoshard.configs import build_model, load_config

    cfg = load_config(CONFIG[0])
    for k, v in CONFIG[1].items():
        setattr(cfg, k, v)
    model = build_model(cfg, seed=0).eval()
    model.generation_config.eos_token_id = None   # every variant generates exactly N tokens
    return model


def _prompt(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, PROMPT), generator=g)
    mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    mask[: BATCH // 2, : PROMPT // 4] = 0    # half the rows left-padded
    return ids.masked_fill(mask == 0, 0), mask


def hand_plan(model, mesh):
    """transformers' Llama `base_model_tp_plan`, as `parallelize_module` styles."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    layer = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(), "self_attn.v_proj": ColwiseParallel(),
             "self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
             "mlp.down_proj": RowwiseParallel()}
    for block in model.model.layers:
        parallelize_module(block, mesh, layer)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    return model


def _timed(fn, repeats: int) -> float:
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _variant(name: str, mesh, args, rank: int) -> dict:
    import torch.distributed as dist

    import autoshard

    model = _model()
    ids, mask = _prompt(model.config.vocab_size)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False, pad_token_id=0)
    row: dict = {"variant": name}
    t0 = time.perf_counter()
    if name == "unsharded":
        if rank == 0:
            torch.set_num_threads(2)
        run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0) if rank == 0 else None
    elif name == "hand plan":
        hand = hand_plan(model, mesh)
        run = lambda n: hand.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        kind = name.split()[1]
        options = {"lower": kind == "lowered", "compile": {"backend": args.backend} if kind == "compiled" else False}
        sharded = autoshard.autoshard(model, mesh, **options)
        run = lambda n: sharded.generate(ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0)
    out = run(args.new)                        # warm-up (autoshard: plans, lowers, compiles)
    row["first_s"] = time.perf_counter() - t0
    if rank == 0 or name != "unsharded":
        row["same_tokens"] = bool(torch.equal(out, reference))
    row["prefill_s"] = _timed(lambda: run(1), args.repeats)
    total = _timed(lambda: run(args.new), args.repeats)
    row["decode_step_s"] = (total - row["prefill_s"]) / (args.new - 1)
    row["decode_tok_s"] = BATCH / row["decode_step_s"]
    if name.startswith("autoshard"):
        programs = sharded.generation_programs(BATCH, PROMPT + args.new)
        row["cache"] = programs.cache_layout()
        row["notes"] = list(programs.module.lowering_notes)
    torch.set_num_threads(1)
    dist.barrier()
    return row


def _rank(rank: int, ws: int, port: int, args, out) -> None:
    def run(v, mesh):
        try:
            return _variant(v, mesh, args, rank)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
            return {"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    from bench.train_step import run_variants

    run_variants(rank, ws, port, args.variants, run, out, threads=1)


def report(rows: list[dict], machine: str, args) -> str:
    from autoshard.schema.units import format_bytes

    by = {r["variant"]: r for r in rows}
    hand = by.get("hand plan", {})
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG[1].items())
    lines = ["# Generation: autoshard vs a hand-written TP plan on transformers' `generate` (gloo, world size 2)", "",
             f"Model: {CONFIG[0]} with {cfg}, fp32, random weights. Batch {BATCH} x prompt {PROMPT} (half the rows left-padded), "
             f"greedy, {args.new} new tokens, eos off. Medians of {args.repeats} after one warm-up. Compile backend: {args.backend}.", "",
             f"Machine: {machine}", "",
             "| variant | same tokens as unsharded | prefill (1 new token) | decode step | decode tokens/s | vs hand plan (decode tok/s) | first generate (plan/compile) |",
             "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = by.get(v)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {v} | failed: {r['error']} | - | - | - | - | - |")
            continue
        ratio = f"{r['decode_tok_s'] / hand['decode_tok_s']:.2f}x" if hand.get("decode_tok_s") else "-"
        lines.append(f"| {v} | {r.get('same_tokens', '-')} | {r['prefill_s'] * 1e3:.1f} ms | {r['decode_step_s'] * 1e3:.2f} ms | "
                     f"{r['decode_tok_s']:.0f} | {ratio} | {r['first_s']:.1f} s |")
    lines += ["", "\"autoshard dtensor\" is `autoshard(model, mesh)`, \"lowered\" adds `lower=True`: generate runs the cached programs "
              "lowered in both (no backward, no DTensor dispatch per token), so those two rows differ by noise only."]
    cache = next((r["cache"] for r in rows if r.get("cache")), None)
    if cache:
        lines += ["", f"autoshard's KV cache: {', '.join(cache['placements'])} — {cache['why']}; "
                      f"{format_bytes(cache['bytes_per_rank'])} per rank ({cache['slots']} slots), {format_bytes(cache['bytes_per_token'])} per token; "
                      f"one decode step: {cache['decode_collectives']}."]
    notes = [f"- {r['variant']}: {n}" for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    from bench.train_step import _machine, spawn_ranks, write_result

    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--out", default="bench/results/generate.md")
    args = ap.parse_args()
    write_result(report(spawn_ranks(_rank, args), _machine(), args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
