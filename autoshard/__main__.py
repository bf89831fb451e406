"""Command line: `autoshard demo | plan | calibrate` (also `python -m autoshard ...`)."""

from __future__ import annotations

import argparse
import gc
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        _short_lived_process()
    parser = argparse.ArgumentParser(prog="autoshard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="shard a bundled tiny model over CPU gloo ranks and print its plan")
    demo.add_argument("--world-size", type=int, default=2)
    demo.add_argument("--config", default="tiny-llama")
    demo.add_argument("--seq", type=int, default=7, help="sequence length (7 is not divisible by 2: still exact)")
    demo.add_argument("--html", default=None, metavar="PATH", help="also write the plan as a self-contained HTML page")

    plan = sub.add_parser(
        "plan",
        help="plan a real-scale model for a GPU mesh on this machine (meta tensors, fake process group)",
        description="Plan a model from a transformers config for a mesh of GPUs, with no GPU: the model is built "
        "on meta, a fake process group stands in for the cluster, identical layers are planned once.",
    )
    from autoshard.cli.plan import add_arguments

    add_arguments(plan)

    calibrate = sub.add_parser("calibrate", add_help=False, help="measure this machine's gloo collectives and matmul rate")

    # calibrate's options belong to its own parser (cli/calibrate.py): pass them through
    args, rest = parser.parse_known_args(argv)
    if args.command == "calibrate":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from autoshard.cli.demo import run_demo

        run_demo(args.world_size, args.config, args.seq, args.html)
        return 0
    if args.command == "plan":
        from autoshard.cli.plan import run

        return run(args)
    if args.command == "calibrate":
        from autoshard.cli.calibrate import main as calibrate_main

        return calibrate_main(args.rest)
    return 2


def _short_lived_process() -> None:
    """`autoshard plan` is one short process whose objects (fx graphs, fake tensors) live to the
    end: the cyclic GC only re-walks them (~0.8 s of a 70B plan) and again at exit (~1.5 s).
    Off for this process (peak memory of a 405B plan: 440 -> 455 MB); the objects alive at exit
    are frozen so the interpreter's teardown does not collect them one last time."""
    import atexit

    gc.disable()
    atexit.register(gc.freeze)


if __name__ == "__main__":
    sys.exit(main())
