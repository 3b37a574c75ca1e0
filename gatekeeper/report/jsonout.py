"""The JSON result: strict serialization (no NaN), atomic writes, schema validation.

``jsonschema`` is a dev dependency: when it is importable the result is validated against
``schemas/result.schema.json`` in full; otherwise a small built-in check covers the required
top-level keys and the verdict.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from gatekeeper._io import atomic_write_text
from gatekeeper.errors import ResultError
from gatekeeper.resources import data_path
from gatekeeper.result import ScanResult

SCHEMA_FILE = "result.schema.json"
_VERDICTS = ("pass", "fail", "inconclusive", "error")


@lru_cache(maxsize=1)
def _load_schema_text() -> str:
    path = data_path("schemas") / SCHEMA_FILE
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultError(
            f"cannot read the result schema {path}: {exc}", "reinstall gatekeeper (the schema ships with it)"
        ) from exc


def load_schema() -> dict[str, Any]:
    """The result JSON Schema (draft 2020-12), a fresh copy on every call."""
    schema = json.loads(_load_schema_text())
    if not isinstance(schema, dict):
        raise ResultError(f"{SCHEMA_FILE} is not a JSON object", "reinstall gatekeeper")
    return schema


def result_to_dict(result: Any) -> dict[str, Any]:
    """``ScanResult.to_dict()`` with unmeasurable numbers mapped to null.

    An inconclusive or error verdict may carry non-finite ``s_max`` and per-class losses or
    scores (a degenerate model); the JSON then says null. For pass/fail, non-finite numbers are
    left in place and refused on write (they would be a bug).
    """
    d: dict[str, Any] = result.to_dict()
    if d.get("verdict") not in ("error", "inconclusive"):
        return d

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    d["s_max"] = clean(d.get("s_max"))
    d["classes"] = [{k: clean(v) for k, v in c.items()} for c in d.get("classes", [])]
    return d


def dumps(result_dict: dict[str, Any]) -> str:
    """Serialize with indent 2; NaN/Infinity anywhere raise :class:`ResultError`."""
    try:
        return json.dumps(result_dict, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except ValueError as exc:
        raise ResultError(
            f"the result contains a non-finite number (NaN/Infinity) and cannot be written as JSON: {exc}",
            "this is a bug in the scoring stage; report it with the scan log",
        ) from exc
    except TypeError as exc:
        raise ResultError(f"the result holds a value that is not JSON-serializable: {exc}") from exc


def write_json(result_dict: dict[str, Any], path: Path) -> None:
    """Write the result as indented JSON, atomically; NaN is refused (:class:`ResultError`)."""
    atomic_write_text(Path(path), dumps(result_dict))


def _field_path(parts: Any) -> str:
    out = "/".join(str(p) for p in parts)
    return out or "<root>"


def validate_result(d: dict[str, Any]) -> None:
    """Validate a result dict against the schema.

    Raises:
        ResultError: naming the path of the first failing field (e.g. ``classes/0/asr``).
    """
    if not isinstance(d, dict):
        raise ResultError(f"a result must be a JSON object, got {type(d).__name__}")
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - exercised only without the dev extra
        _validate_minimal(d)
        return

    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    errors = sorted(validator.iter_errors(d), key=lambda e: (list(e.absolute_path), e.message))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors) or errors[0]
    parts = list(err.absolute_path)
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        if missing:
            parts.append(missing[0])
    where = _field_path(parts)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ResultError(
        f"result does not match schema {SCHEMA_FILE} at {where}: {err.message}{more}",
        "the result file is corrupt or from an incompatible gatekeeper version",
    )


def _validate_minimal(d: dict[str, Any]) -> None:
    """Fallback without jsonschema: required keys, schema version, verdict."""
    schema = load_schema()
    for key in schema.get("required", []):
        if key not in d:
            raise ResultError(f"result does not match schema {SCHEMA_FILE} at {key}: '{key}' is a required property")
    if d.get("schema_version") != "1.0":
        raise ResultError(f"result does not match schema {SCHEMA_FILE} at schema_version: expected '1.0'")
    if d.get("verdict") not in _VERDICTS:
        raise ResultError(
            f"result does not match schema {SCHEMA_FILE} at verdict: {d.get('verdict')!r} is not one of {_VERDICTS}"
        )
    if not isinstance(d.get("classes"), list):
        raise ResultError(f"result does not match schema {SCHEMA_FILE} at classes: not an array")


def load_result(path: Path) -> ScanResult:
    """A scan's result.json, typed (see :func:`read_result`).

    Raises:
        ResultError: unreadable, not JSON, or not a gatekeeper scan result.
    """
    d = read_result(path)
    try:
        return ScanResult.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultError(f"{path} is not a complete gatekeeper scan result ({type(exc).__name__}: {exc})",
                          "give the result.json of `gatekeeper scan`") from None


def read_result(path: Path) -> dict[str, Any]:
    """A scan's result.json (the file, or the scan's output folder holding it).

    Raises:
        ResultError: unreadable, not JSON, or not a gatekeeper scan result (no classes/policy).
    """
    file = path / "result.json" if path.is_dir() else path
    try:
        d = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultError(f"cannot read scan result {file}: {exc}", "give the result.json (or output folder) of `gatekeeper scan`") from None
    if not isinstance(d, dict) or "classes" not in d or "policy" not in d:
        raise ResultError(f"{file} is not a gatekeeper scan result", "give the result.json of `gatekeeper scan`")
    return d
