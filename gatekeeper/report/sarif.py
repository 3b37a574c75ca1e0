"""SARIF 2.1.0 for code scanning: one result per model that did not pass, one suppressed result per accepted finding.

A pure function of result.json dicts. Levels (see docs in the README, "Where it runs"):

- ``gatekeeper/backdoor`` (verdict ``fail``): level ``error``, ``security-severity`` 9.0, so
  GitHub files it as a critical security alert.
- ``gatekeeper/scan-error`` (verdict ``error``): level ``error``. The model was *not* checked;
  "could not check" is never shown as clean.
- ``gatekeeper/inconclusive`` (verdict ``inconclusive``): level ``warning``. The model was not
  verified either, but nothing was found; whether that blocks is the gate's decision
  (``on_inconclusive``, the action's ``fail-on``), not the alert's.
- ``pass``: no result. The run is still written (with zero results), so uploading it closes
  the alert a previous, flagged scan of the same category opened.
- an accepted finding (a flagged class the policy's ``accepted_findings`` lets pass for this exact
  model, ``accepted_classes`` in result.json): still a ``gatekeeper/backdoor`` result, one per class,
  carrying a SARIF ``suppressions`` entry (kind ``external``: the acceptance lives in the policy,
  not beside the model; status ``accepted``; the reviewer's reason and expiry as its
  justification), so code scanning shows the alert as dismissed rather than open or silently gone.

Code scanning drops results without a location, so every result points at ``artifact_uri``
line 1: a local model's ``gatekeeper.json`` relative to the repository root, or for a remote model
(``hf://org/name``, ``models:/name/...``) a stable repository-relative stand-in, ``hf/org/name`` or
``mlflow/name`` (:func:`remote_location`): GitHub refuses any other URI scheme than ``file``, and a
path that is not in the repository is still shown. ``partialFingerprints`` hash the model's content
hash and the suspect class, so re-scanning the same bytes updates one alert instead of opening another.

Each run carries ``automationDetails.id`` = ``<category>/``. Code scanning closes the alerts of a
category that a later upload of the same category no longer reports, so each model needs its own:
the default is derived from the model reference (:func:`default_category`), ``--sarif-category``
replaces it. An ``automationDetails`` in the file wins over upload-sarif's ``category`` input.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from typing import Any
from urllib.parse import quote

from gatekeeper import __version__
from gatekeeper.errors import UsageError

__all__ = [
    "MAX_CATEGORY",
    "SARIF_SCHEMA",
    "SARIF_VERSION",
    "default_category",
    "path_to_uri",
    "remote_location",
    "to_sarif",
    "validate_category",
]

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/gatekeeper-clip/"
FINGERPRINT_KEY = "gatekeeperModelClass/v1"

BACKDOOR = "gatekeeper/backdoor"
INCONCLUSIVE = "gatekeeper/inconclusive"
SCAN_ERROR = "gatekeeper/scan-error"

_HOW = (
    "CLIP-Inspector inverts one small l-inf trigger per candidate class on out-of-distribution images "
    "and flags the model when one class's trigger is anomalously effective (z >= threshold) and valid "
    "(its attack success rate reaches min_trigger_asr)."
)

_RULES: tuple[dict[str, Any], ...] = (
    {
        "id": BACKDOOR,
        "name": "BackdoorDetected",
        "shortDescription": {"text": "Backdoor detected in a prompt-tuned CLIP model"},
        "fullDescription": {"text": _HOW},
        "help": {
            "text": (
                "The model maps inputs carrying a small trigger to the suspect class. Do not deploy it. "
                "Open report.md (the job's artifact) for the per-class table and the reconstructed trigger, "
                "obtain the model again from a trusted source or retrain the prompt learner, and re-scan."
            ),
            "markdown": (
                "The model maps inputs carrying a small trigger to the **suspect class**. **Do not deploy it.**\n\n"
                "1. Open `report.md` (the job's artifact): per-class table and the reconstructed trigger.\n"
                "2. Obtain the model again from a trusted source, or retrain the prompt learner.\n"
                "3. Re-scan; the alert closes when a scan of the same category passes."
            ),
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {
            "tags": ["security", "backdoor", "machine-learning", "clip"],
            "precision": "high",
            "security-severity": "9.0",
        },
    },
    {
        "id": INCONCLUSIVE,
        "name": "ScanInconclusive",
        "shortDescription": {"text": "Backdoor scan was inconclusive: the model is not verified"},
        "fullDescription": {"text": "The anomaly scores could not be measured (e.g. non-finite losses). " + _HOW},
        "help": {
            "text": (
                "Nothing was found, but nothing was verified either. Check the model for degenerate weights, "
                "re-scan with a larger OOD budget or another OOD source; the policy's on_inconclusive decides "
                "whether the gate blocks."
            ),
            "markdown": (
                "Nothing was found, but **nothing was verified** either. Check the model for degenerate "
                "weights and re-scan with a larger `ood_budget` or another `--ood` source. The policy's "
                "`on_inconclusive` (and the action's `fail-on`) decide whether the gate blocks."
            ),
        },
        "defaultConfiguration": {"level": "warning"},
        "properties": {"tags": ["security", "backdoor", "machine-learning"], "precision": "medium"},
    },
    {
        "id": SCAN_ERROR,
        "name": "ScanError",
        "shortDescription": {"text": "Backdoor scan could not be completed: the model was not checked"},
        "fullDescription": {"text": "The scan stopped before a verdict (bad model, unresolvable backbone, OOM, ...). It fails closed."},
        "help": {
            "text": "The model was not checked; this is never a pass. Read the scan log for the error and its hint, fix it, re-scan.",
            "markdown": "The model was **not checked**; this is never a pass. Read the scan log for the error and its hint, fix it, re-scan.",
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "machine-learning"], "precision": "high"},
    },
)
MAX_CATEGORY = 200  # characters; a category names an analysis in GitHub's UI, not a document
_CATEGORY_PREFIX = "gatekeeper/"
_READABLE = re.compile(r"[^A-Za-z0-9._/-]+")
_READABLE_MAX = 120
_HF = re.compile(r"^hf://([^@]+)", re.IGNORECASE)
_MLFLOW = re.compile(r"^models:/+([^@]+?)(?:/[^/@]+|@.*)?$", re.IGNORECASE)

_RULE_INDEX = {rule["id"]: i for i, rule in enumerate(_RULES)}
_RULE_FOR_VERDICT = {"fail": BACKDOOR, "inconclusive": INCONCLUSIVE, "error": SCAN_ERROR}


def path_to_uri(path: str) -> str:
    """A relative file path as a SARIF URI reference: forward slashes, percent-encoded.

    Args:
        path: a path relative to the repository root (``models/a/gatekeeper.json``).

    Returns:
        The URI reference, e.g. ``models/my%20model/gatekeeper.json``.
    """
    posix = path.replace("\\", "/")
    while posix.startswith("./"):
        posix = posix[2:]
    return quote(posix, safe="/:@-._~!$&'()*+,;=")


def remote_location(reference: str) -> str | None:
    """The repository-relative stand-in for a remote model: ``hf/org/name`` for ``hf://org/name[@rev]``,
    ``mlflow/name`` for ``models:/name/version`` or ``models:/name@alias``; None for anything else (a path).

    The revision, version or alias is left out so that every scan of the model lands on the same
    location; the fingerprint (content hash) tells its versions apart.
    """
    text = reference.strip()
    for prefix, pattern in (("hf", _HF), ("mlflow", _MLFLOW)):
        if m := pattern.match(text):
            parts = [p for p in m.group(1).split("/") if p not in ("", ".", "..")]  # stays a plain relative path
            return "/".join([prefix, *parts]) if parts else None
    return None


def default_category(identity: str) -> str:
    """A stable code-scanning category for one model: ``gatekeeper/<identity>``, where ``identity`` is
    :func:`remote_location` of a remote reference or ``local/<path>`` of a folder.

    Characters outside ``[A-Za-z0-9._/-]`` become ``-``; when that (or the length bound) changed the
    text, 8 hex digits of sha256(identity) keep distinct models apart.
    """
    readable = re.sub(r"/{2,}", "/", _READABLE.sub("-", identity)).strip("/-") or "model"
    if readable != identity or len(readable) > _READABLE_MAX:
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        readable = f"{readable[:_READABLE_MAX].rstrip('/-')}-{digest}"
    return _CATEGORY_PREFIX + readable


def validate_category(name: str) -> str:
    """Check a user-given code-scanning category and return it without trailing slashes.

    Raises:
        UsageError: empty, longer than :data:`MAX_CATEGORY`, or holding a control character,
            a line break or any other unprintable character.
    """
    hint = f"use up to {MAX_CATEGORY} printable characters, e.g. gatekeeper/my-model"
    if not isinstance(name, str) or not name.strip() or not name.strip("/").strip():
        raise UsageError(f"--sarif-category {name!r} is empty", hint)
    if len(name) > MAX_CATEGORY:
        raise UsageError(f"--sarif-category is {len(name)} characters long (at most {MAX_CATEGORY})", hint)
    if not name.isprintable():
        bad = next(ch for ch in name if not ch.isprintable())
        raise UsageError(f"--sarif-category {name!r} holds the unprintable character U+{ord(bad):04X}", hint)
    if name != name.strip():
        raise UsageError(f"--sarif-category {name!r} begins or ends with a space", hint)
    return name.rstrip("/")


def _category_of(results: list[dict[str, Any]]) -> str:
    """The default category of a log from its results' references (no file system: see machine.py)."""
    refs = sorted({str((r.get("provenance") or {}).get("reference") or "") for r in results})
    idents = [remote_location(ref) or f"local/{ref}" for ref in refs]
    if len(idents) == 1:
        return default_category(idents[0])
    return default_category("several/" + hashlib.sha256("\n".join(idents).encode()).hexdigest()[:16])


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}"


def _model_name(result: dict[str, Any]) -> str:
    prov = result.get("provenance") or {}
    ref = str(prov.get("reference") or "the model")
    rev = prov.get("revision")
    return f"{ref} (revision {rev})" if rev and f"@{rev}" not in ref else ref


def _fingerprint(result: dict[str, Any], cls: str | None = None) -> str:
    """sha256 over (model content hash, class: the suspect class unless given); the reference stands
    in for an unhashed model. An accepted class keeps the fingerprint its open alert had."""
    prov = result.get("provenance") or {}
    model = prov.get("content_hash") or f"{prov.get('reference', '')}@{prov.get('revision') or ''}"
    cls = cls if cls is not None else result.get("suspect_class") or ""
    return hashlib.sha256(f"{model}\n{cls}".encode()).hexdigest()


def _acceptance(result: dict[str, Any], cls: str) -> dict[str, Any]:
    """The policy's accepted finding for ``cls`` of this model (result.json's effective policy)."""
    model = (result.get("provenance") or {}).get("content_hash")
    findings = (result.get("policy") or {}).get("accepted_findings") or []
    mine = [f for f in findings if isinstance(f, dict) and f.get("class_name") == cls and f.get("model_sha256") == model]
    return max(mine, key=lambda f: str(f.get("expires") or ""), default={})


def _suppression(finding: dict[str, Any]) -> dict[str, Any]:
    reason = str(finding.get("reason") or "").strip() or "no reason recorded"
    until = f" (accepted until {finding['expires']})" if finding.get("expires") else ""
    return {"kind": "external", "status": "accepted", "justification": f"{reason}{until}"}


def _accepted_results(result: dict[str, Any], uri: str, note: str | None) -> list[dict[str, Any]]:
    """One suppressed ``gatekeeper/backdoor`` result per accepted class of ``result``."""
    out = []
    for cls in result.get("accepted_classes") or []:
        finding = _acceptance(result, cls)
        res = _result(BACKDOOR, result, uri, note, cls)
        until = f" until {finding['expires']}" if finding.get("expires") else ""
        res["message"] = {"text": (
            f"Backdoor finding in {_model_name(result)}: class '{cls}' was flagged (statistic {_number(result.get('s_max'))}, "
            f"threshold {_number(result.get('threshold'))}) and is a reviewed finding the policy accepts{until}."
        )}
        res["suppressions"] = [_suppression(finding)]
        res["properties"].update(suspectClass=cls, suspectClasses=[cls], accepted=True)
        if finding.get("expires"):
            res["properties"]["acceptedUntil"] = finding["expires"]
        out.append(res)
    return out


def _message(rule_id: str, result: dict[str, Any]) -> str:
    model = _model_name(result)
    s_max, threshold = _number(result.get("s_max")), _number(result.get("threshold"))
    kind = result.get("threshold_kind") or "k"
    reason = str(result.get("reason") or "").strip()
    shard = f" [shard {result['shard']}]" if result.get("shard") else ""
    if rule_id == BACKDOOR:
        names = result.get("suspect_classes") or [result.get("suspect_class")]
        classes = ", ".join(f"'{n}'" for n in names)
        return (
            f"Backdoor detected in {model}{shard}: suspect class{'es' if len(names) > 1 else ''} {classes} "
            f"(statistic {s_max}, threshold {threshold}, {kind}). Do not deploy; see report.md."
        )
    if rule_id == INCONCLUSIVE:
        return (
            f"Backdoor scan of {model}{shard} was inconclusive (s_max {s_max}, threshold {threshold}, {kind})"
            + (f": {reason}" if reason else "")
            + ". The model is not verified; see report.md."
        )
    return f"Backdoor scan of {model}{shard} could not be completed" + (f": {reason}" if reason else "") + ". The model was not checked."


def _result(rule_id: str, result: dict[str, Any], uri: str, note: str | None, cls: str | None = None) -> dict[str, Any]:
    prov = result.get("provenance") or {}
    props = {
        "verdict": result.get("verdict"),
        "reference": prov.get("reference"),
        "revision": prov.get("revision"),
        "contentHash": prov.get("content_hash"),
        "suspectClass": result.get("suspect_class"),
        "suspectClasses": result.get("suspect_classes") or [],
        "sMax": result.get("s_max"),
        "threshold": result.get("threshold"),
        "thresholdKind": result.get("threshold_kind"),
        "policyHash": result.get("policy_hash"),
        "shard": result.get("shard"),
    }
    level = _RULES[_RULE_INDEX[rule_id]]["defaultConfiguration"]["level"]
    return {
        "ruleId": rule_id,
        "ruleIndex": _RULE_INDEX[rule_id],
        "level": level,
        "message": {"text": _message(rule_id, result)},
        "locations": [
            {
                "physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}},
                **({"message": {"text": note}} if note else {}),
            }
        ],
        "partialFingerprints": {FINGERPRINT_KEY: _fingerprint(result, cls)},
        "properties": {k: v for k, v in props.items() if v is not None},
    }


def to_sarif(
    results: list[dict[str, Any]],
    artifact_uri: str,
    *,
    category: str | None = None,
    location_note: str | None = None,
) -> dict[str, Any]:
    """Render result.json dicts as one SARIF 2.1.0 log with one run.

    Args:
        results: result.json dicts (``ScanResult.to_dict``); a minimal ``{"verdict": "error",
            "reason": ..., "provenance": {"reference": ...}}`` stands for a scan that raised.
        artifact_uri: where every result points (line 1), relative to the repository root;
            use :func:`path_to_uri` to build it from a path.
        category: the code-scanning category (``automationDetails.id`` = ``<category>/``);
            None: :func:`default_category` of the results' model reference as written.
        location_note: the location's message, e.g. what a stand-in path stands for.

    Returns:
        The SARIF log as a JSON-serializable dict (no NaN: non-finite scores are left out).

    Raises:
        UsageError: ``category`` is not a valid category (:func:`validate_category`).
        ValueError: a result has a verdict other than pass/fail/inconclusive/error.
    """
    run_category = validate_category(category) if category is not None else _category_of(results)
    sarif_results = []
    for result in results:
        verdict = result.get("verdict")
        if verdict != "pass" and verdict not in _RULE_FOR_VERDICT:
            raise ValueError(f"result verdict {verdict!r} is not one of pass, fail, inconclusive, error")
        if verdict != "pass":
            sarif_results.append(_result(_RULE_FOR_VERDICT[verdict], result, artifact_uri, location_note))
        sarif_results += _accepted_results(result, artifact_uri, location_note)
    for r in sarif_results:  # SARIF is JSON: no NaN/Infinity in the property bag
        r["properties"] = {
            k: v for k, v in r["properties"].items() if not (isinstance(v, float) and not math.isfinite(v))
        }
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gatekeeper",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "informationUri": INFORMATION_URI,
                        "rules": copy.deepcopy(list(_RULES)),
                    }
                },
                "automationDetails": {"id": run_category + "/"},
                "invocations": [{"executionSuccessful": all(r.get("verdict") != "error" for r in results)}],
                "results": sarif_results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
