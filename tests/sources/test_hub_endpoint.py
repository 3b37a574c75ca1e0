"""``HF_ENDPOINT`` (Hub mirrors, Artifactory HF repositories) through the real huggingface_hub code path.

A tiny HTTP server on 127.0.0.1 plays the Hub: it records every request and either answers 404
or serves a minimal fake of the endpoints ``snapshot_download`` and ``model_info`` use. No request
leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hf_constants

from gatekeeper.errors import SourceError
from gatekeeper.sources import hub, resolve

SHA = hashlib.sha1(b"mirror commit").hexdigest()
FILES = {"gatekeeper.json": b'{"kind": "coop"}', "prompt_learner.safetensors": b"\x00weights" * 32}


@dataclass
class FakeHub:
    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    mode: str = "404"  # "404" or "serve"
    security: dict[str, Any] | None = None
    security_error: bool = False  # answer 400 to model_info(securityStatus=True)


def _handler(state: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _answer(self, head: bool) -> None:
            state.requests.append((self.command, self.path, dict(self.headers)))
            path = self.path.split("?")[0]
            if state.mode == "404":
                self._send(404, b'{"error": "Repository not found"}', {"Content-Type": "application/json"}, head)
                return
            if path.startswith(f"/api/models/org/name/tree/{SHA}"):  # snapshot_download lists the tree
                tree = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in FILES.items()
                ]
                self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                return
            if state.security_error and "securityStatus" in self.path:
                self._send(400, b'{"error": "bad request"}', {"Content-Type": "application/json"}, head)
                return
            if path.startswith("/api/models/org/name"):
                info: dict[str, Any] = {
                    "id": "org/name",
                    "sha": SHA,
                    "siblings": [{"rfilename": name} for name in FILES],
                }
                if state.security is not None and "securityStatus" in self.path:
                    info["securityRepoStatus"] = state.security
                self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                return
            for name, data in FILES.items():
                if path.endswith(f"/org/name/resolve/{SHA}/{name}") or path.endswith(f"/org/name/resolve/main/{name}"):
                    headers = {
                        "X-Repo-Commit": SHA,
                        "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    }
                    self._send(200, data, headers, head)
                    return
            self._send(404, b"{}", {"Content-Type": "application/json"}, head)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(FakeHub("")))
    state = FakeHub(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub 2.4 reads HF_HUB_OFFLINE and HF_ENDPOINT into constants at import time.
    # Offline mode: patch the constant. HF_ENDPOINT: gatekeeper reads it per call and passes it as
    # ``endpoint=``; hf_hub_url then swaps constants.ENDPOINT (the import-time default) for it, so
    # constants.ENDPOINT must stay untouched here (patching it would send file requests to the
    # default Hub). In a real run HF_ENDPOINT is set before import and both agree.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_endpoint_is_honoured_404(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        resolve("hf://org/name", cache_dir=str(tmp_path / "cache"))
    assert fake_hub.requests, "the Hub client never called HF_ENDPOINT"
    assert any("org/name" in path for _, path, _ in fake_hub.requests)


def test_mirror_download_and_security_status(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.mode = "serve"
    fake_hub.security = {"scansDone": True, "filesWithIssues": []}
    resolved = resolve("hf://org/name", cache_dir=str(tmp_path / "cache"))
    prov = resolved.provenance
    assert (prov.revision, prov.extra["endpoint"]) == (SHA, fake_hub.url)
    assert sorted(prov.files) == sorted(FILES)
    assert prov.extra["hub_security_status"] == "clean"
    assert any("securityStatus" in path for _, path, _ in fake_hub.requests)


def test_security_status_variants(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.mode = "serve"
    fake_hub.security = {"scansDone": True, "filesWithIssues": [{"path": "evil.pkl", "level": "unsafe"}]}
    assert hub.security_status("org/name", SHA, fake_hub.url) == "issues: evil.pkl"
    fake_hub.security = {"scansDone": False, "filesWithIssues": []}
    assert hub.security_status("org/name", SHA, fake_hub.url) == "pending"
    fake_hub.security = None  # a mirror without the field: nothing recorded
    assert hub.security_status("org/name", SHA, fake_hub.url) is None
    prov = resolve("hf://org/name", cache_dir=str(tmp_path / "cache")).provenance
    assert "hub_security_status" not in prov.extra


def test_security_status_is_never_fatal(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_hub.mode = "serve"
    fake_hub.security_error = True
    prov = resolve("hf://org/name", cache_dir=str(tmp_path / "cache")).provenance
    assert prov.revision == SHA and "hub_security_status" not in prov.extra
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # offline: not even tried
    assert hub.security_status("org/name", SHA, fake_hub.url) is None
