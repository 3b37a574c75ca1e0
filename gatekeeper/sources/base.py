"""What every source returns, how a model reference (``hf://``, ``models:/``, a path) is parsed,
and how a folder is hashed.

Pure standard library: nothing here touches a network.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from gatekeeper.errors import SourceError, UsageError
from gatekeeper.result import Provenance

CHUNK_SIZE = 1 << 20  # stream-hash files in 1 MiB chunks
# A registry that does not answer must fail the gate in seconds, not minutes: every request to
# the Hub or an MLflow server gets this connect/read timeout and at most this many retries.
REGISTRY_TIMEOUT_S = 30
REGISTRY_RETRIES = 2
NETWORK_NOTE = f"timeout {REGISTRY_TIMEOUT_S} s per request, at most {REGISTRY_RETRIES} retries"
SUPPORTED = "'hf://org/name[@revision]', 'models:/name/version', 'models:/name@alias' (MLflow) or a local folder path"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
_REPO_PART = re.compile(r"[A-Za-z0-9._-]+")
_MAX_REPO_ID = 96  # the Hub's own limit
_MLFLOW_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
_MLFLOW_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_MLFLOW_NAME_BAD = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on local disk plus where it came from."""

    path: Path
    provenance: Provenance


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve(path: Path) -> Path:
    """``path.resolve()``, with a symlink loop reported as a :class:`SourceError`."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise SourceError(f"cannot resolve {path} ({exc})", "remove the looping or broken symlink") from None


def hash_folder(path: Path, *, allowed_root: Path | None = None) -> tuple[dict[str, str], str]:
    """Hash every regular file under ``path``, following symlinks that stay inside ``allowed_root``.

    Files are named by their posix path relative to ``path`` (the name in the folder, not the
    symlink target), but hashed by their target's content. The Hub cache stores snapshot files as
    symlinks into ``blobs/`` of the same repo folder: pass that repo folder as ``allowed_root``.

    Args:
        path: the folder to hash.
        allowed_root: symlinks must resolve inside this folder (default: ``path`` itself).

    Returns:
        ``({relative posix path: sha256}, content_hash)``, the dict sorted by path, and
        ``content_hash`` the sha256 over the sorted ``"path\\tsha256\\n"`` lines.

    Raises:
        SourceError: ``path`` is not a folder, a symlink points outside ``allowed_root`` or is
            broken, an entry is neither a file nor a folder, or a file cannot be read.
    """
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"not a folder: {root}", "pass the model folder (the one holding gatekeeper.json)")
    real_root = root.resolve()
    boundary = Path(allowed_root).resolve() if allowed_root is not None else real_root
    if not _inside(real_root, boundary):
        raise SourceError(f"folder {root} resolves outside {boundary}", "do not scan through symlinked folders")
    files: dict[str, str] = {}
    seen_dirs = {real_root}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        current = Path(dirpath)
        for name in sorted(dirnames):  # refuse escaping or looping symlinked folders before walking them
            target = _resolve(current / name)
            if not _inside(target, boundary):
                raise SourceError(
                    f"symlink {current / name} points outside {boundary}", "copy the files into the model folder"
                )
            if target in seen_dirs:
                raise SourceError(
                    f"symlink {current / name} points to a folder already scanned (loop or alias)",
                    "remove the symlink so every file is scanned once",
                )
            seen_dirs.add(target)
        for name in filenames:
            entry = current / name
            rel = entry.relative_to(root).as_posix()
            target = _resolve(entry)
            if entry.is_symlink() and not _inside(target, boundary):
                raise SourceError(f"symlink {rel} points outside {boundary}", "copy the files into the model folder")
            try:
                mode = os.stat(target).st_mode
            except OSError as exc:
                raise SourceError(f"cannot read {rel}: {exc.strerror or exc}", "the link may be broken") from None
            if not stat.S_ISREG(mode):
                raise SourceError(f"{rel} is not a regular file", "remove it from the model folder")
            try:
                files[rel] = _sha256_file(target)
            except OSError as exc:
                raise SourceError(f"cannot read {rel}: {exc.strerror or exc}", "check file permissions") from None
    files = dict(sorted(files.items()))
    lines = "".join(f"{rel}\t{digest}\n" for rel, digest in files.items())
    return files, hashlib.sha256(lines.encode("utf-8")).hexdigest()


def validate_revision(revision: str) -> str:
    """Check a Hub revision (branch, tag or commit sha) before it reaches a file path.

    Args:
        revision: the revision as the user gave it.

    Returns:
        The revision, unchanged.

    Raises:
        UsageError: empty, holds whitespace or control characters, ``..``, a backslash, or
            starts/ends with ``/``.
    """
    bad = (
        not revision
        or ".." in revision
        or "\\" in revision
        or revision.startswith("/")
        or revision.endswith("/")
        or any(ch.isspace() or not ch.isprintable() for ch in revision)
    )
    if bad:
        raise UsageError(
            f"invalid revision {revision!r}",
            "give a branch, tag or commit sha without whitespace or '..', e.g. hf://org/name@v1.0",
        )
    return revision


def validate_repo_id(repo_id: str) -> str:
    """Check a Hub repo id of the form ``org/name``.

    Args:
        repo_id: the id as the user gave it.

    Returns:
        The id, unchanged.

    Raises:
        UsageError: not exactly two parts, a character outside ``[A-Za-z0-9._-]``, ``..`` or
            ``--``, a part starting or ending with ``.`` or ``-``, or longer than 96 characters.
    """
    parts = repo_id.split("/")
    ok = (
        len(parts) == 2
        and len(repo_id) <= _MAX_REPO_ID
        and ".." not in repo_id
        and "--" not in repo_id
        and all(_REPO_PART.fullmatch(p) and p[0] not in ".-" and p[-1] not in ".-" for p in parts)
    )
    if not ok:
        raise UsageError(
            f"invalid Hugging Face repo id {repo_id!r}",
            "use hf://org/name with letters, digits, '.', '_' or '-' (no '..' or '--')",
        )
    return repo_id


def parse_model_uri(rest: str, ref: str) -> tuple[str, str]:
    """Split the part after ``models:/`` into ``(name, version)`` or ``(name, "@alias")``.

    Args:
        rest: ``name/version`` or ``name@alias``.
        ref: the whole reference, for messages.

    Returns:
        ``(name, "3")`` or ``(name, "@champion")``.

    Raises:
        UsageError: no version or alias, a non-numeric version (stages are not supported), a
            bad alias, or a name with control characters.
    """
    usage = "write models:/name/version (e.g. models:/clf/3) or models:/name@alias (e.g. models:/clf@champion)"
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if not _MLFLOW_ALIAS.match(alias):
            raise UsageError(f"invalid MLflow alias {alias!r} in {ref!r}", usage)
        selector = "@" + alias
    else:
        name, sep, version = rest.rpartition("/")
        if not sep or not version:
            raise UsageError(f"MLflow reference {ref!r} names no version or alias", usage)
        if not _MLFLOW_VERSION.match(version):
            raise UsageError(
                f"invalid MLflow model version {version!r} in {ref!r}",
                "give a version number, or an alias as models:/name@alias (stages are not supported)",
            )
        selector = version
    if not name or not name.strip() or name != name.strip() or _MLFLOW_NAME_BAD.search(name) or "/" in name:
        raise UsageError(f"invalid MLflow model name {name!r} in {ref!r}", usage)
    return name, selector


def parse_reference(ref: str) -> tuple[str, str, str | None]:
    """Split a model reference into ``(scheme, target, revision)``.

    Args:
        ref: ``hf://org/name``, ``hf://org/name@revision``, ``models:/name/version``,
            ``models:/name@alias`` (MLflow Model Registry) or a local folder path.

    Returns:
        ``("hf", "org/name", revision or None)``, ``("mlflow", name, version or "@alias")`` or
        ``("local", path, None)``.

    Raises:
        UsageError: empty reference, an unsupported scheme, a bad repo id, a bad revision, or
            a ``models:/`` reference without a version number or alias.
    """
    if not ref or not ref.strip():
        raise UsageError("empty model reference", f"pass {SUPPORTED}")
    match = _SCHEME.match(ref)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter (C:/...)
        return "local", ref, None
    scheme = match.group(1).lower()
    if scheme == "models":
        name, selector = parse_model_uri(ref[match.end() :], ref)
        return "mlflow", name, selector
    if scheme != "hf":
        raise UsageError(f"unsupported model reference scheme '{scheme}:' in {ref!r}", f"supported: {SUPPORTED}")
    if not ref[match.end() :].startswith("/"):
        raise UsageError(f"malformed Hub reference {ref!r}", "write hf://org/name[@revision]")
    repo_id, sep, revision = ref[match.end() + 1 :].partition("@")
    validate_repo_id(repo_id)
    return "hf", repo_id, validate_revision(revision) if sep else None
