"""A model version in an MLflow Model Registry: ``models:/name/version`` or ``models:/name@alias``.

The registry is reached with the real MLflow client (``mlflow.MlflowClient``) at
``MLFLOW_TRACKING_URI`` (``MLFLOW_REGISTRY_URI`` when set). The version's artifacts are
downloaded into a fresh folder and must be a gatekeeper model folder: ``gatekeeper.json`` at the
root or under one subfolder. Nothing is ever loaded through MLflow (no pyfunc, no pickle); an
artifact tree without ``gatekeeper.json`` or holding pickle files is refused.

Credentials (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ``user:pass@`` in a URI)
never appear in a message, a hint or the provenance.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gatekeeper.errors import GatekeeperError, SourceError
from gatekeeper.result import Provenance
from gatekeeper.sources._redact import MAX_DETAIL, public_url, redact
from gatekeeper.sources.base import NETWORK_NOTE, REGISTRY_RETRIES, REGISTRY_TIMEOUT_S, ResolvedModel, hash_folder

INSTALL_HINT = "pip install gatekeeper-clip[mlflow]"
DOWN_HINT = "registry is down or MLFLOW_TRACKING_URI is wrong; check the URL, the network and MLFLOW_TRACKING_TOKEN"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".cloudpickle", ".dill")
MANIFEST = "gatekeeper.json"
_DOWN_MARKERS = (
    "max retries exceeded",
    "connection refused",
    "failed to establish a new connection",
    "connectionerror",
    "connecttimeout",
    "read timed out",
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
    "remotedisconnected",
    "connection aborted",
)


def _import_mlflow() -> Any:
    try:
        import mlflow  # lazy: heavy, and optional
        from mlflow.artifacts import download_artifacts  # noqa: F401  (checks the artifacts module too)
    except ImportError as exc:
        raise SourceError(
            f"MLflow references need the mlflow package ({exc.name or 'mlflow'} missing)", INSTALL_HINT
        ) from None
    return mlflow


def _is_down(exc: BaseException) -> bool:
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in _DOWN_MARKERS)


def map_mlflow_error(exc: BaseException, name: str, selector: str, host: str, step: str) -> GatekeeperError:
    """Translate an MLflow client error into a :class:`SourceError` with an actionable hint.

    Args:
        exc: what the MLflow client raised.
        name: the registered model name.
        selector: the version (``"3"``) or ``"@alias"``.
        host: the registry URL without credentials (for messages).
        step: what was being done (``"look up"`` or ``"download"``).

    Returns:
        A :class:`SourceError`; its message and hint never hold a credential.
    """
    what = f"'{name}' alias '{selector[1:]}'" if selector.startswith("@") else f"'{name}' version {selector}"
    detail = redact(f"{type(exc).__name__}: {exc}").replace("\n", " ")[:MAX_DETAIL]
    if _is_down(exc):
        return SourceError(f"cannot reach the MLflow registry at {host} to {step} model {what}: {detail}", DOWN_HINT)
    code = str(getattr(exc, "error_code", "") or "")
    status = getattr(exc, "get_http_status_code", None)
    http = status() if callable(status) else None
    if code == "RESOURCE_DOES_NOT_EXIST" or http == 404 or "not found" in detail.lower():
        if selector.startswith("@"):
            hint = (
                "check the model name and the alias (MLflow UI, or MlflowClient().get_registered_model(name).aliases)"
            )
        else:
            hint = (
                "check the model name and version (MLflow UI, or MlflowClient().search_model_versions(\"name='...'\"))"
            )
        return SourceError(f"MLflow model {what} not found in the registry at {host}", hint)
    if code in {"PERMISSION_DENIED", "UNAUTHENTICATED"} or http in {401, 403}:
        return SourceError(
            f"the MLflow registry at {host} refused access to model {what}",
            "set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME/PASSWORD) for an account with read access",
        )
    if code == "INVALID_PARAMETER_VALUE" and selector.startswith("@"):
        return SourceError(
            f"MLflow model {what} not found in the registry at {host}: {detail}",
            "check the model name and the alias (models:/name@alias)",
        )
    return SourceError(f"MLflow {step} of model {what} at {host} failed: {detail}", "retry; " + DOWN_HINT)


def find_model_root(root: Path, what: str) -> Path:
    """The gatekeeper model folder inside downloaded artifacts: ``root`` or its one subfolder holding it.

    Raises:
        SourceError: no ``gatekeeper.json`` (e.g. an MLflow pyfunc/pickled model), several
            candidates, or pickle files in the model folder.
    """
    if (root / MANIFEST).is_file():
        folder = root
    else:
        candidates = sorted(p.parent for p in root.glob(f"*/{MANIFEST}") if p.is_file())
        if not candidates:
            flavour = (
                " (an MLflow flavour, e.g. pyfunc/pickle, which gatekeeper never loads)"
                if any(root.glob("MLmodel")) or any(root.glob("*/MLmodel"))
                else ""
            )
            raise SourceError(
                f"the artifacts of MLflow model {what} are not a gatekeeper model folder{flavour}: "
                f"no {MANIFEST} at the root or under one subfolder",
                "log the gatekeeper model folder itself as the version's artifacts (mlflow.log_artifacts(folder, 'model'))",
            )
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates[:5])
            raise SourceError(
                f"the artifacts of MLflow model {what} hold several gatekeeper model folders ({names})",
                "register one model folder per model version",
            )
        folder = candidates[0]
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(
            f"the artifacts of MLflow model {what} hold pickle files ({', '.join(pickles[:5])}); they are refused unloaded",
            "register only the gatekeeper model folder (safetensors + JSON), not a pickled MLflow flavour",
        )
    return folder


def _cache_root(cache_dir: str | None) -> Path:
    root = Path(
        cache_dir or os.environ.get("GATEKEEPER_MLFLOW_CACHE") or Path.home() / ".cache" / "gatekeeper" / "mlflow"
    )
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(
            f"cannot create the MLflow download folder {root}: {exc.strerror or exc}", "pass a writable cache folder"
        ) from None
    return root


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "model"


@contextlib.contextmanager
def _bounded_http() -> Iterator[None]:
    """The MLflow client's request timeout and retries, bounded (its defaults retry for minutes).

    A value the user exported (``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``..._MAX_RETRIES``,
    ``..._BACKOFF_FACTOR``) wins; ours apply only for the duration of the fetch.
    """
    ours = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REGISTRY_TIMEOUT_S),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(REGISTRY_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    added = [k for k in ours if k not in os.environ]
    os.environ.update({k: ours[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def resolve_mlflow(
    name: str, selector: str, cache_dir: str | None = None, *, reference: str | None = None
) -> ResolvedModel:
    """Download a registered MLflow model version and hash it as a gatekeeper model folder.

    Args:
        name: the registered model name.
        selector: the version number (``"3"``) or ``"@alias"``.
        cache_dir: where downloads go (None: ``GATEKEEPER_MLFLOW_CACHE`` or
            ``~/.cache/gatekeeper/mlflow``); each call downloads into a fresh subfolder.
        reference: the reference as the user wrote it (default: ``models:/name/version``).

    Returns:
        The model folder; provenance ``source="mlflow"``, ``revision`` = the model version,
        ``extra`` = registry URL (no credentials), model name, run id, alias (when used) and the
        version's source URI.

    Raises:
        SourceError: mlflow not installed, MLFLOW_TRACKING_URI unset, the registry unreachable,
            an unknown model/version/alias, or artifacts that are not a gatekeeper model folder.
    """
    reference = reference or (f"models:/{name}{selector}" if selector.startswith("@") else f"models:/{name}/{selector}")
    tracking_uri = (os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not tracking_uri:
        raise SourceError(
            f"MLFLOW_TRACKING_URI is not set: cannot resolve {reference!r}",
            "set MLFLOW_TRACKING_URI to the tracking server holding the registry (e.g. https://mlflow.internal)",
        )
    registry_uri = (os.environ.get("MLFLOW_REGISTRY_URI") or "").strip() or tracking_uri
    host = public_url(registry_uri)
    mlflow = _import_mlflow()
    with _bounded_http():
        return _fetch(mlflow, name, selector, cache_dir, reference, tracking_uri, registry_uri, host)


def _fetch(
    mlflow: Any,
    name: str,
    selector: str,
    cache_dir: str | None,
    reference: str,
    tracking_uri: str,
    registry_uri: str,
    host: str,
) -> ResolvedModel:
    from mlflow.artifacts import download_artifacts

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        if selector.startswith("@"):
            mv = client.get_model_version_by_alias(name, selector[1:])
        else:
            mv = client.get_model_version(name, selector)
        version = str(mv.version)
        artifact_uri = client.get_model_version_download_uri(name, version)
    except GatekeeperError:
        raise
    except Exception as exc:  # every failure becomes a gatekeeper error (fail closed)
        raise map_mlflow_error(exc, name, selector, host, "look up") from None  # no chain: may hold credentials
    what = f"'{name}' version {version}"
    dest = Path(tempfile.mkdtemp(prefix=f"{_safe(name)}-v{version}-", dir=_cache_root(cache_dir)))
    try:
        try:
            local = download_artifacts(artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=tracking_uri)
        except Exception as exc:
            raise map_mlflow_error(exc, name, version, host, "download") from None
        folder = find_model_root(Path(local), what).resolve()
        files, content_hash = hash_folder(folder, allowed_root=dest)
    except BaseException:  # a refused or partial download is not left behind
        shutil.rmtree(dest, ignore_errors=True)
        raise
    extra = {
        "registry_uri": host,
        "model_name": name,
        "run_id": str(mv.run_id or ""),
        "source_uri": redact(str(mv.source or "")),
        "artifact_uri": redact(str(artifact_uri)),
        "network": NETWORK_NOTE,
    }
    if selector.startswith("@"):
        extra["alias"] = selector[1:]
    provenance = Provenance(
        reference=reference,
        source="mlflow",
        path=str(folder),
        revision=version,
        files=files,
        content_hash=content_hash,
        extra=extra,
    )
    return ResolvedModel(path=folder, provenance=provenance)
