"""MoE training step: autoshard against transformers' own hand-written MoE plans (issue 14).

    python -m bench.moe_step [--steps 10] [--backend inductor]   # writes bench/results/moe_step.md

In ONE run, 2 gloo ranks (spawned), the same tiny Mixtral (scaled so the experts dominate) and
the same inputs, for each of
  1. hand TP, eager      transformers' `base_model_tp_plan` for Mixtral (q/k/v colwise, o rowwise,
                         experts `packed_colwise` / `rowwise` under `moe_tp_experts`, embedding
                         rowwise, LM head colwise-gather) applied by
                         `transformers.distributed.tensor_parallel.apply_tensor_parallelism`
  2. hand TP, compiled   the same, each decoder block `torch.compile`d (torchtitan's apply_compile)
  3. hand EP, eager      transformers' TP plan for attention + its `base_model_ep_plan` (experts
                         split over ranks, `ep_dispatch_experts` all-to-all), as `ep_size=tp_size`
  4. autoshard, eager    the cost model's choice between expert tensor parallel and expert parallel
  5. autoshard ETP, eager / lowered / compiled   (`expert_parallel=False`: experts split inside)
  6. autoshard EP, eager (`expert_parallel=True`; expert parallel does not lower yet)
it times a full training step — forward, backward, AdamW (median of `--steps` after warm-up,
barriers around each step), counts its collectives (CommDebugMode) and checks the first step's
loss against the unsharded model's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import traceback

import torch

from bench.train_step import _comms, _machine, _ms, _time_steps, _weigh, _why, run_variants, spawn_ranks, write_result

CONFIG = ("tiny-mixtral", {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                           "num_key_value_heads": 8, "num_hidden_layers": 2, "num_local_experts": 8,
                           "num_experts_per_tok": 2, "vocab_size": 4096})
BATCH, SEQ = 2, 256
VARIANTS = ["hand TP eager", "hand TP compiled", "hand EP eager", "autoshard eager",
            "autoshard ETP eager", "autoshard ETP lowered", "autoshard ETP compiled", "autoshard EP eager"]
BASELINE = {"autoshard ETP compiled": "hand TP compiled", "autoshard EP eager": "hand EP eager"}  # else hand TP eager


def _model():
    from autoshard.configs import build_model, load_config

    cfg = load_config(CONFIG[0])
    for k, v in CONFIG[1].items():
        setattr(cfg, k, v)
    return build_model(cfg, seed=0).train()


def _inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(SEQ)
    return {"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g),
            "labels": torch.randint(0, vocab, (BATCH, SEQ), generator=g)}


def _hand(model, mesh, expert_parallel: bool):
    """transformers' own plans, resolved and applied as `from_pretrained(tp_plan=...)` does."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.expert_parallel import apply_expert_parallelism
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    ws = mesh.size()
    tp_plan, ep_plan, _ = model._resolve_parallel_plans(
        DistributedConfig(tp_size=ws, ep_size=ws if expert_parallel else 1))
    apply_tensor_parallelism(model, mesh, tp_plan)
    if expert_parallel:
        apply_expert_parallelism(model, mesh, mesh, ep_plan)
    return model


def _build(variant: str, mesh, backend: str, notes: list, dynamic: bool = True):
    import autoshard

    model = _model()
    if variant.startswith("hand"):
        _hand(model, mesh, expert_parallel="EP" in variant)
        if "compiled" in variant:
            layers = model.model.layers
            for i, block in enumerate(layers):
                layers[i] = torch.compile(block, backend=backend, dynamic=dynamic)
            notes.append(f"each decoder block torch.compile'd (torchtitan's apply_compile), dynamic={dynamic}")
        return model
    ep = {"ETP": False, "EP": True}.get(variant.split()[1])
    sharded = autoshard.autoshard(model, mesh, example_inputs=_inputs(model.config.vocab_size),
                                  lower="lowered" in variant, expert_parallel=ep,
                                  compile={"backend": backend} if "compiled" in variant else False)
    notes.extend(getattr(sharded, "lowering_notes", []))
    notes.append(f"plan: {sharded.plan.stream} stream, expert parallel blocks {len(sharded.plan.expert_parallel)}, "
                 f"run as {sharded.execution.kind}")
    return sharded


def _loss(out):
    loss = out.loss
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def _variant(variant: str, mesh, args, rank: int, reference: float, dynamic: bool = True) -> dict:
    notes: list[str] = []
    row = {"variant": variant, "notes": notes}
    try:
        run = _build(variant, mesh, args.backend, notes, dynamic)
    except Exception as e:  # noqa: BLE001 - a variant that cannot be built is a result to record
        row["error"] = _why(e)
        return row
    opt = torch.optim.AdamW(run.parameters(), lr=1e-4)
    kw = _inputs(run.config.vocab_size)
    first = []

    def step():
        loss = _loss(run(**kw))
        loss.backward()
        first.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        row["step_s"], first_s = _time_steps(step, args.steps, 2)
        row["compile_s"] = first_s - row["step_s"]
    except Exception as e:  # noqa: BLE001
        if variant.startswith("hand") and "compiled" in variant and dynamic:
            torch._dynamo.reset()   # as torchtitan users do when dynamic shapes fail: static shapes
            sub = _variant(variant, mesh, args, rank, reference, dynamic=False)
            sub["notes"] = [f"dynamic-shape compile failed: {_why(e)}; static shapes instead"] + sub["notes"]
            return sub
        row["error"] = _why(e)
        if rank == 0:
            traceback.print_exc()
        return row
    row["loss_diff"] = abs(first[0] - reference)
    row["comms"] = _weigh(step)
    return row


def _rank(rank: int, ws: int, port: int, args, out) -> None:
    run_variants(rank, ws, port, args.variants, lambda v, mesh: _variant(v, mesh, args, rank, _reference()), out)


@functools.cache
def _reference() -> float:
    """The unsharded model's loss on the bench's inputs (the same random weights every variant gets)."""
    model = _model()
    return float(model(**_inputs(model.config.vocab_size)).loss)


def report(rows: list[dict], before: str, after: str, args) -> str:
    by = {r["variant"]: r for r in rows}
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG[1].items())
    lines = ["# MoE training step: autoshard vs transformers' hand-written MoE plans (gloo, world size 2)", "",
             f"Model: {CONFIG[0]} with {cfg}; batch {BATCH} x seq {SEQ}, fp32, labels. Compile backend: "
             f"{args.backend}, cold inductor cache. Median of {args.steps} steps after 2 warm-up, barriers around each step. "
             "`python -m bench.moe_step`, alone on the machine.", "",
             f"Machine before: {before}", f"Machine after: {after}", "",
             "| variant | step (median) | vs hand | compile (first step - median) | first loss - unsharded | collectives per step (CommDebugMode) |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = by.get(v)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {v} | failed: {r['error']} | - | - | - | - |")
            continue
        base_name = BASELINE.get(v, "hand TP eager")
        base = by.get(base_name, {})
        ratio = f"{r['step_s'] / base['step_s']:.2f}x {base_name}" if base.get("step_s") else "-"
        lines.append(f"| {v} | {_ms(r['step_s'])} | {ratio} | {r['compile_s']:.1f} s | {r['loss_diff']:.1e} | {_comms(r.get('comms'))} |")
    lines += ["", "## Notes", ""]
    lines += [f"- {r['variant']}: {n}" for r in rows for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--out", default="bench/results/moe_step.md")
    args = ap.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    before = _machine()
    rows = spawn_ranks(_rank, args)
    write_result(report(rows, before, _machine(), args), args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
