"""The family sweep: every causal-LM family transformers ships, tiny and random, sharded by
autoshard at tp 2 and 4, DTensor program and lowered; `bench/results/families.md`.

    python -m bench.families [--tp 2 4] [--only llama,qwen2] [--lower both|dtensor|lowered]

Each family x tp x program runs `tests.families.sweep_one` on every rank of a gloo world and is
classified (see tests/families.py VERDICTS). Results are appended to a JSONL cache as they come
(`--cache`, default /tmp/autoshard_families.jsonl) so an interrupted sweep resumes where it stopped
(`--fresh` ignores it); the markdown is rebuilt from the cache after every family.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

GLOO_TIMEOUT_S = float(os.environ.get("AUTOSHARD_SWEEP_GLOO_TIMEOUT", "60"))
os.environ.setdefault("AUTOSHARD_TEST_TIMEOUT", "150")  # tests.dist reads it at import

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "families.md")


def make_pool(ws: int):
    """tests.dist's rank pool with a shorter gloo timeout: a rank left alone in a collective by a
    crashed peer gives up in GLOO_TIMEOUT_S instead of 120 s."""
    from tests.dist import RankPool

    return RankPool(ws, gloo_timeout_s=GLOO_TIMEOUT_S)


_DESYNC = re.compile(r"timed out|timeout|gloo|connection|closed|broken pipe", re.I)


def run_family(pool, model_type: str, lower: bool) -> tuple[dict, bool]:
    """(merged record, whether the pool should be restarted)."""
    from tests.families import merge_ranks, sweep_one

    t = time.time()
    try:
        rec = merge_ranks(pool.run(sweep_one, model_type, lower))
    except TimeoutError as e:  # the pool already restarted itself
        return {"model_type": model_type, "lower": lower, "tp": pool.world_size, "verdict": "pool-timeout",
                "error_type": "TimeoutError", "error": str(e), "seconds": round(time.time() - t, 1)}, False
    except AssertionError as e:  # a rank raised out of sweep_one (it should not); pool restarted
        return {"model_type": model_type, "lower": lower, "tp": pool.world_size, "verdict": "rank-disagree",
                "error_type": "RankError", "error": str(e)[-300:], "seconds": round(time.time() - t, 1)}, False
    rec["seconds"] = round(time.time() - t, 1)
    restart = rec["verdict"] == "rank-disagree" or (
        rec["verdict"] in ("crash-after-plan", "plan-crashed", "capture-failed") and bool(_DESYNC.search(rec.get("error", ""))))
    return rec, restart


# ---- markdown ----------------------------------------------------------------------------------

def _short_reason(r: str) -> str:
    r = re.sub(r"\s+", " ", r).strip()
    return r[:70] + ("…" if len(r) > 70 else "")


def _weight_score(fqn: str) -> int:
    low = fqn.lower()
    return (-2 if ("norm" in low or "bias" in low) else 0) + any(
        k in low for k in ("proj", "expert", "dense", "fc", "query", "c_attn", "wqkv", "w1", "w2", "embed", "lm_head"))


def _replicated_summary(rec: dict) -> str:
    rep = rec.get("replicated")
    if rep is None:
        return ""
    if not rep:
        return "none"
    by = collections.Counter(_short_reason(v) for v in rep.values())
    example = {}
    for fqn, why in rep.items():  # name a weight matrix rather than a norm or a bias where there is one
        w = _short_reason(why)
        if w not in example or _weight_score(fqn) > _weight_score(example[w]):
            example[w] = fqn
    parts = [f"{n}× {why} (e.g. `{example[why]}`)" for why, n in by.most_common(2)]
    if len(by) > 2:
        parts.append(f"+{len(by) - 2} more reasons")
    return "; ".join(parts).replace("|", "/")


def _err(rec: dict) -> str:
    if rec.get("verdict") == "mismatch":
        d = rec.get("diffs", {})
        return "diffs " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
    if "error" not in rec:
        return ""
    msg = re.sub(r"\s+", " ", rec["error"]).strip()[:140]
    where = rec.get("autoshard_frame") or rec.get("frame") or ""
    phase = f" (in {rec['phase']})" if rec.get("phase") else ""
    return f"{rec.get('error_type', '')}: {msg} @ {where}{phase}".replace("|", "/")


def _verdict_cell(rec: dict | None) -> str:
    if rec is None:
        return "—"
    v = rec["verdict"]
    if rec.get("lower") and v == "exact":
        v += " (lowered)" if rec.get("lowered") else " (fell back to DTensor)"
    return v


def _split_section(latest: dict) -> list[str]:
    """How many families that build hold at most 1/tp + 5 % of the parameters per rank, and which do not."""
    out = ["", "## Parameters per rank", "",
           "Families whose tiny model builds and shards (a `params/rank` figure, from the DTensor run), by the",
           "fraction of the model's parameter bytes rank 0 holds; the target is at most 1/tp + 5 %. Tiny models",
           "over-weight norms, biases and small tables: a 64-wide model's norm is a larger share than a 4096-wide one's.", "",
           "| tp | families | at most 1/tp + 5 % | share |", "|---|---|---|---|"]
    over = {}
    for tp in sorted({tp for _, tp, _ in latest}):
        fracs = {m: r["param_fraction"] for (m, t, lower), r in latest.items() if t == tp and not lower and "param_fraction" in r}
        ok = [m for m, f in fracs.items() if f <= 1 / tp + 0.05]
        over[tp] = sorted(((f, m) for m, f in fracs.items() if f > 1 / tp + 0.05), reverse=True)
        out.append(f"| {tp} | {len(fracs)} | {len(ok)} | {100 * len(ok) / max(len(fracs), 1):.0f} % |")
    for tp, rows in over.items():
        if rows:
            out += ["", f"Above 1/tp + 5 % at tp {tp} (why: the family's row below): "
                    + ", ".join(f"{m} {f:.2f}" for f, m in rows)]
    return out


def write_markdown(records: list[dict], path: str = OUT) -> None:
    from tests.families import families

    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r["model_type"], r["tp"], r["lower"])] = r
    order = {f: i for i, f in enumerate(families())}
    keys = sorted({(m, tp) for m, tp, _ in latest}, key=lambda k: (k[1], order.get(k[0], 1e9), k[0]))
    counts = collections.Counter((tp, lower, r["verdict"]) for (m, tp, lower), r in latest.items())
    lines = [
        "# Family sweep", "",
        "Every causal-LM family in `transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`,",
        "built tiny and random (`tests/families.py: tiny_config`: hidden 64, 2 layers, 4 heads / 2 KV, vocab 256,",
        "MoE 4 experts top-2, float32, seed 0, train mode, no dropout), sharded by `autoshard.autoshard` on gloo",
        "CPU ranks with batch 2, sequence 7 and labels, compared against the unsharded model (`use_cache=False`):",
        "loss, logits and every gradient within 1e-4 (relative to magnitude). `python -m bench.families`.", "",
        "Verdicts: **exact**; **refused** (PlanError at plan time); **capture-failed** / **plan-crashed** (another",
        "exception inside `autoshard()`, in the capture pass / elsewhere); **crash-after-plan** (forward or",
        "backward raised); **mismatch**; **build-failed** (the tiny model itself cannot be built or run — not",
        "autoshard's doing); **rank-disagree** / **pool-timeout** (ranks differed / hung).", "",
        "## Counts", "",
        "| tp | program | " + " | ".join(f"{v}" for v in sorted({v for _, _, v in counts})) + " |",
        "|---|---|" + "---|" * len({v for _, _, v in counts}),
    ]
    vs = sorted({v for _, _, v in counts})
    for tp in sorted({k[0] for k in counts}):
        for lower in (False, True):
            if any(k[0] == tp and k[1] == lower for k in counts):
                lines.append(f"| {tp} | {'lowered' if lower else 'DTensor'} | " + " | ".join(str(counts.get((tp, lower, v), 0)) for v in vs) + " |")
    lines += _split_section(latest)
    fallbacks = collections.Counter()
    for (m, tp, lower), r in latest.items():
        for note in r.get("lowering_notes") or []:
            note = re.sub(r"\s+", " ", note).replace("program 1: not lowered, runs on DTensors eagerly: ", "")
            fallbacks[(tp, re.sub(r"\b\w+_\d+\b", "<node>", note)[:110])] += 1
    if fallbacks:
        lines += ["", "lower=True runs that fell back to the DTensor program (`sharded.lowering_notes`), by reason:", "",
                  "| tp | runs | reason |", "|---|---|---|"]
        lines += [f"| {tp} | {n} | {why.replace('|', '/')} |" for (tp, why), n in fallbacks.most_common()]
    for tp in sorted({k[1] for k in latest}):
        missing = [f for f in families() if (f, tp, False) not in latest or (f, tp, True) not in latest]
        if missing:
            lines += ["", f"Not yet run at tp {tp} ({len(missing)}; `python -m bench.families --tp {tp}` resumes from its cache): "
                      + ", ".join(missing)]
    lines += ["", "## Per family", "",
              "| family | tp | DTensor | lowered | params/rank | replicated (why) | failure |", "|---|---|---|---|---|---|---|"]
    for m, tp in keys:
        d, lo = latest.get((m, tp, False)), latest.get((m, tp, True))
        any_rec = d or lo
        frac = next((f"{r['param_fraction']:.2f}" for r in (d, lo) if r and "param_fraction" in r), "")
        rep = next((_replicated_summary(r) for r in (d, lo) if r and r.get("replicated") is not None), "")
        errs = []
        for tag, r in (("DTensor", d), ("lowered", lo)):
            if r and r["verdict"] != "exact":
                e = _err(r)
                if e and not (tag == "lowered" and d and _err(d) == e):
                    errs.append(f"{tag}: {e}" if r["verdict"] != "build-failed" or tag == "DTensor" else e)
            if r and r.get("lower") and r.get("lowering_notes"):
                note = re.sub(r"\s+", " ", r["lowering_notes"][0]).replace("program 1: not lowered, runs on DTensors eagerly: ", "")
                errs.append("lowering fell back: " + note[:160].replace("|", "/"))
        lines.append(f"| {m} | {tp} | {_verdict_cell(d)} | {_verdict_cell(lo)} | {frac} | {rep} | {'<br>'.join(errs)} |")
        del any_rec
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_cache(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--only", default="", help="comma-separated model types (default: every family)")
    ap.add_argument("--lower", choices=["both", "dtensor", "lowered"], default="both")
    ap.add_argument("--cache", default="/tmp/autoshard_families.jsonl")
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) the cache")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)

    from tests.families import families

    fams = [f for f in args.only.split(",") if f] or families()
    lowers = {"both": [False, True], "dtensor": [False], "lowered": [True]}[args.lower]
    if args.fresh and os.path.exists(args.cache):
        os.remove(args.cache)
    records = load_cache(args.cache)
    done = {(r["model_type"], r["tp"], r["lower"]) for r in records}
    for tp in args.tp:
        pool = make_pool(tp)
        try:
            for i, f in enumerate(fams):
                built = None
                for lower in lowers:
                    if (f, tp, lower) in done:
                        continue
                    if built is not None and built["verdict"] == "build-failed":
                        rec = dict(built, lower=lower, seconds=0.0)  # same model, same reason
                    else:
                        rec, restart = run_family(pool, f, lower)
                        if restart:
                            pool.restart()
                    built = rec
                    records.append(rec)
                    with open(args.cache, "a") as fh:
                        fh.write(json.dumps(rec, default=str) + "\n")
                    print(f"[tp{tp} {i + 1}/{len(fams)}] {f:26s} {'lowered' if lower else 'DTensor'}: {rec['verdict']:16s} "
                          f"{rec.get('seconds', 0):6.1f}s {_err(rec)[:150]}", flush=True)
                write_markdown(records, args.out)
        finally:
            pool.close(graceful=False)
    write_markdown(records, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
