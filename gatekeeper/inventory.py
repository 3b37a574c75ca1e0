"""Scheduled re-audits of the models already in a registry: ``gatekeeper audit INVENTORY.yaml``.

An inventory lists models by reference (local folder, ``hf://``, ``models:/``). The whole file,
every reference's syntax and every policy are validated before any model is touched (exit 4).
Then each model is resolved (to learn its content hash), looked up in a plain-folder cache keyed
by ``sha256(content hash, policy digest, OOD spec, gatekeeper version)``, and scanned on a miss.
One model that cannot be resolved or scanned is recorded as ``error`` and the audit goes on; it
is never a pass. The exit code is the worst per-model code in the order 2 > 1 > 3 > 0.
Docs: docs/audit.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatekeeper import __version__
from gatekeeper import scan as scanning
from gatekeeper.errors import ExitCode, GatekeeperError, PolicyError, UsageError
from gatekeeper.policy import Policy, load_policy, load_project_policy
from gatekeeper.result import Verdict
from gatekeeper.scan import ScanRequest
from gatekeeper.tracking import ScanProgress, no_ticks
from gatekeeper.untrusted import DocumentError, load_yaml, say

INVENTORY_VERSION = 1
CACHE_DIR = ".cache"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
CACHEABLE = ("pass", "fail", "inconclusive")  # complete results only; errors are never cached
# worst first: an error (2) beats a backdoor (1) beats inconclusive (3) beats pass (0)
SEVERITY = {ExitCode.SCAN_ERROR: 3, ExitCode.BACKDOOR: 2, ExitCode.INCONCLUSIVE: 1, ExitCode.PASS: 0}
_TOP_KEYS = frozenset({"version", "policy", "ood", "models"})
_ENTRY_KEYS = frozenset({"name", "model", "revision", "policy"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RESERVED = {SUMMARY_MD.lower(), SUMMARY_JSON.lower()}

ProgressFor = Callable[[str], ScanProgress]  # a progress display for the scan of one entry, by label


@dataclass(frozen=True)
class Entry:
    """One model of the inventory, validated."""

    index: int
    name: str
    reference: str  # as written in the inventory
    target: str  # what is resolved/scanned: local paths made absolute (relative to the inventory)
    revision: str | None
    policy_arg: str  # what load_policy reads (a shipped name or a path)
    policy: Policy


@dataclass(frozen=True)
class Inventory:
    """A validated inventory file."""

    path: Path
    ood: str
    entries: tuple[Entry, ...]


# ---------------------------------------------------------------------------- parsing


def _where(path: Path, index: int | None = None, name: str | None = None) -> str:
    if index is None:
        return str(path)
    return f"{path}: models[{index}]" + (f" ({name})" if name else "")


def _policy_arg(value: Any, base: Path, where: str, key: str) -> str:
    """A shipped policy name stays a name; anything else is a path relative to ``base``."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: {key} must be a policy name or file path, got {value!r}", "e.g. policy: default")
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if candidate.exists() or "/" in value or p.suffix:
        return str(candidate)
    return value  # a shipped name such as default or tiny-world


def _load_policy(arg: str, where: str, key: str, cache: dict[str, Policy]) -> Policy:
    if arg not in cache:
        try:
            cache[arg] = load_policy(arg)
        except PolicyError as exc:
            raise PolicyError(f"{where}: {key}: {exc.message}", exc.hint, file=exc.file or arg, key=key) from None
    return cache[arg]


def _ood(value: Any, base: Path, where: str) -> str:
    from gatekeeper.ood import DIR, check_spec

    if not isinstance(value, str):
        raise UsageError(f"{where}: ood must be a string, got {value!r}", "use procedural, procedural:SEED or dir:PATH")
    try:
        check_spec(value)
    except UsageError as exc:
        raise UsageError(f"{where}: ood: {exc.message}", exc.hint) from None
    if value.startswith(DIR):  # a pool folder relative to the inventory file, made absolute
        folder = Path(value[len(DIR) :]).expanduser()
        return DIR + str(folder if folder.is_absolute() else (base / folder).resolve())
    return value


def _reference(entry: dict[str, Any], base: Path, where: str) -> tuple[str, str, str | None]:
    from gatekeeper.sources import parse_reference
    from gatekeeper.sources.base import validate_revision

    ref = entry["model"]
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError(
            f"{where}: model must be a non-empty reference, got {ref!r}",
            "a folder, hf://org/name or models:/name/version",
        )
    revision = entry.get("revision")
    if revision is not None:
        if not isinstance(revision, str):
            raise UsageError(f"{where}: revision must be a string, got {revision!r}", "quote it, e.g. revision: 'v1.0'")
        try:
            validate_revision(revision)
        except UsageError as exc:
            raise UsageError(f"{where}: revision: {exc.message}", exc.hint) from None
    try:
        scheme, target, ref_revision = parse_reference(ref)
    except UsageError as exc:
        raise UsageError(f"{where}: model: {exc.message}", exc.hint) from None
    if scheme == "local":
        if revision is not None:
            raise UsageError(
                f"{where}: revision given for the local folder {ref!r}", "drop revision, or use hf://org/name@revision"
            )
        p = Path(target).expanduser()
        return ref, str(p if p.is_absolute() else base / p), None
    if scheme == "hf" and revision is not None and ref_revision is not None and revision != ref_revision:
        raise UsageError(
            f"{where}: two revisions given: {ref_revision!r} in model and revision {revision!r}",
            "give the revision once",
        )
    return ref, ref, revision


def load_inventory(path: str | Path, *, default_policy: str | None = None, project_policy: str | None = None) -> Inventory:
    """Read and validate the whole inventory, every policy included, before anything is scanned.

    Args:
        path: the inventory YAML file.
        default_policy: ``--policy`` from the command line: replaces the inventory's shared
            ``policy:`` (per-model ``policy:`` still wins); relative to the current directory.
        project_policy: the project's ``.gatekeeper.yaml`` found in the current directory: the
            shared policy of an inventory that names none (instead of the shipped default).

    Raises:
        UsageError: the file is missing or not YAML, an unknown or missing key, a bad name,
            reference or OOD spec, or a duplicate name (message names file, entry and key).
        PolicyError: a policy is missing or invalid (message names file, entry and key).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"inventory file not found: {path}", "give the path of an inventory YAML file (docs/audit.md)")
    try:
        raw = load_yaml(path, str(path))
    except DocumentError as exc:
        raise UsageError(str(exc), "fix the inventory file (plain YAML, each key once)") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the inventory must be a mapping with version and models", "see docs/audit.md")
    unknown = sorted(str(k) for k in raw if k not in _TOP_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}", f"allowed keys: {', '.join(sorted(_TOP_KEYS))}")
    if raw.get("version") != INVENTORY_VERSION:
        raise UsageError(
            f"{path}: version: expected {INVENTORY_VERSION}, got {raw.get('version')!r}", "write version: 1"
        )
    base = path.resolve().parent
    policies: dict[str, Policy] = {}
    if default_policy is not None:
        shared = default_policy
    elif "policy" in raw:
        shared = _policy_arg(raw["policy"], base, str(path), "policy")
    else:
        shared = project_policy or "default"
    if shared == project_policy:
        try:
            policies[shared] = load_project_policy(shared)
        except PolicyError as exc:
            raise PolicyError(f"{path}: policy: {exc.message}", exc.hint, file=exc.file, key="policy") from None
    _load_policy(shared, str(path), "policy", policies)
    ood = _ood(raw.get("ood", "procedural"), base, str(path))
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path}: models must be a non-empty list", "list entries {name, model}")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(models):
        where = _where(
            path, i, item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None
        )
        if not isinstance(item, dict):
            raise UsageError(f"{where}: an entry must be a mapping {{name, model}}, got {item!r}", "see docs/audit.md")
        unknown = sorted(str(k) for k in item if k not in _ENTRY_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}", f"allowed keys: {', '.join(sorted(_ENTRY_KEYS))}")
        for key in ("name", "model"):
            if key not in item:
                raise UsageError(f"{where}: missing key {key!r}", "every entry needs name and model")
        name = item["name"]
        if not isinstance(name, str) or not _NAME.match(name) or name.lower() in _RESERVED or name.lower() == CACHE_DIR:
            raise UsageError(
                f"{where}: name {name!r} is not a usable id",
                "use letters, digits, '.', '_' or '-' (it names the output folder), not summary.md/summary.json",
            )
        if name.lower() in seen:
            raise UsageError(
                f"{where}: duplicate name {name!r} (also models[{seen[name.lower()]}])", "names must be unique"
            )
        seen[name.lower()] = i
        reference, target, revision = _reference(item, base, where)
        arg = _policy_arg(item["policy"], base, where, "policy") if "policy" in item else shared
        policy = _load_policy(arg, where, "policy", policies)
        entries.append(Entry(i, name, reference, target, revision, arg, policy))
    return Inventory(path=path, ood=ood, entries=tuple(entries))


# ---------------------------------------------------------------------------- cache


def cache_key(content_hash: str, policy_digest: str, ood: str, version: str = __version__) -> str:
    """sha256 over the content hash, policy digest, OOD spec and gatekeeper version."""
    blob = json.dumps(
        {"content_hash": content_hash, "policy": policy_digest, "ood": ood, "gatekeeper": version},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_result(folder: Path) -> dict[str, Any] | None:
    from gatekeeper.report import RESULT_JSON

    try:
        data = json.loads((folder / RESULT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cache_lookup(cache: Path, key: str, content_hash: str) -> dict[str, Any] | None:
    """The cached result for ``key`` if complete and for the same content; else None."""
    result = _read_result(cache / key)
    if result is None or result.get("verdict") not in CACHEABLE:
        return None
    if (result.get("provenance") or {}).get("content_hash") != content_hash:
        return None
    return result


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a sibling temp folder, then swap it in."""
    from gatekeeper._io import atomic_folder

    with atomic_folder(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def cache_store(cache: Path, key: str, folder: Path) -> None:
    """Copy a finished scan's folder into the cache; best effort (a failure only loses the hit)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _replace_tree(folder, cache / key)
    except OSError as exc:
        say(f"gatekeeper audit: warning: cannot write cache entry {cache / key}: {exc}")


# ---------------------------------------------------------------------------- audit


def code_for(verdict: str, policy: Policy) -> ExitCode:
    """The exit code of one result, as ``gatekeeper scan`` would return it (an unknown verdict: error)."""
    known = {v.value: v for v in Verdict}
    return known.get(verdict, Verdict.ERROR).exit_code(policy.on_inconclusive)


def worst(codes: list[ExitCode]) -> ExitCode:
    """The overall exit code: 2 (error) > 1 (backdoor) > 3 (inconclusive) > 0 (pass)."""
    return max(codes, key=lambda c: SEVERITY[c], default=ExitCode.PASS)


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, GatekeeperError):
        return exc.one_line()
    return f"internal error ({type(exc).__name__}: {str(exc)[:300]})"


def _audit_one(
    entry: Entry, inv: Inventory, out: Path, cache: Path, *, progress_for: ProgressFor, device_name: str
) -> dict[str, Any]:
    from gatekeeper.report import REPORT_MD, RESULT_JSON
    from gatekeeper.sources import resolve

    folder = out / entry.name
    record: dict[str, Any] = {
        "name": entry.name,
        "reference": entry.reference,
        "revision": entry.revision,
        "policy": entry.policy_arg,
        "policy_digest": entry.policy.digest(),
        "ood": inv.ood,
        "verdict": "error",
        "exit_code": int(ExitCode.SCAN_ERROR),
        "s_max": None,
        "threshold": None,
        "suspect_class": None,
        "cached": False,
        "content_hash": None,
        "cache_key": None,
        "report": None,
        "result": None,
        "error": None,
    }
    t0 = time.time()
    try:
        shutil.rmtree(folder, ignore_errors=True)  # never leave an older run's report behind
        resolved = resolve(entry.target, revision=entry.revision)
        content_hash = resolved.provenance.content_hash
        record["content_hash"] = content_hash
        key = cache_key(content_hash, entry.policy.digest(), inv.ood)
        result = cache_lookup(cache, key, content_hash)
        if result is not None:
            _replace_tree(cache / key, folder)
            record["cached"] = True
        else:
            command = f"gatekeeper audit {inv.path} (entry {entry.name})"
            request = ScanRequest(
                entry.target, folder, policy=entry.policy_arg, ood=inv.ood, device=device_name,
                revision=entry.revision, command=command,
            )
            result = scanning.run_scan(request, progress_for(f"audit/{entry.name}")).result
            scanned_hash = (result.get("provenance") or {}).get("content_hash") or content_hash
            key = cache_key(scanned_hash, entry.policy.digest(), inv.ood)  # the bytes actually scanned
            record["content_hash"] = scanned_hash
            if result.get("verdict") in CACHEABLE:
                cache_store(cache, key, folder)
        record["cache_key"] = key
        verdict = str(result.get("verdict"))
        record.update(
            verdict=verdict if verdict in CACHEABLE else "error",
            exit_code=int(code_for(verdict, entry.policy)),
            s_max=result.get("s_max"),
            threshold=result.get("threshold"),
            suspect_class=result.get("suspect_class"),
            report=f"{entry.name}/{REPORT_MD}" if (folder / REPORT_MD).is_file() else None,
            result=f"{entry.name}/{RESULT_JSON}" if (folder / RESULT_JSON).is_file() else None,
        )
        if verdict not in CACHEABLE:
            record["error"] = str(result.get("reason") or f"the scan ended with verdict {verdict!r}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad model never stops the audit, and is never a pass
        record["error"] = _error_message(exc)
    record["seconds"] = round(time.time() - t0, 3)
    return record


def run_audit(
    inv: Inventory,
    out: Path,
    *,
    cache: Path | None = None,
    device_name: str = "auto",
    quiet: bool = False,
    progress_for: ProgressFor = lambda label: no_ticks,
) -> tuple[ExitCode, dict[str, Any]]:
    """Audit every entry (from the cache, or with :func:`gatekeeper.scan.run_scan`), write
    summary.md/summary.json; returns (worst code, summary). ``quiet`` silences the per-model lines."""
    from gatekeeper._io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    cache = out / CACHE_DIR if cache is None else cache
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    records = []
    for n, entry in enumerate(inv.entries, 1):
        if not quiet:
            say(f"gatekeeper audit: [{n}/{len(inv.entries)}] {entry.name} ({entry.reference})")
        record = _audit_one(entry, inv, out, cache, progress_for=progress_for, device_name=device_name)
        if not quiet:
            detail = record["error"] or f"s_max={record['s_max']} suspect={record['suspect_class']}"
            tag = " (cached)" if record["cached"] else ""
            say(f"gatekeeper audit: {entry.name}: {record['verdict'].upper()}{tag} {detail}")
        records.append(record)
    code = worst([ExitCode(r["exit_code"]) for r in records])
    counts = {v: sum(r["verdict"] == v for r in records) for v in (*CACHEABLE, "error")}
    summary = {
        "version": 1,
        "gatekeeper_version": __version__,
        "inventory": str(inv.path),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overall": {"exit_code": int(code), "counts": counts, "cached": sum(r["cached"] for r in records)},
        "models": records,
    }
    atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(out / SUMMARY_MD, render_summary(summary))
    return code, summary


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def render_summary(summary: dict[str, Any]) -> str:
    """The Markdown table of an audit summary."""
    from gatekeeper.report.markdown import md_code, md_escape

    overall = summary["overall"]
    counts = ", ".join(f"{v} {k}" for k, v in overall["counts"].items())
    lines = [
        "# gatekeeper audit",
        "",
        f"Inventory {md_code(summary['inventory'])}, gatekeeper {md_escape(summary['gatekeeper_version'])}, "
        f"{md_escape(summary['started'])} to {md_escape(summary['finished'])}.",
        "",
        f"**Exit code {overall['exit_code']}** ({counts}; {overall['cached']} from cache). "
        "Worst first: 2 error > 1 backdoor > 3 inconclusive > 0 pass.",
        "",
        "| name | reference | verdict | s_max | suspect class | cached | report | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["models"]:
        report = f"[report]({r['report']})" if r["report"] else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    md_escape(r["name"]),
                    md_escape(r["reference"]),
                    f"**{r['verdict'].upper()}**",
                    _num(r["s_max"]),
                    md_escape(r["suspect_class"]) if r["suspect_class"] else "",
                    "yes" if r["cached"] else "no",
                    report,
                    md_escape(r["error"]) if r["error"] else "",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
