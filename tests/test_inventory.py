"""`gatekeeper audit INVENTORY.yaml`: validation, per-model errors, cache, summary, exit-code ordering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import gatekeeper.scan as scanning
from gatekeeper.cli import main
from gatekeeper.errors import ExitCode, PolicyError, UsageError
from gatekeeper.inventory import cache_key, load_inventory, worst

from .conftest import DEMO_ZOO, light_tiny_world_policy

FAST = "version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nnull_copies: 0\n"


@pytest.fixture()
def scans(monkeypatch):
    """Count the real scans (cache misses) the audit runs."""
    calls: list[str] = []
    real = scanning.run_scan

    def counting(request, *args, **kw):
        calls.append(request.reference)
        return real(request, *args, **kw)

    monkeypatch.setattr(scanning, "run_scan", counting)
    return calls


@pytest.fixture()
def fleet(model_factory, tmp_path):
    """An inventory folder: two tiny random models, a fast policy, and one missing model."""
    inv = tmp_path / "registry"
    inv.mkdir()
    classes = {"alpha": ("red circle", "blue square", "green star", "white ring"), "beta": ("cat", "dog", "bird")}
    for name, classnames in classes.items():  # different bytes: identical folders would share one cache entry
        shutil.move(str(model_factory("cocoop", classnames=classnames, name=name)), inv / name)
    (inv / "fast.yaml").write_text(FAST)
    (inv / "inventory.yaml").write_text(
        "version: 1\npolicy: fast.yaml\nmodels:\n"
        "  - {name: alpha, model: alpha}\n"
        "  - {name: gone, model: missing-folder}\n"
        "  - {name: beta, model: beta}\n"
    )
    return inv


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_broken_entry_is_error_and_the_audit_continues_then_the_cache_hits(fleet, tmp_path, scans):
    out = tmp_path / "out"
    code = main(["audit", str(fleet / "inventory.yaml"), "--out", str(out), "--quiet"])
    assert code == ExitCode.SCAN_ERROR  # error beats everything else
    summary = _summary(out)
    records = {r["name"]: r for r in summary["models"]}
    assert list(records) == ["alpha", "gone", "beta"]
    assert records["gone"]["verdict"] == "error" and "model folder not found" in records["gone"]["error"]
    assert records["gone"]["exit_code"] == 2 and records["gone"]["report"] is None
    for name in ("alpha", "beta"):
        r = records[name]
        assert r["verdict"] in ("pass", "fail", "inconclusive") and r["error"] is None and r["cached"] is False
        assert (out / name / "report.md").is_file() and (out / name / "result.json").is_file()
        assert r["report"] == f"{name}/report.md"
    assert summary["overall"]["exit_code"] == 2
    assert len(scans) == 2  # the missing folder fails at resolution, before any scan
    md = (out / "summary.md").read_text()
    for name in ("alpha", "gone", "beta"):
        assert f"| {name} |" in md
    assert "model folder not found" in md and "[report](alpha/report.md)" in md
    assert not (out / ".cache" / (records["gone"]["cache_key"] or "none")).exists()

    # second run: both good models come from the cache, no scan runs
    scans.clear()
    assert main(["audit", str(fleet / "inventory.yaml"), "--out", str(out), "--quiet"]) == ExitCode.SCAN_ERROR
    again = {r["name"]: r for r in _summary(out)["models"]}
    assert scans == []
    assert again["alpha"]["cached"] is True and again["beta"]["cached"] is True
    assert again["gone"]["cached"] is False and again["gone"]["verdict"] == "error"
    for name in ("alpha", "beta"):
        assert again[name]["verdict"] == records[name]["verdict"] and again[name]["s_max"] == records[name]["s_max"]
        assert (out / name / "report.md").is_file()
    assert "| yes |" in (out / "summary.md").read_text()

    # a changed policy (new digest) misses the cache for every model
    (fleet / "fast.yaml").write_text(FAST + "seed: 1\n")
    scans.clear()
    main(["audit", str(fleet / "inventory.yaml"), "--out", str(out), "--quiet"])
    assert len(scans) == 2 and not any(r["cached"] for r in _summary(out)["models"])

    # changed model bytes miss the cache for that model only
    (fleet / "beta" / "NOTES.txt").write_text("retrained\n")
    scans.clear()
    main(["audit", str(fleet / "inventory.yaml"), "--out", str(out), "--quiet"])
    final = {r["name"]: r for r in _summary(out)["models"]}
    assert [Path(s).name for s in scans] == ["beta"]
    assert final["alpha"]["cached"] is True and final["beta"]["cached"] is False


def test_custom_cache_folder_and_cli_policy_override(fleet, tmp_path, scans):
    inv = fleet / "inventory.yaml"
    inv.write_text("version: 1\nmodels:\n  - {name: alpha, model: alpha}\n")  # shared policy would be default
    cache = tmp_path / "cache"
    out = tmp_path / "o1"
    code = main(["audit", str(inv), "--out", str(out), "--cache", str(cache), "--policy", str(fleet / "fast.yaml"), "--quiet"])
    assert code in (ExitCode.PASS, ExitCode.BACKDOOR, ExitCode.INCONCLUSIVE)
    assert len(scans) == 1 and len(list(cache.iterdir())) == 1 and not (out / ".cache").exists()
    code2 = main(["audit", str(inv), "--out", str(tmp_path / "o2"), "--cache", str(cache), "--policy", str(fleet / "fast.yaml"), "--quiet"])
    assert code2 == code and len(scans) == 1
    assert _summary(tmp_path / "o2")["models"][0]["cached"] is True


BAD = [
    ("version: 1\nmodels:\n  - {name: a, model: a, colour: red}\n", "colour", UsageError),
    ("version: 1\nmodels:\n  - {name: a, model: a}\n  - {name: a, model: b}\n", "duplicate name", UsageError),
    ("version: 1\nmodels:\n  - {name: a}\n", "missing key 'model'", UsageError),
    ("version: 1\nmodels:\n  - {name: a, model: a, policy: nope.yaml}\n", "models[0] (a): policy", PolicyError),
    ("version: 1\nmodels:\n  - {name: a, model: a}\n  - {name: b, model: a, policy: bad.yaml}\n", "models[1] (b): policy", PolicyError),
    ("version: 1\nmodelz: []\n", "modelz", UsageError),
    ("version: 2\nmodels:\n  - {name: a, model: a}\n", "version", UsageError),
    ("version: 1\nmodels:\n  - {name: ../x, model: a}\n", "name", UsageError),
    ("version: 1\nmodels:\n  - {name: a, model: a, revision: main}\n", "revision", UsageError),
    ("version: 1\nmodels:\n  - {name: a, model: 'ftp://x/y'}\n", "models[0] (a): model", UsageError),
    ("version: 1\nood: imagenet\nmodels:\n  - {name: a, model: a}\n", "ood", UsageError),
]


@pytest.mark.parametrize(("text", "needle", "exc"), BAD)
def test_bad_inventory_is_exit_4_before_any_scan(text, needle, exc, tmp_path, scans, capsys):
    inv = tmp_path / "inv.yaml"
    (tmp_path / "bad.yaml").write_text("version: 1\nepsilon: 9000\n")
    inv.write_text(text)
    with pytest.raises(exc) as info:
        load_inventory(inv)
    assert str(inv) in info.value.message and needle in info.value.message
    assert main(["audit", str(inv), "--out", str(tmp_path / "out")]) == ExitCode.USAGE
    assert scans == [] and not (tmp_path / "out" / "summary.json").exists()
    assert str(inv) in capsys.readouterr().err


def test_inventory_parses_into_frozen_entries(tmp_path):
    (tmp_path / "p.yaml").write_text(FAST)
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        "version: 1\npolicy: tiny-world\nood: procedural:3\nmodels:\n"
        "  - {name: a, model: sub/a, policy: p.yaml}\n"
        "  - {name: b, model: 'hf://org/name@v1'}\n"
        "  - {name: c, model: 'hf://org/name', revision: abc}\n"
    )
    parsed = load_inventory(inv)
    a, b, c = parsed.entries
    assert parsed.ood == "procedural:3"
    assert a.target == str(tmp_path / "sub" / "a") and a.policy.ood_budget == 64
    assert b.policy_arg == "tiny-world" and b.target == "hf://org/name@v1" and b.revision is None
    assert c.revision == "abc"
    with pytest.raises(AttributeError):
        a.name = "z"  # type: ignore[misc]


def test_exit_code_ordering_and_cache_key():
    e, b, i, p = ExitCode.SCAN_ERROR, ExitCode.BACKDOOR, ExitCode.INCONCLUSIVE, ExitCode.PASS
    assert worst([p, i, b, e]) == e and worst([p, i, b]) == b and worst([p, i]) == i and worst([p]) == p
    base = cache_key("h", "d", "procedural")
    assert base != cache_key("h2", "d", "procedural") != cache_key("h", "d2", "procedural")
    assert base != cache_key("h", "d", "procedural:1") and base != cache_key("h", "d", "procedural", "0.0.0-other")


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_ZOO / "backdoored" / "gatekeeper.json").exists(), reason="demo zoo not built")
def test_audit_detects_the_demo_backdoor(tmp_path):
    inv = tmp_path / "inv.yaml"
    light_tiny_world_policy(tmp_path / "tiny-world-light.yaml")  # test_demo.py runs the shipped policy itself
    inv.write_text(f"version: 1\npolicy: tiny-world-light.yaml\nmodels:\n  - {{name: bd, model: '{DEMO_ZOO / 'backdoored'}'}}\n")
    out = tmp_path / "out"
    assert main(["audit", str(inv), "--out", str(out), "--quiet"]) == ExitCode.BACKDOOR
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    (record,) = _summary(out)["models"]
    assert record["verdict"] == "fail" and record["suspect_class"] == truth["target_class"]
