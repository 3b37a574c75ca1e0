"""Local model folders: existence checks, stable hashes, symlink rules."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gatekeeper.errors import SourceError, UsageError
from gatekeeper.sources import hash_folder, resolve, resolve_local

FILES = {
    "gatekeeper.json": b'{"kind": "coop"}',
    "prompt_learner.safetensors": b"\x00weights\x01" * 100,
    "ViT-B-32/open_clip_config.json": b'{"embed_dim": 512}',
}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def _expected(files: dict[str, bytes]) -> tuple[dict[str, str], str]:
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())}
    lines = "".join(f"{rel}\t{d}\n" for rel, d in digests.items())
    return digests, hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return _write(tmp_path / "model", FILES)


def test_resolve_local_provenance(model_dir: Path) -> None:
    resolved = resolve(str(model_dir))
    prov = resolved.provenance
    assert resolved.path == model_dir.resolve()
    assert (prov.source, prov.revision, prov.reference, prov.path) == (
        "local",
        None,
        str(model_dir),
        str(model_dir.resolve()),
    )
    assert (prov.files, prov.content_hash) == _expected(FILES)
    assert list(prov.files) == sorted(prov.files)


def test_hashes_stable_and_content_sensitive(model_dir: Path) -> None:
    first = hash_folder(model_dir)
    assert hash_folder(model_dir) == first
    (model_dir / "prompt_learner.safetensors").write_bytes(b"tampered")
    files, content_hash = hash_folder(model_dir)
    assert content_hash != first[1]
    assert files["gatekeeper.json"] == first[0]["gatekeeper.json"]


def test_hash_streams_large_file(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # crosses several 1 MiB chunks
    files, _ = hash_folder(_write(tmp_path / "big", {"w.bin": data}))
    assert files == {"w.bin": hashlib.sha256(data).hexdigest()}


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        resolve_local(tmp_path / "nope")
    assert "not found" in info.value.message and "nope" in info.value.message
    assert "hf://" in info.value.hint


def test_file_is_not_a_folder(model_dir: Path) -> None:
    with pytest.raises(SourceError, match="not a folder"):
        resolve_local(model_dir / "gatekeeper.json")


def test_revision_for_local_folder_is_usage_error(model_dir: Path) -> None:
    with pytest.raises(UsageError, match="--revision"):
        resolve(str(model_dir), revision="v1")


def test_symlink_inside_is_followed_and_named_by_link(model_dir: Path) -> None:
    os.symlink("gatekeeper.json", model_dir / "alias.json")
    files, _ = hash_folder(model_dir)
    assert files["alias.json"] == files["gatekeeper.json"]


def test_symlink_outside_is_refused(tmp_path: Path, model_dir: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("x")
    os.symlink(secret, model_dir / "leak.txt")
    with pytest.raises(SourceError, match="points outside"):
        hash_folder(model_dir)


def test_symlinked_folder_outside_is_refused(tmp_path: Path, model_dir: Path) -> None:
    _write(tmp_path / "elsewhere", {"a.json": b"{}"})
    os.symlink(tmp_path / "elsewhere", model_dir / "sub")
    with pytest.raises(SourceError, match="points outside"):
        hash_folder(model_dir)


def test_symlink_loop_is_refused(model_dir: Path) -> None:
    os.symlink("..", model_dir / "ViT-B-32" / "up")
    with pytest.raises(SourceError, match="already scanned"):
        hash_folder(model_dir)


def test_broken_symlink_is_refused(model_dir: Path) -> None:
    os.symlink("missing.bin", model_dir / "dangling.bin")
    with pytest.raises(SourceError, match="cannot read dangling.bin"):
        hash_folder(model_dir)


def test_allowed_root_admits_links_into_a_parent(tmp_path: Path) -> None:
    blob = tmp_path / "repo" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"blob")
    snap = tmp_path / "repo" / "snapshots" / "s"
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snap), snap / "gatekeeper.json")
    with pytest.raises(SourceError):
        hash_folder(snap)
    files, _ = hash_folder(snap, allowed_root=tmp_path / "repo")
    assert files == {"gatekeeper.json": hashlib.sha256(b"blob").hexdigest()}
