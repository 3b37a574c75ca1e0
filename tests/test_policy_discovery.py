"""Project policy discovery: ``--policy`` wins, else ./.gatekeeper.yaml, else the shipped default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatekeeper.cli import main
from gatekeeper.errors import PolicyError, UsageError
from gatekeeper.policy import PROJECT_POLICY, find_project_policy, load_policy, resolve_policy

FAST = "version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nbatch_size: 32\nnull_copies: 0\n"


def test_no_project_policy_means_the_shipped_default(tmp_path):
    assert find_project_policy(tmp_path) is None
    assert resolve_policy(None, tmp_path) == ("default", False)


def test_a_project_policy_is_discovered(tmp_path, monkeypatch):
    (tmp_path / PROJECT_POLICY).write_text(FAST)
    assert resolve_policy(None, tmp_path) == (str(tmp_path / PROJECT_POLICY), True)
    monkeypatch.chdir(tmp_path)  # the CLI passes Path(): the path stays as a user would type it
    assert resolve_policy(None, Path()) == (PROJECT_POLICY, True)


def test_an_explicit_policy_wins_over_the_project_policy(tmp_path):
    (tmp_path / PROJECT_POLICY).write_text("not_a_key: 1\n")  # never read when --policy is given
    assert resolve_policy("tiny-world", tmp_path) == ("tiny-world", False)
    assert resolve_policy("default", tmp_path) == ("default", False)


@pytest.mark.parametrize("make", ["invalid", "folder"])
def test_an_invalid_project_policy_is_a_policy_error_naming_it(tmp_path, make):
    path = tmp_path / PROJECT_POLICY
    if make == "folder":
        path.mkdir()  # not passed over for the default: it fails to load
    else:
        path.write_text("epsilon: 1\n")
    with pytest.raises(PolicyError) as info:
        resolve_policy(None, tmp_path)
    assert str(path) in info.value.one_line() and "no --policy" in info.value.hint


def _capture(monkeypatch) -> list:
    """Stand in for the scan itself: record the request, then stop with a usage error (exit 4)."""
    seen: list = []

    def fake_run_scan(request, progress=None):
        seen.append(request)
        raise UsageError("stopped by the test")

    monkeypatch.setattr("gatekeeper.scan.run_scan", fake_run_scan)
    return seen


def test_scan_uses_and_records_the_discovered_policy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PROJECT_POLICY).write_text(FAST)
    seen = _capture(monkeypatch)
    assert main(["scan", "model", "--out", "o"]) == 4
    assert seen[0].policy == PROJECT_POLICY
    assert seen[0].command == f"gatekeeper scan model --out o --policy {PROJECT_POLICY}"
    assert f"policy {PROJECT_POLICY}" in capsys.readouterr().err


def test_scan_with_policy_ignores_the_project_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PROJECT_POLICY).write_text("epsilon: 1\n")  # invalid, but not used
    seen = _capture(monkeypatch)
    assert main(["scan", "model", "--policy", "tiny-world", "--out", "o"]) == 4
    assert seen[0].policy == "tiny-world" and "--policy tiny-world" in seen[0].command
    assert seen[0].command.count("--policy") == 1


def test_scan_with_an_invalid_project_policy_is_exit_4_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PROJECT_POLICY).write_text("epsilon: 4/255\nthreshold: 2\n")
    seen = _capture(monkeypatch)
    assert main(["scan", "no-such-model", "--out", "o"]) == 4
    err = capsys.readouterr().err
    assert not seen and not (tmp_path / "o").exists()
    assert "unknown key 'threshold'" in err and PROJECT_POLICY in err and "Traceback" not in err


def test_audit_falls_back_to_the_project_policy_only_without_a_shared_policy(tmp_path, monkeypatch):
    from gatekeeper.inventory import load_inventory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / PROJECT_POLICY).write_text(FAST)
    inv = tmp_path / "inv.yaml"
    inv.write_text("version: 1\nmodels:\n  - {name: a, model: m}\n")
    entry = load_inventory(inv, project_policy=PROJECT_POLICY).entries[0]
    assert entry.policy_arg == PROJECT_POLICY and entry.policy == load_policy(PROJECT_POLICY)
    inv.write_text("version: 1\npolicy: tiny-world\nmodels:\n  - {name: a, model: m}\n")
    assert load_inventory(inv, project_policy=PROJECT_POLICY).entries[0].policy_arg == "tiny-world"
    (tmp_path / PROJECT_POLICY).write_text("seed: -1\n")
    inv.write_text("version: 1\nmodels:\n  - {name: a, model: m}\n")
    with pytest.raises(PolicyError, match="seed") as info:
        load_inventory(inv, project_policy=PROJECT_POLICY)
    assert PROJECT_POLICY in info.value.one_line()


def test_a_real_scan_records_the_discovered_policy(model_factory, tmp_path, monkeypatch):
    folder = model_factory("coop")
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / PROJECT_POLICY).write_text(FAST)
    assert main(["scan", str(folder), "--out", "o", "--quiet"]) in (0, 1)
    result = json.loads((work / "o" / "result.json").read_text())
    assert result["policy_hash"] == load_policy(PROJECT_POLICY).digest() != load_policy("default").digest()
    assert result["command"].endswith(f"--policy {PROJECT_POLICY}")
    assert f"--policy {PROJECT_POLICY}" in (work / "o" / "report.md").read_text()


def test_calibrate_on_a_backbone_uses_the_project_policy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PROJECT_POLICY).write_text("epsilon: 1\n")
    assert main(["calibrate", "--backbone", "no-model", "--out", "p.yaml"]) == 4
    assert PROJECT_POLICY in capsys.readouterr().err
    (tmp_path / PROJECT_POLICY).write_text(FAST)  # a lift policy: calibrate refuses it, naming the file it read
    assert main(["calibrate", "--backbone", "no-model", "--out", "p.yaml"]) == 4
    assert f"{PROJECT_POLICY}: scoring 'lift'" in capsys.readouterr().err
