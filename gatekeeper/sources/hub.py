"""A model on the Hugging Face Hub, fetched (or found in the local Hub cache) with ``snapshot_download``.

Only the files a gatekeeper model folder holds are fetched (never pickles). The token comes
from ``HF_TOKEN`` and never appears in a message, a hint or the provenance.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from gatekeeper.errors import GatekeeperError, SourceError, UsageError
from gatekeeper.result import Provenance
from gatekeeper.sources._redact import MAX_DETAIL, public_url, redact
from gatekeeper.sources.base import REGISTRY_TIMEOUT_S, ResolvedModel, hash_folder, validate_repo_id, validate_revision

ALLOW_PATTERNS: tuple[str, ...] = (
    "gatekeeper.json",
    "prompt_learner.safetensors",
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "*/open_clip_config.json",
    "*/open_clip_model.safetensors",
    "README.md",
)
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_HINT = "run once online or pre-populate HF_HOME (or pass the cache folder)"
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def _cached_refs(repo_id: str, cache_dir: str | None) -> list[str]:
    """The branch/tag names and commit shas cached locally for ``repo_id`` (for hints; no network)."""
    root = Path(cache_dir or hf_constants.HF_HUB_CACHE).expanduser() / ("models--" + repo_id.replace("/", "--"))
    try:
        refs = [p.relative_to(root / "refs").as_posix() for p in (root / "refs").rglob("*") if p.is_file()]
        shas = [p.name for p in (root / "snapshots").glob("*") if p.is_dir()]
    except OSError:  # an unreadable cache only costs the hint its detail
        return []
    return sorted(refs) + sorted(shas)


def map_hub_error(exc: BaseException, repo_id: str, revision: str | None, cache_dir: str | None) -> GatekeeperError:
    """Translate a huggingface_hub (or OS) error into a gatekeeper error with an actionable hint.

    Args:
        exc: what ``snapshot_download`` raised.
        repo_id: the requested ``org/name``.
        revision: the requested revision (None: the default branch).
        cache_dir: the Hub cache folder used (None: huggingface_hub's default).

    Returns:
        A :class:`SourceError` (or :class:`UsageError` for an id the Hub rejects); its message
        and hint never hold a token.
    """
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    detail = redact(f"{type(exc).__name__}: {exc}").replace("\n", " ")[:MAX_DETAIL]
    if isinstance(exc, hf_errors.GatedRepoError):
        return SourceError(
            f"Hub repo {where} is gated and this token has no access",
            "accept the repo's conditions on its Hub page, then set HF_TOKEN to a token of that account",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return SourceError(
            f"Hub repo '{repo_id}' not found, or no access to it",
            "check the name (hf://org/name); for a private repo set HF_TOKEN to a token with read access",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return SourceError(
            f"revision '{revision}' not found in Hub repo '{repo_id}'",
            "check the branch, tag or commit sha (hf://org/name@revision)",
        )
    if isinstance(exc, hf_errors.DisabledRepoError):
        return SourceError(f"Hub repo '{repo_id}' has been disabled", "ask its owner or use another model")
    if isinstance(exc, hf_errors.IncompleteSnapshotError):
        return SourceError(f"the cached snapshot of {where} is incomplete and the Hub cannot be reached", OFFLINE_HINT)
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
        why = "offline (HF_HUB_OFFLINE is set)" if hf_constants.is_offline_mode() else "the Hub cannot be reached"
        cached = _cached_refs(repo_id, cache_dir)
        also = f"; the cache holds: {', '.join(cached[:8])}" if cached else ""
        return SourceError(f"{where} is not in the local Hub cache and {why}{also}", OFFLINE_HINT)
    if isinstance(exc, hf_errors.HFValidationError):
        return UsageError(f"the Hub rejects {where}: {detail}", "use hf://org/name[@revision]")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return SourceError(
            f"Hub request for {where} failed: {detail}", "retry later; check HF_ENDPOINT, the network and HF_TOKEN"
        )
    if isinstance(exc, OSError):
        return SourceError(
            f"cannot fetch {where}: {detail}", "check the network and that the Hub cache folder is writable"
        )
    return SourceError(f"unexpected error fetching {where}: {detail}", "retry; report it if it persists")


SECURITY_TIMEOUT_S = 10.0


def security_status(repo_id: str, sha: str, endpoint: str | None) -> str | None:
    """The Hub's security-scan status of ``repo_id`` at ``sha``, best effort (never raises).

    Args:
        repo_id: ``org/name``.
        sha: the resolved commit sha.
        endpoint: ``HF_ENDPOINT`` (None: huggingface_hub's default).

    Returns:
        ``"clean"`` (scans done, no file flagged), ``"pending"`` (scans not done yet),
        ``"issues: <files>"`` (files the scanners flagged), or None when offline, unavailable
        (mirrors often lack the field) or on any error.
    """
    if hf_constants.is_offline_mode():
        return None
    try:
        info = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None).model_info(
            repo_id, revision=sha, securityStatus=True, timeout=SECURITY_TIMEOUT_S
        )
        status = getattr(info, "security_repo_status", None)
        if not isinstance(status, dict):
            return None
        flagged = status.get("filesWithIssues") or []
        if flagged:
            names = sorted(str(f.get("path", f) if isinstance(f, dict) else f) for f in flagged)
            return redact("issues: " + ", ".join(names[:10]))[:MAX_DETAIL]
        if status.get("scansDone") is False:
            return "pending"
        return "clean" if status.get("scansDone") else None
    except Exception:  # best effort: the scan status never decides the resolution
        return None


def resolve_hub(
    repo_id: str, revision: str | None = None, cache_dir: str | None = None, *, reference: str | None = None
) -> ResolvedModel:
    """Fetch (or find in the local Hub cache) a gatekeeper model folder from the Hub.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit sha (None: the default branch).
        cache_dir: the Hub cache folder (None: ``HF_HUB_CACHE`` / ``HF_HOME``).
        reference: the reference as the user wrote it (default: ``hf://repo_id[@revision]``).

    Returns:
        The snapshot folder ``.../snapshots/<commit sha>``; provenance ``source="hf"``,
        ``revision`` = the resolved commit sha, ``extra`` = repo id, requested revision and the
        endpoint (``HF_ENDPOINT`` when set, else huggingface_hub's default), without credentials,
        and ``hub_security_status`` when online and the Hub reports a scan status (best effort).

    Raises:
        UsageError: a bad repo id or revision.
        SourceError: offline and not cached, repo or revision not found, gated, HTTP or disk
            errors, or a snapshot that is not a commit folder.
    """
    validate_repo_id(repo_id)
    if revision is not None:
        validate_revision(revision)
    endpoint = (os.environ.get("HF_ENDPOINT") or "").strip() or None
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=list(ALLOW_PATTERNS),
            cache_dir=cache_dir,
            token=os.environ.get("HF_TOKEN") or None,
            endpoint=endpoint,
            etag_timeout=REGISTRY_TIMEOUT_S,
        )
    except Exception as exc:  # every failure becomes a gatekeeper error (fail closed)
        raise map_hub_error(exc, repo_id, revision, cache_dir) from None  # no chained error: it may hold the token
    snapshot = Path(folder)
    sha = snapshot.name
    if snapshot.parent.name != "snapshots" or not _COMMIT_SHA.fullmatch(sha):
        raise SourceError(f"unexpected Hub snapshot folder {snapshot}", "pass cache_dir, not a local_dir download")
    files, content_hash = hash_folder(snapshot, allowed_root=snapshot.parent.parent)
    extra = {
        "repo_id": repo_id,
        "requested_revision": revision or hf_constants.DEFAULT_REVISION,
        "endpoint": public_url(endpoint or hf_constants.ENDPOINT or DEFAULT_ENDPOINT),
        "network": f"timeout {REGISTRY_TIMEOUT_S} s for metadata requests, "
        f"{hf_constants.HF_HUB_DOWNLOAD_TIMEOUT} s without data for downloads (HF_HUB_DOWNLOAD_TIMEOUT)",
    }
    scan = security_status(repo_id, sha, endpoint)
    if scan is not None:
        extra["hub_security_status"] = scan
    provenance = Provenance(
        reference=reference or f"hf://{repo_id}" + (f"@{revision}" if revision else ""),
        source="hf",
        path=str(snapshot),
        revision=sha,
        files=files,
        content_hash=content_hash,
        extra=extra,
    )
    return ResolvedModel(path=snapshot, provenance=provenance)
