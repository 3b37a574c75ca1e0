"""The command line: argparse, progress display, printing, and every outcome mapped to an exit code.

Exit codes: 0 pass, 1 backdoor detected, 2 scan could not complete, 3 inconclusive, 4 usage/policy.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatekeeper import __version__
from gatekeeper.errors import ExitCode, GatekeeperError, UsageError, exit_code_for
from gatekeeper.progress import Progress
from gatekeeper.untrusted import inert, say

EXIT_HELP = """exit codes:
  0  pass: no backdoor found
  1  fail: backdoor detected
  2  the scan could not be completed (error; fails closed, never a pass)
  3  inconclusive (fails the gate unless the policy says on_inconclusive: pass)
  4  usage or policy error (checked before any model is fetched)
"""
POLICY_HELP = (
    "policy YAML file, or a shipped policy name (default, tiny-world); without --policy: "
    "./.gatekeeper.yaml when the current directory has one, else default"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 by default; ours is 4
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gatekeeper",
        description="Gate prompt-tuned CLIP models (CoOp/CoCoOp/MaPLe/zero-shot) on backdoors with CLIP-Inspector.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    scan = sub.add_parser(
        "scan",
        help="scan one model and write report.md, result.json and trigger images",
        description="Invert a trigger per candidate class on OOD images, score anomalies, decide, report.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("model", help="local model folder, or hf://org/name[@revision]")
    scan.add_argument("--revision", help="Hub revision (branch, tag or commit sha); same as @rev in the reference")
    scan.add_argument("--policy", help=POLICY_HELP)
    scan.add_argument("--ood", default="procedural", help="OOD pool: procedural[:SEED] (built in) or dir:PATH")
    scan.add_argument("--out", required=True, type=Path, help="output folder for report.md, result.json, triggers/")
    scan.add_argument("--json", type=Path, help="also write the JSON result to this path (- for stdout)")
    scan.add_argument(
        "--shard",
        help="i/n: invert only the i-th of n shares of the candidate classes and write a partial result "
        "(partial.json) to --out; no verdict until `gatekeeper merge` combines all n",
    )
    # --- machine outputs (SARIF, --format json) ---
    scan.add_argument("--sarif", type=Path, help="also write a SARIF 2.1.0 log (code scanning) to this path")
    scan.add_argument(
        "--sarif-uri",
        help="file the SARIF result points at, relative to the repo root "
        "(default: the model's gatekeeper.json when the model is a folder under the current directory; "
        "for hf:// and models:/ references the stand-in path hf/ORG/NAME or mlflow/NAME, with a message naming the reference)",
    )
    from gatekeeper.report.machine import SarifCategoryAction

    scan.add_argument(
        "--sarif-category",
        metavar="NAME",
        action=SarifCategoryAction,
        help="code-scanning category of the SARIF run (automationDetails.id NAME/); alerts of one category are "
        "closed only by uploads of that category (default: derived from the model reference, e.g. gatekeeper/hf/org/name)",
    )
    scan.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="json: print one line {verdict, s_max, threshold, suspect_class, suspect_classes, report, json, exit_code} to stdout",
    )
    # --- end machine outputs ---
    _common(scan)

    merge = sub.add_parser(
        "merge",
        help="combine the partial results of `scan --shard i/n` into the verdict and report of one scan",
        description="Refuses a shard set that misses or repeats shards or classes, or mixes models, policies or pools.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("partials", nargs="+", type=Path, help="shard output folders (or their partial.json)")
    merge.add_argument("--out", required=True, type=Path, help="output folder for report.md, result.json, triggers/")
    merge.add_argument("--json", type=Path, help="also write the JSON result to this path")
    merge.add_argument("--quiet", action="store_true")
    merge.add_argument("--debug", action="store_true")

    cal = sub.add_parser(
        "calibrate",
        help="choose tau on s_max by Youden's J from scans of known clean and backdoored models (or copies built on --backbone); write a policy",
        description="tau replaces k, and only for the |C|, OOD budget and epsilon the scans were made with.",
    )
    cal.add_argument("--clean", nargs="+", type=Path, help="result.json of known clean models")
    cal.add_argument("--backdoored", nargs="+", type=Path, help="result.json of known backdoored models")
    cal.add_argument(
        "--backbone",
        type=Path,
        metavar="MODEL",
        help="instead of scan results: build clean and BadCLIP-planted copies of this model folder's prompt learner "
        "on its own backbone (trained on OOD images labelled zero-shot) and calibrate on their scans",
    )
    cal.add_argument("--policy", help=f"with --backbone: the policy to calibrate: {POLICY_HELP}")
    cal.add_argument("--copies", type=int, default=4, help="with --backbone: clean and planted copies each (default 4)")
    cal.add_argument("--epochs", type=int, default=12, help="with --backbone: training epochs per copy (default 12)")
    cal.add_argument(
        "--ood",
        help="with --backbone: the OOD pool the copies are trained and scanned on, as for scan: procedural[:SEED] "
        "(default) or dir:PATH; use the pool your scans use",
    )
    cal.add_argument("--device", default="auto", help="with --backbone: auto, cpu, cuda, cuda:N")
    cal.add_argument("--out", type=Path, required=True, help="policy YAML to write (must not exist)")
    cal.add_argument("--debug", action="store_true")

    rep = sub.add_parser(
        "repair",
        help="re-align a flagged model with its reconstructed trigger, re-scan it, and report before/after",
        description=(
            "Fine-tunes the prompt learner (encoders frozen) on clean (x, y) and triggered (x + delta, y) pairs, where "
            "delta is the scan's inverted trigger of the flagged class (paper Sec. 5.3). Writes OUT/model (a new model "
            "folder; the input is never touched), OUT/scan (the re-scan under the same policy and pool), "
            "OUT/repair.md and OUT/repair.json. Exit code: that of the re-scan (0 pass, 1 still flagged, 3 inconclusive)."
        ),
    )
    rep.add_argument("model", type=Path, help="the flagged gatekeeper model folder")
    rep.add_argument("--scan", type=Path, required=True, help="its scan's result.json (or the scan's output folder)")
    rep.add_argument(
        "--data", type=Path, required=True, help="labelled images: one sub-folder per class name ('_' for spaces)"
    )
    rep.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    rep.add_argument("--class", dest="class_name", help="repair this class instead of the scan's suspect")
    rep.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs over the training split (default 5)")
    rep.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    rep.add_argument(
        "--test-fraction", type=float, default=0.3, help="share of each class held out for before/after (default 0.3)"
    )
    _common(rep)

    demo = sub.add_parser(
        "demo",
        help="scan the bundled tiny-world demo zoo (one clean, one backdoored model), offline",
        description="Scans zoo/demo/clean and zoo/demo/backdoored with the tiny-world policy.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("gatekeeper-demo"), help="output folder (default ./gatekeeper-demo)"
    )
    _common(demo)

    conv = sub.add_parser(
        "convert",
        help="convert an official CoOp/CoCoOp/MaPLe/BadCLIP (Dassl) checkpoint to a gatekeeper model folder",
        description="Reads only tensors and plain containers: the pickle is inspected statically before loading.",
    )
    conv.add_argument("checkpoint", type=Path, help="e.g. prompt_learner/model.pth.tar-50")
    conv.add_argument(
        "--sidecar",
        type=Path,
        required=True,
        help="YAML naming backbone, classnames (optional: recovered from the checkpoint when absent), ctx_init, "
        "image_size; Dassl/CoOp config names (trainer, prec, TRAINER.COOP.N_CTX, TRAINER.MAPLE.PROMPT_DEPTH, ...) are read too",
    )
    conv.add_argument(
        "--backbone",
        metavar="PATH|hf-hub:ORG/REPO|NAME[:TAG]",
        help="the backbone, replacing the sidecar's: a local open_clip folder (copied into the model folder), "
        "an open_clip Hub repo, or a built-in name and pretrained tag (e.g. ViT-B-16:openai); it must load now",
    )
    conv.add_argument("--out", type=Path, required=True, help="new (empty) output folder")
    conv.add_argument("--debug", action="store_true", help="show tracebacks")

    aud = sub.add_parser(
        "audit",
        help="re-audit every model of an inventory YAML (cached by content, policy, pool, version); writes summary.md/.json",
        description="Validates the whole inventory first (exit 4); one model that cannot be scanned is an error, "
        "the others still run. Exit code: the worst model, ordered 2 error > 1 backdoor > 3 inconclusive > 0 pass. "
        "Docs: docs/audit.md",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    aud.add_argument(
        "inventory", type=Path, help="inventory YAML: version, policy, ood, models [{name, model, revision, policy}]"
    )
    aud.add_argument(
        "--out", required=True, type=Path, help="output folder: <name>/ per model, summary.md, summary.json"
    )
    aud.add_argument("--cache", type=Path, help="result cache folder (default OUT/.cache)")
    aud.add_argument(
        "--policy",
        help="replaces the inventory's shared policy (per-model policy: still wins); an inventory without a shared "
        "policy uses ./.gatekeeper.yaml when the current directory has one, else default",
    )
    _common(aud)

    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors (also GATEKEEPER_DEBUG=1)")


# ---------------------------------------------------------------------------- helpers


def _announce(outcome: Any, label: str, quiet: bool) -> None:
    """The verdict line and where the report is (the library prints nothing)."""
    if not quiet:
        say(f"{label}: {outcome.verdict.upper()} - {outcome.result.get('reason', '')}")
        say(f"{label}: report {outcome.paths['markdown']}")


def _policy(args: argparse.Namespace, label: str) -> tuple[str, list[str]]:
    """``--policy``, else the project's ./.gatekeeper.yaml (validated now: exit 4 naming it), else default;
    and what to add to the recorded command so that it names the policy the run used."""
    from gatekeeper.policy import resolve_policy

    policy, discovered = resolve_policy(args.policy, Path())
    if not discovered:
        return policy, []
    if not getattr(args, "quiet", False):
        say(f"{label}: policy {policy} (found in the current directory; --policy overrides it)")
    return policy, ["--policy", policy]


# ---------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.report.machine import emit
    from gatekeeper.scan import ScanRequest, error_result, run_scan

    if args.shard and (args.sarif or args.json or args.format == "json"):
        raise UsageError("--shard writes a partial result only", "use --sarif/--json/--format with `gatekeeper merge`")
    to_stdout = args.json == Path("-")
    if to_stdout and args.format == "json":
        raise UsageError("--json - and --format json both write to stdout", "choose one")
    policy, named = _policy(args, "scan")
    request = ScanRequest(
        args.model,
        args.out,
        policy=policy,
        ood=args.ood,
        json_path=None if to_stdout else args.json,
        stale=(args.sarif,) if args.sarif else (),
        device=args.device,
        revision=args.revision,
        command="gatekeeper " + shlex.join(argv + named),
        shard=args.shard,
    )
    if args.shard:
        outcome = run_scan(request, Progress(args.quiet, f"scan {args.shard}"))
        if not args.quiet:
            say(
                f"scan: shard {args.shard} ({outcome.result['classes']} classes) written to "
                f"{outcome.paths['partial']}; no verdict until merge"
            )
        return outcome.exit_code
    try:
        outcome = run_scan(request, Progress(args.quiet, "scan"))
    except Exception as exc:  # still tell machine consumers; main() prints the error and picks the code
        emit(args, exit_code_for(exc), error_result(args.model, exc), wrote_reports=False)
        raise
    _announce(outcome, "scan", args.quiet)
    emit(args, outcome.exit_code, outcome.result, wrote_reports=True)
    return outcome.exit_code


def cmd_merge(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.scan import merge_scan

    outcome = merge_scan(args.partials, args.out, args.json, "gatekeeper " + shlex.join(argv))
    _announce(outcome, "merge", args.quiet)
    return outcome.exit_code


def cmd_calibrate(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.calibrate import run_calibrate

    policy = _policy(args, "calibrate")[0] if args.backbone is not None else "default"  # else: the scans' policy
    report = run_calibrate(
        args.out, clean=args.clean, backdoored=args.backdoored, backbone=args.backbone, policy=policy,
        copies=args.copies, epochs=args.epochs, device=args.device, log=say, ood=args.ood,
    )
    cal = report.calibration
    say(
        f"tau = {cal.tau:.3f} (AUROC {report.auroc:.3f}, TPR {report.tpr:.2f}, FPR {report.fpr:.2f}) for "
        f"|C| = {cal.n_candidates}, ood_budget = {cal.ood_budget}; written to {args.out}",
        err=False,
    )
    return ExitCode.PASS


def cmd_demo(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.scan import run_demo

    ok = True
    for name, outcome, expected in run_demo(args.out, args.device, lambda label: Progress(args.quiet, label)):
        _announce(outcome, f"demo/{name}", args.quiet)
        r, control = outcome.result, outcome.result.get("positive_control")
        flagged = ", ".join(r.get("suspect_classes") or []) or "none"
        print(f"{name:>10}: {outcome.verdict.upper():5} statistic {r['s_max']:.2f} vs {r.get('threshold_kind')} "
              f"{r['threshold']:.2f}; flagged: {inert(flagged)}")
        if control:
            print(f"{'':>10}  positive control: planted to {inert(repr(control['target']))} (ASR "
                  f"{control['planted_asr']:.0%}), {'caught' if control['caught'] else 'NOT caught'}, {control['seconds']:.0f}s")
        # the demo shows what it claims only if each verdict is as expected and every planted control is caught
        ok = ok and outcome.exit_code == expected and (not control or bool(control["caught"]))
    print(f"demo {'OK' if ok else 'UNEXPECTED'}: reports in {args.out}/clean and {args.out}/backdoored")
    return ExitCode.PASS if ok else ExitCode.BACKDOOR


def cmd_convert(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.models.checkpoint import convert_checkpoint

    done = convert_checkpoint(args.checkpoint, args.sidecar, args.out, backbone=args.backbone)
    manifest = done.manifest
    say(
        f"wrote {args.out} ({manifest.kind.value}, {len(manifest.classnames)} classes, n_ctx {manifest.n_ctx}); "
        f"class names from {done.classnames_from}{''.join(f'; {n}' for n in done.notes)}; "
        f"backbone {inert(done.backbone_from, 300)}",
        err=False,
    )
    return ExitCode.PASS


def cmd_audit(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.inventory import load_inventory, run_audit
    from gatekeeper.policy import find_project_policy
    from gatekeeper.scan import prepare_out, resolve_device

    project = find_project_policy(Path())
    inventory = load_inventory(  # all of it, before any scan (exit 4)
        args.inventory, default_policy=args.policy, project_policy=None if project is None else str(project)
    )
    resolve_device(args.device)
    prepare_out(args.out)
    code, _ = run_audit(
        inventory, args.out, cache=args.cache, device_name=args.device, quiet=args.quiet,
        progress_for=lambda label: Progress(args.quiet, label),
    )
    if not args.quiet:
        say(f"gatekeeper audit: exit {int(code)}; summary {args.out / 'summary.md'}")
    return code


def cmd_repair(args: argparse.Namespace, argv: list[str]) -> ExitCode:
    from gatekeeper.repair import RepairSettings, run_repair

    settings = RepairSettings(epochs=args.epochs, lr=args.lr, test_fraction=args.test_fraction)
    done = run_repair(
        args.model, args.scan, args.data, args.out, settings=settings, class_name=args.class_name,
        device=args.device, command="gatekeeper " + shlex.join(argv), progress=Progress(args.quiet, "re-scan"),
    )
    if not args.quiet:
        b, a = done.before, done.after
        say(
            f"repair: {done.cls!r} trigger ASR {b['trigger_asr']:.1%} -> {a['trigger_asr']:.1%}, clean accuracy "
            f"{b['clean_accuracy']:.1%} -> {a['clean_accuracy']:.1%}; re-scan {done.rescan.get('verdict')}; {done.report}"
        )
    return ExitCode(done.exit_code)


COMMANDS = {
    "repair": cmd_repair,
    "audit": cmd_audit,
    "calibrate": cmd_calibrate,
    "merge": cmd_merge,
    "scan": cmd_scan,
    "demo": cmd_demo,
    "convert": cmd_convert,
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, a pipeline timeout): stop like Ctrl-C, with no verdict."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """The ``gatekeeper`` console script."""
    if argv is None:  # a process of its own: keep the scan's large blocks mapped (gatekeeper/_alloc.py)
        from gatekeeper._alloc import heap_mode

        heap_mode()
    return run(build_parser, COMMANDS, argv)


def run(parser: Callable[[], argparse.ArgumentParser], commands: dict[str, Any], argv: list[str] | None) -> int:
    """Parse ``argv``, run the command, map every outcome to an exit code (also for ``gatekeeper-lab``)."""
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("GATEKEEPER_DEBUG") == "1" or "--debug" in argv
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if not argv:  # no command: the usage, and the usage-error code
            parser().print_help()
            return int(ExitCode.USAGE)
        args = parser().parse_args(argv)
        return int(commands[args.command](args, argv))
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        say(f"gatekeeper: {what}; no verdict (fails closed)")
        return int(ExitCode.SCAN_ERROR)
    except GatekeeperError as exc:
        if debug:
            traceback.print_exc()
        say(f"gatekeeper: error: {exc.one_line()}")
        return int(exc.exit_code)
    except Exception as exc:  # anything unexpected fails closed
        if debug:
            traceback.print_exc()
        say(
            f"gatekeeper: internal error ({type(exc).__name__}: {str(exc)[:300]}); no verdict, failing closed "
            "-> re-run with --debug and report it",
        )
        return int(exit_code_for(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
