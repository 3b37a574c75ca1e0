"""Hub references, offline against a hand-built Hub cache, through the real ``snapshot_download``.

The cache layout mirrors huggingface_hub's: ``models--org--name/blobs/<etag>``,
``snapshots/<commit sha>/<file>`` as relative symlinks into ``blobs/``, ``refs/<branch or tag>``
holding the sha. Offline mode is on and sockets are disabled, so nothing reaches a network.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from gatekeeper.errors import SourceError, UsageError
from gatekeeper.sources import _redact, hub, parse_reference, resolve
from gatekeeper.sources._redact import public_url, redact

SHA_MAIN = hashlib.sha1(b"commit main").hexdigest()
SHA_V1 = hashlib.sha1(b"commit v1").hexdigest()
TOKEN = "hf_GateKeeperTestTokenDoNotLeak0123456789"
FILES_MAIN = {
    "gatekeeper.json": b'{"kind": "coop", "version": 2}',
    "prompt_learner.safetensors": b"\x00ctx\x01" * 64,
    "ViT-B-32/open_clip_config.json": b'{"embed_dim": 512}',
    "README.md": b"# demo\n",
}
FILES_V1 = {"gatekeeper.json": b'{"kind": "coop", "version": 1}', "prompt_learner.safetensors": b"old"}


def _add_snapshot(storage: Path, sha: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        etag = hashlib.sha256(data).hexdigest()  # LFS-style etag: the blob's sha256
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)  # relative, as huggingface_hub writes them


def _add_ref(storage: Path, name: str, sha: str) -> None:
    ref = storage / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(sha)  # no trailing newline, as huggingface_hub writes it


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A Hub cache holding org/name at main (SHA_MAIN) and tag v1.0 (SHA_V1)."""
    root = tmp_path / "hub"
    storage = root / "models--org--name"
    _add_snapshot(storage, SHA_MAIN, FILES_MAIN)
    _add_snapshot(storage, SHA_V1, FILES_V1)
    _add_ref(storage, "main", SHA_MAIN)
    _add_ref(storage, "v1.0", SHA_V1)
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (2.4.0 reads it into a constant at import: patch that too); no sockets at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    def _no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


def _expected(files: dict[str, bytes]) -> tuple[dict[str, str], str]:
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())}
    lines = "".join(f"{rel}\t{d}\n" for rel, d in digests.items())
    return digests, hashlib.sha256(lines.encode()).hexdigest()


# --- parse_reference -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("hf://org/name", ("hf", "org/name", None)),
        ("hf://Org-1/my_model.v2@main", ("hf", "Org-1/my_model.v2", "main")),
        (f"hf://org/name@{SHA_MAIN}", ("hf", "org/name", SHA_MAIN)),
        ("hf://org/name@refs/pr/1", ("hf", "org/name", "refs/pr/1")),
        ("HF://org/name@v1.0", ("hf", "org/name", "v1.0")),
        ("zoo/demo/badnet", ("local", "zoo/demo/badnet", None)),
        ("/abs/path/model", ("local", "/abs/path/model", None)),
        ("./model@v1", ("local", "./model@v1", None)),
        ("C:/models/x", ("local", "C:/models/x", None)),
    ],
)
def test_parse_reference(ref: str, expected: tuple[str, str, str | None]) -> None:
    assert parse_reference(ref) == expected


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("mlflow:/clf/3", "unsupported"),
        ("s3://bucket/model", "unsupported"),
        ("https://huggingface.co/org/name", "unsupported"),
        ("file:///tmp/model", "unsupported"),
        ("hf:/org/name", "malformed"),
        ("hf://name-only", "repo id"),
        ("hf://org/name/extra", "repo id"),
        ("hf://org/../etc", "repo id"),
        ("hf://org/na..me", "repo id"),
        ("hf://org/na--me", "repo id"),
        ("hf://org/na me", "repo id"),
        ("hf://org/name$", "repo id"),
        ("hf:///name", "repo id"),
        ("hf://org/-name", "repo id"),
        ("hf://" + "o/" + "n" * 100, "repo id"),
        ("hf://org/name@", "revision"),
        ("hf://org/name@v 1", "revision"),
        ("hf://org/name@../../x", "revision"),
        ("hf://org/name@/etc/passwd", "revision"),
        ("hf://org/name@a\\b", "revision"),
    ],
)
def test_parse_reference_rejects(ref: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_reference(ref)


def test_unsupported_scheme_names_the_supported_ones() -> None:
    with pytest.raises(UsageError) as info:
        parse_reference("s3://bucket/clf")
    hint = info.value.hint
    assert "hf://" in hint and "local" in hint and "models:/name/version" in hint and "MLflow" in hint


def test_conflicting_revisions_are_a_usage_error(cache: Path) -> None:
    with pytest.raises(UsageError, match="two revisions"):
        resolve("hf://org/name@v1.0", revision="main", cache_dir=str(cache))
    with pytest.raises(UsageError, match="revision"):
        resolve("hf://org/name", revision="bad rev", cache_dir=str(cache))


# --- offline resolution through the real snapshot_download ---------------------------------------


def test_default_branch_resolves_to_snapshot_and_sha(cache: Path) -> None:
    resolved = resolve("hf://org/name", cache_dir=str(cache))
    prov = resolved.provenance
    assert resolved.path.resolve() == (cache / "models--org--name" / "snapshots" / SHA_MAIN).resolve()
    assert (prov.source, prov.revision, prov.reference) == ("hf", SHA_MAIN, "hf://org/name")
    assert (prov.files, prov.content_hash) == _expected(FILES_MAIN)
    assert prov.extra["repo_id"] == "org/name"
    assert prov.extra["requested_revision"] == "main"


def test_commit_sha_resolves(cache: Path) -> None:
    resolved = resolve(f"hf://org/name@{SHA_V1}", cache_dir=str(cache))
    assert resolved.path.name == SHA_V1
    assert resolved.provenance.revision == SHA_V1
    assert resolved.provenance.files == _expected(FILES_V1)[0]


def test_tag_resolves_through_refs(cache: Path) -> None:
    by_ref = resolve("hf://org/name@v1.0", cache_dir=str(cache))
    by_flag = resolve("hf://org/name", revision="v1.0", cache_dir=str(cache))
    assert by_ref.provenance.revision == by_flag.provenance.revision == SHA_V1
    assert by_ref.provenance.extra["requested_revision"] == "v1.0"
    assert by_ref.provenance.content_hash == by_flag.provenance.content_hash == _expected(FILES_V1)[1]


def test_unknown_repo_offline(cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        resolve("hf://org/missing", cache_dir=str(cache))
    assert "'org/missing' is not in the local Hub cache and offline" in info.value.message
    assert "run once online" in info.value.hint and "HF_HOME" in info.value.hint


def test_unknown_revision_offline_lists_cached_refs(cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        resolve("hf://org/name@nope", cache_dir=str(cache))
    msg = info.value.message
    assert "revision 'nope'" in msg and "not in the local Hub cache" in msg
    assert "main" in msg and "v1.0" in msg
    with pytest.raises(SourceError, match="not in the local Hub cache"):
        resolve("hf://org/name@" + "0" * 40, cache_dir=str(cache))


def test_incomplete_snapshot_offline(cache: Path) -> None:
    storage = cache / "models--org--name"
    listing = {name: {"size": len(data), "blob_id": "x"} for name, data in FILES_MAIN.items()}
    listing["open_clip_model.safetensors"] = {"size": 3, "blob_id": "y"}  # listed on the Hub, not cached
    (storage / "trees").mkdir()
    (storage / "trees" / f"{SHA_MAIN}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(SourceError, match="incomplete"):
        resolve("hf://org/name", cache_dir=str(cache))


def test_snapshot_symlink_outside_cache_is_refused(cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, cache / "models--org--name" / "snapshots" / SHA_MAIN / "extra.json")
    with pytest.raises(SourceError, match="points outside"):
        resolve("hf://org/name", cache_dir=str(cache))


def test_endpoint_recorded(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("hf://org/name", cache_dir=str(cache)).provenance.extra["endpoint"] == hf_constants.ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.mirror.internal/")
    extra = resolve("hf://org/name", cache_dir=str(cache)).provenance.extra
    assert extra["endpoint"] == "https://hub.mirror.internal"
    monkeypatch.setenv("HF_ENDPOINT", "https://user:s3cret@hub.mirror.internal")
    extra = resolve("hf://org/name", cache_dir=str(cache)).provenance.extra
    assert extra["endpoint"] == "https://hub.mirror.internal"


# --- tokens, allow-list, error mapping -----------------------------------------------------------


def test_token_never_leaks_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SourceError) as info:
        resolve("hf://org/missing", cache_dir=str(cache))
    err = info.value
    assert TOKEN not in f"{err.message} {err.hint} {err.one_line()} {err!r}"
    assert err.__cause__ is None and err.__suppress_context__
    prov = resolve("hf://org/name", cache_dir=str(cache)).provenance
    assert TOKEN not in json.dumps(asdict(prov))


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (hf_errors.GatedRepoError(f"403 gated. Authorization: Bearer {TOKEN}", response=_response(403)), "gated"),
        (hf_errors.RepositoryNotFoundError(f"404 token={TOKEN}", response=_response(404)), "not found, or no access"),
        (hf_errors.RevisionNotFoundError(f"404 {TOKEN}", response=_response(404)), "revision 'v9' not found"),
        (
            hf_errors.HfHubHTTPError(f"500 headers={{'authorization': 'Bearer {TOKEN}'}}", response=_response(500)),
            "failed",
        ),
        (OSError(f"disk full while writing {TOKEN}"), "cannot fetch"),
        (RuntimeError(f"boom {TOKEN}"), "unexpected error"),
    ],
)
def test_hub_errors_are_mapped_and_redacted(
    error: Exception, needle: str, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def _raise(**kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(hub, "snapshot_download", _raise)
    with pytest.raises(SourceError) as info:
        resolve("hf://org/name@v9", cache_dir=str(cache))
    err = info.value
    assert needle in err.message
    assert err.hint
    assert TOKEN not in f"{err.message} {err.hint} {err!r}"
    assert err.__cause__ is None and err.__suppress_context__


def test_redact_removes_token_like_strings() -> None:
    assert "hf_abcdefghijkl" not in redact("x hf_abcdefghijkl y")
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert redact("{'authorization': 'xyz123'}") == "{'authorization': '***'}"
    assert redact("GET https://user:pw@mirror.internal/api") == "GET https://***@mirror.internal/api"
    assert public_url("https://user:pw@mirror.internal/") == "https://mirror.internal"
    assert hub.redact is redact  # the Hub transport uses the shared one


def test_redact_removes_the_stored_hub_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stored = tmp_path / "token"
    stored.write_text("storedSecretValue42\n")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(stored))  # huggingface_hub loaded: its path wins
    assert redact("got storedSecretValue42 back") == "got *** back"


def test_stored_token_path_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before huggingface_hub is imported, redaction finds the stored token from the environment."""
    monkeypatch.delitem(sys.modules, "huggingface_hub.constants")
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert _redact._hf_token_path() == str(tmp_path / "hf" / "token")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _redact._hf_token_path() == str(tmp_path / "xdg" / "huggingface" / "token")
    stored = tmp_path / "elsewhere"
    stored.write_text("storedSecretValue43")
    monkeypatch.setenv("HF_TOKEN_PATH", str(stored))
    assert _redact._hf_token_path() == str(stored)
    assert redact("got storedSecretValue43 back") == "got *** back"


@pytest.mark.parametrize(
    "env",
    [{}, {"HF_HOME": "~/hf-home"}, {"XDG_CACHE_HOME": "/x/cache"}, {"HF_HOME": "/h", "HF_TOKEN_PATH": "$HOME/tok"}],
    ids=["default", "hf-home", "xdg", "token-path"],
)
def test_stored_token_path_matches_huggingface_hub(env: dict[str, str]) -> None:
    """The path computed without huggingface_hub is the one it computes once imported (fresh interpreter)."""
    clean = {k: v for k, v in os.environ.items() if k not in {"HF_HOME", "HF_TOKEN_PATH", "XDG_CACHE_HOME"}}
    clean.pop("HUGGINGFACE_CO_STAGING", None)  # staging mode moves the token; a huggingface_hub test switch
    code = (
        "import sys\n"
        "from gatekeeper.sources._redact import _hf_token_path\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        "before = _hf_token_path()\n"
        "from huggingface_hub import constants\n"
        "print(before == constants.HF_TOKEN_PATH == _hf_token_path(), before, constants.HF_TOKEN_PATH)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True "), done.stdout


def test_download_is_restricted_to_model_files(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    seen: dict[str, Any] = {}

    def _fake(**kwargs: Any) -> str:
        seen.update(kwargs)
        return str(cache / "models--org--name" / "snapshots" / SHA_MAIN)

    monkeypatch.setattr(hub, "snapshot_download", _fake)
    resolve("hf://org/name@v1.0", cache_dir=str(cache))
    patterns = seen["allow_patterns"]
    assert "gatekeeper.json" in patterns and "*/open_clip_model.safetensors" in patterns
    assert not any(p.endswith((".bin", ".pth", ".pkl", ".pt", "*")) for p in patterns)
    assert (seen["repo_id"], seen["revision"], seen["cache_dir"], seen["token"]) == (
        "org/name",
        "v1.0",
        str(cache),
        TOKEN,
    )
