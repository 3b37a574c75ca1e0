"""SARIF 2.1.0 for code scanning: one result per model that did not pass.

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

Code scanning drops results without a location, so every result points at ``artifact_uri``
line 1 (the model's ``gatekeeper.json`` or the policy file, relative to the repository root).
``partialFingerprints`` hash the model's content hash and the suspect class, so re-scanning the
same bytes updates one alert instead of opening another.
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any
from urllib.parse import quote

from gatekeeper import __version__

__all__ = ["SARIF_SCHEMA", "SARIF_VERSION", "path_to_uri", "to_sarif"]

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


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}"


def _model_name(result: dict[str, Any]) -> str:
    prov = result.get("provenance") or {}
    ref = str(prov.get("reference") or "the model")
    rev = prov.get("revision")
    return f"{ref} (revision {rev})" if rev and f"@{rev}" not in ref else ref


def _fingerprint(result: dict[str, Any]) -> str:
    """sha256 over (model content hash, suspect class); the reference stands in for an unhashed model."""
    prov = result.get("provenance") or {}
    model = prov.get("content_hash") or f"{prov.get('reference', '')}@{prov.get('revision') or ''}"
    cls = result.get("suspect_class") or ""
    return hashlib.sha256(f"{model}\n{cls}".encode()).hexdigest()


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


def _result(rule_id: str, result: dict[str, Any], uri: str) -> dict[str, Any]:
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
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}}}],
        "partialFingerprints": {FINGERPRINT_KEY: _fingerprint(result)},
        "properties": {k: v for k, v in props.items() if v is not None},
    }


def to_sarif(results: list[dict[str, Any]], artifact_uri: str) -> dict[str, Any]:
    """Render result.json dicts as one SARIF 2.1.0 log with one run.

    Args:
        results: result.json dicts (``ScanResult.to_dict``); a minimal ``{"verdict": "error",
            "reason": ..., "provenance": {"reference": ...}}`` stands for a scan that raised.
        artifact_uri: where every result points (line 1), relative to the repository root;
            use :func:`path_to_uri` to build it from a path.

    Returns:
        The SARIF log as a JSON-serializable dict (no NaN: non-finite scores are left out).

    Raises:
        ValueError: a result has a verdict other than pass/fail/inconclusive/error.
    """
    sarif_results = []
    for result in results:
        verdict = result.get("verdict")
        if verdict == "pass":
            continue
        if verdict not in _RULE_FOR_VERDICT:
            raise ValueError(f"result verdict {verdict!r} is not one of pass, fail, inconclusive, error")
        sarif_results.append(_result(_RULE_FOR_VERDICT[verdict], result, artifact_uri))
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
                "invocations": [{"executionSuccessful": all(r.get("verdict") != "error" for r in results)}],
                "results": sarif_results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
