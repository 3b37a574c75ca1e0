"""``gatekeeper-lab``: the research tools beside the gate (red-team zoos and benchmarks).

The gate never imports this module, ``gatekeeper.redteam`` or ``gatekeeper.bench``
(``tests/test_imports.py``); they need the ``lab`` extra (``pip install gatekeeper-clip[lab]``).
Exit codes and error handling are the gate's own (:func:`gatekeeper.cli.run`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gatekeeper.cli import _Parser, run
from gatekeeper.errors import ExitCode
from gatekeeper.untrusted import say


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gatekeeper-lab",
        description="Research tools: build red-team zoos on the tiny CLIP world and benchmark the gate on them.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = sub.add_parser(
        "bench",
        help="benchmarks (speed: fast path vs reference; detection: detectors on a red-team zoo; screening: does the screening keep "
        "every true target; repair: CI trigger vs controls)",
        add_help=False,
    )
    bench.add_argument("bench_command", choices=["speed", "detection", "repair", "screening"], help="which benchmark")
    bench.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `gatekeeper-lab bench speed --help`)"
    )

    zoo = sub.add_parser("zoo", help="build or describe red-team zoos (tiny CLIP world)")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    zb = zsub.add_parser(
        "build",
        help="build a named zoo into a folder, skipping what is built",
        description="Prompt-tune the models of a named zoo on the tiny CLIP world, implanting each entry's attack, and "
        "write a gatekeeper model folder plus a NAME.truth/ ground-truth sidecar (attack, target, trigger) per model. "
        "Models whose folder and truth already exist are skipped, so an interrupted build resumes. Zoos: demo (1 clean + "
        "1 BadCLIP, the committed zoo/demo), attacks (every attack on two tasks: the red-team table), bench (the detection "
        "benchmark's zoo: clean seeds and every attack on nine tasks, 75 models). Settings and why: docs/tiny-world.md.",
    )
    zb.add_argument("name", help="zoo name: demo, attacks or bench")
    zb.add_argument("--out", type=Path, required=True, help="zoo folder (created; existing models are kept)")
    zb.add_argument("--backbone", type=Path, help="backbone folder (default: the committed tiny backbone)")
    zb.add_argument("--shard", help="i/n: build only every n-th model from the i-th (run n processes on one zoo)")
    zb.add_argument("--debug", action="store_true")
    zt = zsub.add_parser(
        "table",
        help="print clean accuracy and true-trigger ID/OOD ASR per model",
        description="Re-measure every model of a built zoo: clean accuracy on fresh task images, the true trigger's "
        "in-distribution and OOD attack success rate, the OOD base rate (same images, no trigger) and the trigger "
        "probe (can the frozen encoder see the trigger at all: 50 %% = no). Prints a Markdown table.",
    )
    zt.add_argument("folder", type=Path, help="a zoo folder built by `gatekeeper-lab zoo build`")
    zt.add_argument("--markdown", type=Path, help="also write the table here")
    zt.add_argument("--debug", action="store_true")
    zp = zsub.add_parser(
        "backbone",
        help="pretrain the tiny CLIP backbone from its seed (deterministic)",
        description="Pretrain the tiny CLIP (open_clip CLIP class, 3-layer ViT, 32 px) contrastively on the procedural "
        "world, then fine-tune it adversarially, and write it as an open_clip folder with pretrain_stats.json "
        "(zero-shot accuracy, settings, sha256). With the defaults it rebuilds the committed zoo/backbone bit for bit "
        "(2 threads, deterministic algorithms; measured 19-24 min on two CPU cores).",
    )
    zp.add_argument("--out", type=Path, required=True, help="output folder for the backbone")
    zp.add_argument("--seed", type=int, default=0, help="world and training seed (default 0: the committed backbone)")
    zp.add_argument(
        "--steps", type=int, default=2500, help="contrastive pretraining steps (default 2500: the committed backbone)"
    )
    zp.add_argument("--debug", action="store_true")
    return p


def cmd_zoo(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.redteam import zoo

    if args.zoo_command == "build":
        from gatekeeper.shard import parse_shard

        zoo.build(args.name, args.out, args.backbone, parse_shard(args.shard) if args.shard else (1, 1))
    elif args.zoo_command == "table":
        text = zoo.table(args.folder)
        say(text, err=False)
        if args.markdown:
            args.markdown.write_text(text + "\n")
    elif args.zoo_command == "backbone":
        zoo.build_backbone(args.out, seed=args.seed, steps=args.steps)
    return ExitCode.PASS


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    if args.bench_command == "repair":
        from gatekeeper.bench import repair as repair_bench

        return ExitCode(repair_bench.main(args.rest))
    if args.bench_command == "screening":
        from gatekeeper.bench import screening

        return ExitCode(screening.main(args.rest))
    if args.bench_command == "detection":
        from gatekeeper.bench import detection

        return ExitCode(detection.main(args.rest))
    from gatekeeper.bench import speed

    return ExitCode(speed.main(args.rest))


COMMANDS = {"zoo": cmd_zoo, "bench": cmd_bench}


BENCH_HELP = """usage: gatekeeper-lab bench {speed,detection,repair} [options]

  speed      the fast CLIP-Inspector path against the reference, on random weights
  detection  every detector on a red-team zoo: AUROC, accuracy, per-class F1, the verdict rules
  repair     repair with CLIP-Inspector's trigger against three controls, on a red-team zoo

Each benchmark's own options: gatekeeper-lab bench NAME --help
"""


def main(argv: list[str] | None = None) -> int:
    """The ``gatekeeper-lab`` console script."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "bench" and (len(args) == 1 or args[1] in ("-h", "--help")):
        print(BENCH_HELP, end="")  # the benchmarks parse their own options; this lists them
        return int(ExitCode.PASS if len(args) > 1 else ExitCode.USAGE)
    return run(build_parser, COMMANDS, args)
