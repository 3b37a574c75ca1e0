"""The machine outputs of one scan: a SARIF 2.1.0 log for code scanning and the one-line JSON summary
(``gatekeeper scan --sarif``, ``--format json``). Both read the result dict as written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gatekeeper._io import atomic_write_text
from gatekeeper.report import REPORT_MD, RESULT_JSON
from gatekeeper.report.sarif import path_to_uri, to_sarif


def sarif_target(model: str, policy: str, uri: str | None = None) -> str:
    """The file a SARIF alert points at: ``uri`` if given, else the model's gatekeeper.json under the
    working directory, else the policy (file or shipped name)."""
    if uri:
        return path_to_uri(uri)
    cwd = Path.cwd().resolve()
    for candidate in (Path(model) / "gatekeeper.json", Path(policy)):
        if not candidate.is_file():
            continue
        try:
            return path_to_uri(candidate.resolve().relative_to(cwd).as_posix())
        except ValueError:  # outside the CWD: not a repository path
            continue
    return path_to_uri(policy)  # a shipped policy name or a file outside the repository


def write_sarif(path: Path, result: dict[str, Any], *, model: str, policy: str, uri: str | None = None) -> None:
    """Write the SARIF log of one result atomically.

    Raises:
        OSError: the path cannot be written; ValueError: the result holds a non-finite number.
    """
    sarif = to_sarif([result], sarif_target(model, policy, uri))
    atomic_write_text(path, json.dumps(sarif, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def summary_line(result: dict[str, Any], out: Path | None, exit_code: int) -> str:
    """``{verdict, s_max, threshold, suspect_class, suspect_classes, report, json, exit_code}`` on one
    line; ``out`` None when no report was written (an error)."""
    line = {
        "verdict": result.get("verdict"),
        "s_max": result.get("s_max"),
        "threshold": result.get("threshold"),
        "suspect_class": result.get("suspect_class"),
        "suspect_classes": result.get("suspect_classes") or [],
        "report": str(out / REPORT_MD) if out is not None else None,
        "json": str(out / RESULT_JSON) if out is not None else None,
        "exit_code": int(exit_code),
    }
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False)


def emit(args: Any, code: int, result: dict[str, Any], *, wrote_reports: bool) -> None:
    """What ``gatekeeper scan`` owes machines after a scan (``args``: its parsed arguments): the
    ``--sarif`` file, the ``--format json`` line, the full result for ``--json -``. Never masks the
    scan's outcome: a SARIF that cannot be written next to a verdict is a usage error, after an error
    only a warning."""
    from gatekeeper.errors import UsageError
    from gatekeeper.untrusted import say

    if args.sarif is not None:
        try:
            write_sarif(args.sarif, result, model=args.model, policy=args.policy, uri=args.sarif_uri)
        except (OSError, ValueError) as exc:
            if wrote_reports:  # a verdict without its SARIF must not look like a clean upload
                raise UsageError(f"cannot write --sarif {args.sarif}: {exc}", "choose a writable path") from None
            say(f"gatekeeper: warning: cannot write --sarif {args.sarif}: {exc}")
    if args.format == "json":
        print(summary_line(result, args.out if wrote_reports else None, code), flush=True)
    if wrote_reports and args.json == Path("-"):
        print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
