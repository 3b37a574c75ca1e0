"""Hostile inputs at the gate's edge: stale verdicts, output symlinks, workflow-command injection,
policy values that must be refused, bounded YAML, registries that are down.

Each test reproduces a defect a red-team pass found (see docs/security.md) through the real CLI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatekeeper.cli import main
from gatekeeper.errors import PolicyError
from gatekeeper.policy import load_policy
from gatekeeper.untrusted import DocumentError, inert, load_yaml

FAST = "version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nbatch_size: 32\nnull_copies: 0\nrestarts: 1\n"
STALE_PASS = {"verdict": "pass", "s_max": 0.1, "note": "an earlier scan"}


def _stale_out(out: Path) -> None:
    (out / "triggers").mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(STALE_PASS))
    (out / "report.md").write_text("# PASS\n")
    (out / "triggers" / "old.png").write_bytes(b"png")
    (out / "partial.json").write_text("{}")


def _workflow_commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("::")]


# ---------------------------------------------------------------------------- no stale verdict


def test_a_failed_scan_leaves_no_earlier_pass(tmp_path, capsys):
    out, copy, sarif = tmp_path / "out", tmp_path / "copy.json", tmp_path / "r.sarif"
    _stale_out(out)
    copy.write_text(json.dumps(STALE_PASS))
    sarif.write_text("{}")
    broken = tmp_path / "broken"
    broken.mkdir()  # no gatekeeper.json: the scan cannot be made
    policy = tmp_path / "p.yaml"
    policy.write_text(FAST)
    code = main(["scan", str(broken), "--policy", str(policy), "--out", str(out), "--json", str(copy), "--sarif", str(sarif)])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == []  # result.json, report.md, triggers/, partial.json: gone
    assert not copy.exists()
    assert json.loads(sarif.read_text())["runs"][0]["invocations"][0]["executionSuccessful"] is False


def test_a_usage_error_does_not_touch_earlier_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    _stale_out(out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: 2.0\nk: 100.0\n")
    assert main(["scan", str(tmp_path), "--policy", str(bad), "--out", str(out)]) == 4
    assert (out / "result.json").is_file()  # nothing was checked, nothing removed: the user fixes the typo


def test_sigterm_mid_scan_exits_2_with_no_result(model_factory, tmp_path):
    folder = model_factory("coop", classnames=tuple(f"class {i}" for i in range(8)))
    out = tmp_path / "out"
    _stale_out(out)
    policy = tmp_path / "slow.yaml"
    policy.write_text(FAST.replace("ood_budget: 64", "ood_budget: 512").replace("restarts: 1", "restarts: 4"))
    env = {**os.environ, "GATEKEEPER_TEST_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "scan", str(folder), "--policy", str(policy), "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # progress lines: the scan is inverting classes
        if "class 1/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 2, rest
    assert "terminated (SIGTERM)" in rest and "no verdict" in rest
    assert not (out / "result.json").exists() and not (out / "report.md").exists()


# ---------------------------------------------------------------------------- writes stay in --out


def test_trigger_images_never_follow_a_symlink_out_of_out(model_factory, tmp_path):
    folder = model_factory("coop")
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "triggers").symlink_to(elsewhere, target_is_directory=True)
    (out / "report.md").symlink_to(tmp_path / "victim.md")
    (tmp_path / "victim.md").write_text("keep me")
    policy = tmp_path / "p.yaml"
    policy.write_text(FAST)
    assert main(["scan", str(folder), "--policy", str(policy), "--out", str(out), "--quiet"]) in (0, 1)
    assert list(elsewhere.iterdir()) == []
    assert not (out / "triggers").is_symlink() and len(list((out / "triggers").glob("*.png"))) == 4
    assert (tmp_path / "victim.md").read_text() == "keep me" and not (out / "report.md").is_symlink()


# ---------------------------------------------------------------------------- inert text


@pytest.mark.parametrize(
    "text",
    ["cat\n::error::pwned", "::add-mask::x", "  ::stop-commands::t", "a\r\n::warning file=x::y", "a\u2028::error::b"],
)
def test_untrusted_text_cannot_start_a_workflow_command(text):
    line = inert(text)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert _workflow_commands(line) == []


def test_a_pickle_global_name_cannot_issue_workflow_commands(tmp_path, capsys):
    """STACK_GLOBAL names are strings the provider chooses, newlines included."""
    import pickle

    payload = (
        b"\x80\x04"
        + pickle.SHORT_BINUNICODE + bytes([len(b"posix\n::add-mask::x")]) + b"posix\n::add-mask::x"
        + pickle.SHORT_BINUNICODE + bytes([len(b"system\n::error::owned")]) + b"system\n::error::owned"
        + pickle.STACK_GLOBAL
        + pickle.STOP
    )
    ckpt = tmp_path / "model.pth.tar-1"
    ckpt.write_bytes(payload)
    sidecar = tmp_path / "s.yaml"
    sidecar.write_text("backbone: {name: ViT-B-16, pretrained: openai}\nclassnames: [a, b]\n")
    assert main(["convert", str(ckpt), "--sidecar", str(sidecar), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and _workflow_commands(err) == [], err
    assert "refused" in err


def test_verdict_and_progress_lines_are_inert(model_factory, tmp_path, capsys):
    folder = model_factory("coop", classnames=("::error::red circle", "blue square", "green star", "white ring"))
    policy = tmp_path / "p.yaml"
    policy.write_text(FAST)
    main(["scan", str(folder), "--policy", str(policy), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "::error::red circle" in err and _workflow_commands(err) == []


# ---------------------------------------------------------------------------- policy values


@pytest.mark.parametrize(
    "tau",
    [".nan", ".inf", "-.inf", "true", "'2.5'", "1e300", "-1.0"],
)
def test_calibration_tau_must_be_a_finite_number_in_range(tmp_path, tau):
    p = tmp_path / "p.yaml"
    p.write_text(
        "version: 1\nscoring: differential\nepsilon: 4/255\n"
        f"calibration: {{tau: {tau}, n_candidates: 12, ood_budget: 1000, epsilon: 4/255}}\n"
    )
    with pytest.raises(PolicyError, match="tau"):
        load_policy(p)


@pytest.mark.parametrize(
    "line",
    ["ood_budget: 1000.0", "ood_budget: '1000'", "restarts: 2.5", "null_copies: true", "seed: '0'"],
)
def test_counts_must_be_integers(tmp_path, line):
    p = tmp_path / "p.yaml"
    p.write_text(f"version: 1\n{line}\n")
    with pytest.raises(PolicyError, match="integer"):
        load_policy(p)


def test_calibration_counts_must_be_integers(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "version: 1\nscoring: differential\ncalibration: {tau: 2.5, n_candidates: 12.7, ood_budget: 1000, epsilon: 4/255}\n"
    )
    with pytest.raises(PolicyError, match="n_candidates"):
        load_policy(p)


def test_a_repeated_key_is_refused_not_silently_last(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nk: 2.0\nk: 100.0\n")
    with pytest.raises(PolicyError, match="duplicate key 'k'"):
        load_policy(p)


def test_a_huge_tau_that_passed_the_backdoored_demo_is_refused_before_any_fetch(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nscoring: differential\ncalibration: {tau: 1e300, n_candidates: 12, ood_budget: 1000, epsilon: 4/255}\n")
    assert main(["scan", "hf://acme/never-fetched", "--policy", str(p), "--out", str(tmp_path / "o")]) == 4
    assert "calibration.tau" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bounded YAML


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_fast_with_exit_4(tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb())
    assert len(p.read_bytes()) < 1000
    t0 = time.perf_counter()
    assert main(["scan", str(tmp_path), "--policy", str(p), "--out", str(tmp_path / "o")]) == 4
    assert time.perf_counter() - t0 < 10  # was: memory exhausted after 30 s, exit 2
    err = capsys.readouterr().err
    assert "expands to more than" in err and len(err) < 500


def test_anchors_within_bounds_still_work():
    assert load_yaml("base: &b {k: 2.0}\nother: *b\n") == {"base": {"k": 2.0}, "other": {"k": 2.0}}


@pytest.mark.parametrize(
    "text, match",
    [
        ("k: " + "9" * 5000 + "\n", "cannot be read"),
        ("a: [" * 50 + "\n", "not valid YAML"),
        ("x: " + "y" * (1 << 20) + "\n", "larger than"),
    ],
)
def test_bad_yaml_is_one_bounded_line(text, match):
    with pytest.raises(DocumentError, match=match) as info:
        load_yaml(text, "policy.yaml")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_the_expansion_bound_counts_every_alias_use(monkeypatch):
    """The node count is taken after expansion: the same document passes or fails with the bound."""
    import gatekeeper.untrusted as untrusted

    doc = "a: &a [" + ", ".join(["1"] * 10) + "]\nb: [" + ", ".join(["*a"] * 100) + "]\n"
    assert len(load_yaml(doc)["b"]) == 100  # 1 + 2 keys + list of 10 (11) + list of 100 uses of it: 1115 nodes
    monkeypatch.setattr(untrusted, "MAX_YAML_NODES", 1115)
    assert len(load_yaml(doc)["b"]) == 100
    monkeypatch.setattr(untrusted, "MAX_YAML_NODES", 1114)
    with pytest.raises(DocumentError, match="expands to more than 1114 nodes"):
        load_yaml(doc)


# ---------------------------------------------------------------------------- registries


def test_a_closed_mlflow_port_fails_in_seconds(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from gatekeeper.errors import SourceError
    from gatekeeper.sources import resolve

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="cannot reach the MLflow registry"):
        resolve("models:/clip/1", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 60  # mlflow's own defaults: 7 retries, about 4.5 minutes
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # our bound does not leak into the process


@pytest.mark.parametrize("key", ["k", "lr", "alpha", "lift_margin", "min_trigger_asr"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_for_every_float_key(key, value):
    from gatekeeper.policy import policy_from_mapping

    with pytest.raises(PolicyError, match=key):
        policy_from_mapping({key: value})


# ---------------------------------------------------------------------------- sources


def test_a_symlink_loop_in_a_model_folder_is_one_clear_line(model_factory, tmp_path, capsys):
    folder = model_factory("coop")
    (folder / "loop").symlink_to(folder / "loop")
    policy = tmp_path / "p.yaml"
    policy.write_text(FAST)
    assert main(["scan", str(folder), "--policy", str(policy), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "symlink" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ref", ["hf://org/name\n", "hf://org\n/name", "hf://org/na\nme"])
def test_a_repo_id_with_a_newline_is_a_usage_error(ref):
    from gatekeeper.errors import UsageError
    from gatekeeper.sources import parse_reference

    with pytest.raises(UsageError):
        parse_reference(ref)


def test_an_oversized_prompt_learner_is_refused_before_it_is_read(model_factory, tmp_path, capsys):
    folder = model_factory("coop")
    with (folder / "prompt_learner.safetensors").open("ab") as f:
        f.truncate(65 << 20)  # sparse: the size a provider could claim, without the disk
    policy = tmp_path / "p.yaml"
    policy.write_text(FAST)
    assert main(["scan", str(folder), "--policy", str(policy), "--out", str(tmp_path / "o")]) == 2
    assert "more than a prompt learner can be" in capsys.readouterr().err
