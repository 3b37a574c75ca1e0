"""A model folder already on local disk."""

from __future__ import annotations

from pathlib import Path

from gatekeeper.errors import SourceError
from gatekeeper.result import Provenance
from gatekeeper.sources.base import ResolvedModel, hash_folder


def resolve_local(path: str | Path, *, reference: str | None = None) -> ResolvedModel:
    """Hash a local model folder and describe it.

    Args:
        path: the model folder (the one holding ``gatekeeper.json``).
        reference: the reference as the user wrote it (default: ``path``).

    Returns:
        The folder, resolved to an absolute path, with provenance ``source="local"``,
        ``revision=None`` and the per-file sha256 and content hash.

    Raises:
        SourceError: the folder does not exist, is a file, or holds a symlink pointing outside it.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SourceError(
            f"model folder not found: {folder}",
            "check the path, or use hf://org/name[@revision] for a Hugging Face Hub model",
        )
    if not folder.is_dir():
        raise SourceError(
            f"model reference is a file, not a folder: {folder}", "pass the folder holding gatekeeper.json"
        )
    folder = folder.resolve()
    files, content_hash = hash_folder(folder)
    provenance = Provenance(
        reference=str(path) if reference is None else reference,
        source="local",
        path=str(folder),
        revision=None,
        files=files,
        content_hash=content_hash,
    )
    return ResolvedModel(path=folder, provenance=provenance)
