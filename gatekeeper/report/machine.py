"""The machine outputs of one scan: a SARIF 2.1.0 log for code scanning and the one-line JSON summary
(``gatekeeper scan --sarif``, ``--format json``). Both read the result dict as written."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatekeeper._io import atomic_write_text
from gatekeeper.report import REPORT_MD, RESULT_JSON
from gatekeeper.report.sarif import default_category, path_to_uri, remote_location, to_sarif, validate_category

MANIFEST = "gatekeeper.json"


@dataclasses.dataclass(frozen=True)
class SarifTarget:
    """Where a SARIF alert points: ``uri`` (repository-relative) and, for a stand-in, what it stands for."""

    uri: str
    note: str | None = None


def _repo_relative(path: Path) -> str | None:
    """``path`` relative to the working directory (the repository root in CI), or None outside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (OSError, ValueError):
        return None


def sarif_location(model: str, policy: str, uri: str | None = None) -> SarifTarget:
    """The file a SARIF alert points at, first that applies:

    1. ``uri`` (``--sarif-uri``);
    2. a local model folder under the working directory: its ``gatekeeper.json``;
    3. a remote model (``hf://org/name``, ``models:/name/...``): the stand-in ``hf/org/name`` /
       ``mlflow/name`` (GitHub accepts only repository paths; one that is absent is still shown), with a
       note naming the reference;
    4. a policy file under the working directory (the model could not be found: a usage error);
    5. the stand-in ``local/<folder>/gatekeeper.json`` with a note. Never a shipped policy's name.
    """
    if uri:
        return SarifTarget(path_to_uri(uri))
    manifest = Path(model) / MANIFEST
    rel = _repo_relative(manifest) if manifest.is_file() else None
    if rel is not None:
        return SarifTarget(path_to_uri(rel))
    remote = remote_location(model)
    if remote is not None:
        return SarifTarget(path_to_uri(remote), f"{model}: a remote model, not a file in this repository")
    if Path(policy).is_file() and (rel := _repo_relative(Path(policy))) is not None:
        return SarifTarget(path_to_uri(rel), f"the policy of the scan of {model}")
    name = Path(model.rstrip("/\\")).name or "model"
    if name in (".", ".."):
        name = "model"
    return SarifTarget(path_to_uri(f"local/{name}/{MANIFEST}"), f"{model}: a model folder outside this repository")


def model_category(model: str) -> str:
    """The default code-scanning category of a model reference: ``gatekeeper/hf/org/name``,
    ``gatekeeper/mlflow/name`` or ``gatekeeper/local/<path>`` (relative to the working directory when
    the folder is under it), whatever revision is scanned and however the path is spelled."""
    remote = remote_location(model)
    if remote is not None:
        return default_category(remote)
    rel = _repo_relative(Path(model))
    if rel is None:
        try:
            rel = Path(model).resolve().as_posix()
        except (OSError, ValueError):  # not a path at all (a malformed reference): as written
            rel = model
    return default_category(f"local/{rel.lstrip('/') or '.'}")


def write_sarif(
    path: Path,
    result: dict[str, Any],
    *,
    model: str,
    policy: str,
    uri: str | None = None,
    category: str | None = None,
) -> None:
    """Write the SARIF log of one result atomically.

    Args:
        category: the code-scanning category; None: :func:`model_category` of ``model``.

    Raises:
        OSError: the path cannot be written; ValueError: the result holds a non-finite number;
        UsageError (a ValueError): a bad ``category``.
    """
    target = sarif_location(model, policy, uri)
    sarif = to_sarif(
        [result], target.uri, category=model_category(model) if category is None else category, location_note=target.note
    )
    atomic_write_text(path, json.dumps(sarif, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


class SarifCategoryAction(argparse.Action):
    """``--sarif-category NAME``: validated while the command line is parsed, so a bad name is a usage
    error (exit 4) before anything is fetched or scanned."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, validate_category(str(values)))


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
            write_sarif(
                args.sarif, result, model=args.model, policy=args.policy, uri=args.sarif_uri,
                category=getattr(args, "sarif_category", None),
            )
        except (OSError, ValueError) as exc:
            if wrote_reports:  # a verdict without its SARIF must not look like a clean upload
                raise UsageError(f"cannot write --sarif {args.sarif}: {exc}", "choose a writable path") from None
            say(f"gatekeeper: warning: cannot write --sarif {args.sarif}: {exc}")
    if args.format == "json":
        print(summary_line(result, args.out if wrote_reports else None, code), flush=True)
    if wrote_reports and args.json == Path("-"):
        print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
