"""MLflow Model Registry references, against a REAL local ``mlflow server`` (sqlite + local artifacts).

The server runs on 127.0.0.1 with a free port for the whole session; nothing leaves the machine.
Models are registered the way a user does it: artifacts logged to a run, then
``create_registered_model`` + ``create_model_version(source=runs:/<run>/model)`` and an alias.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from gatekeeper.errors import SourceError, UsageError
from gatekeeper.sources import hash_folder, parse_reference, resolve
from gatekeeper.sources.mlflow_source import find_model_root
from tests.conftest import make_model_folder

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e .[dev])")

TOKEN = "mlflowTokenDoNotLeak-0123456789abcdef"
PASSWORD = "s3cretPassw0rdDoNotLeak"
START_TIMEOUT_S = 90.0
MODEL = "gk-clf"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - local test server
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Registry:
    url: str
    model_folder: Path
    run_id: str
    pickled_model: str
    mixed_model: str


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on a free local port; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=root, env=_server_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server did not become healthy (rc={proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _log_version(client: mlflow.MlflowClient, experiment_id: str, name: str, folder: Path) -> str:
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return str(run.info.run_id)


@pytest.fixture(scope="session")
def registry(mlflow_server: str, random_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """gk-clf v1 (alias champion) = a real gatekeeper model folder; two models with pickles."""
    root = tmp_path_factory.mktemp("mlflow_models")
    folder = make_model_folder(random_backbone, root / "coop", "coop", ("red circle", "blue square"))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment_id = client.create_experiment("gatekeeper-tests")
    run_id = _log_version(client, experiment_id, MODEL, folder)
    client.set_registered_model_alias(MODEL, "champion", "1")

    pickled = root / "pyfunc"
    pickled.mkdir()
    (pickled / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n")
    (pickled / "python_model.pkl").write_bytes(b"\x80\x04cos\nsystem\n.")  # never loaded
    _log_version(client, experiment_id, "gk-pyfunc", pickled)

    mixed = root / "mixed"
    make_model_folder(random_backbone, mixed, "coop", ("a", "b"))
    (mixed / "extra.pkl").write_bytes(b"\x80\x04N.")
    _log_version(client, experiment_id, "gk-mixed", mixed)
    return Registry(mlflow_server, folder, run_id, "gk-pyfunc", "gk-mixed")


@pytest.fixture
def env(registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("GATEKEEPER_MLFLOW_CACHE", str(tmp_path / "mlflow-cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return registry


# --- parsing (no server) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("models:/clf/3", ("mlflow", "clf", "3")),
        ("models:/clf@champion", ("mlflow", "clf", "@champion")),
        ("MODELS:/my model.v2/12", ("mlflow", "my model.v2", "12")),
        ("models:/team_a-clf@prod-2", ("mlflow", "team_a-clf", "@prod-2")),
    ],
)
def test_parse_models_uri(ref: str, expected: tuple[str, str, str]) -> None:
    assert parse_reference(ref) == expected


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("models:/clf", "no version or alias"),
        ("models:/clf/", "no version or alias"),
        ("models:/clf/Production", "invalid MLflow model version"),
        ("models:/clf/0", "invalid MLflow model version"),
        ("models:/clf@", "invalid MLflow alias"),
        ("models:/clf@a b", "invalid MLflow alias"),
        ("models:/a/b/3", "invalid MLflow model name"),
        ("models://3", "invalid MLflow model name"),
        ("models:/@champion", "invalid MLflow model name"),
    ],
)
def test_parse_models_uri_rejects(ref: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_reference(ref)


def test_missing_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SourceError, match="MLFLOW_TRACKING_URI is not set"):
        resolve("models:/clf/1")


def test_mlflow_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    with pytest.raises(SourceError) as info:
        resolve("models:/clf/1")
    assert info.value.hint == "pip install gatekeeper-clip[mlflow]"


def test_conflicting_revision_for_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="two revisions"):
        resolve("models:/clf/1", revision="2")


def test_find_model_root_one_subfolder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "gatekeeper.json").write_text("{}")
    assert find_model_root(tmp_path, "x") == tmp_path / "model"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "gatekeeper.json").write_text("{}")
    with pytest.raises(SourceError, match="several"):
        find_model_root(tmp_path, "x")


# --- against the real server ---------------------------------------------------------------------


def test_version_resolves(env: Registry) -> None:
    resolved = resolve(f"models:/{MODEL}/1")
    prov = resolved.provenance
    assert (resolved.path / "gatekeeper.json").is_file()
    assert (prov.source, prov.revision, prov.reference) == ("mlflow", "1", f"models:/{MODEL}/1")
    assert (prov.files, prov.content_hash) == hash_folder(env.model_folder)
    assert prov.extra["run_id"] == env.run_id
    assert prov.extra["model_name"] == MODEL
    assert prov.extra["registry_uri"] == env.url
    assert prov.extra["source_uri"].endswith("/model") and "alias" not in prov.extra
    assert Path(os.environ["GATEKEEPER_MLFLOW_CACHE"]) in resolved.path.parents


def test_alias_resolves(env: Registry) -> None:
    prov = resolve(f"models:/{MODEL}@champion").provenance
    assert (prov.revision, prov.extra["alias"], prov.extra["run_id"]) == ("1", "champion", env.run_id)
    assert prov.content_hash == hash_folder(env.model_folder)[1]


@pytest.mark.parametrize("ref", [f"models:/{MODEL}/7", f"models:/{MODEL}@nope", "models:/no-such-model/1"])
def test_unknown_version_alias_or_model(env: Registry, ref: str) -> None:
    with pytest.raises(SourceError) as info:
        resolve(ref)
    assert "not found" in info.value.message
    assert "check the model name" in info.value.hint


def test_pickled_flavour_is_refused(env: Registry) -> None:
    with pytest.raises(SourceError) as info:
        resolve(f"models:/{env.pickled_model}/1")
    assert "not a gatekeeper model folder" in info.value.message and "pickle" in info.value.message
    with pytest.raises(SourceError, match=r"pickle files \(extra.pkl\)"):
        resolve(f"models:/{env.mixed_model}/1")
    assert not any(Path(os.environ["GATEKEEPER_MLFLOW_CACHE"]).iterdir())  # refused downloads are removed


def test_server_down_fails_fast(env: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        resolve(f"models:/{MODEL}/1")
    assert time.monotonic() - start < 30
    assert "cannot reach the MLflow registry" in info.value.message
    assert "registry is down or MLFLOW_TRACKING_URI is wrong" in info.value.hint


def test_credentials_never_leak(env: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    prov = resolve(f"models:/{MODEL}@champion").provenance
    assert TOKEN not in json.dumps(asdict(prov))
    with pytest.raises(SourceError) as info:
        resolve(f"models:/{MODEL}/9")
    err = info.value
    assert TOKEN not in f"{err.message} {err.hint} {err.one_line()} {err!r}"
    assert err.__cause__ is None and err.__suppress_context__

    # user:password in the URI (basic auth; the test server ignores it) and a password variable
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.url.replace("http://", f"http://alice:{PASSWORD}@"))
    prov = resolve(f"models:/{MODEL}/1").provenance
    assert prov.extra["registry_uri"] == env.url
    assert PASSWORD not in json.dumps(asdict(prov))
    down = f"http://alice:{PASSWORD}@127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    with pytest.raises(SourceError) as info:
        resolve(f"models:/{MODEL}/1")
    assert PASSWORD not in f"{info.value.message} {info.value.hint} {info.value!r}"
