"""scan --shard i/n + merge == one unsharded scan; bad shard sets fail closed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatekeeper.cli import main

CLASSES = ("red circle", "blue square", "green star", "white ring", "pink bar", "orange cross", "yellow diamond")


def _policy(tmp_path: Path, impl: str, name: str = "p.yaml", extra: str = "") -> Path:
    p = tmp_path / name
    p.write_text(f"version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nnull_copies: 0\nimplementation: {impl}\n{extra}")
    return p


def _scan(model: Path, policy: Path, out: Path, *extra: str) -> int:
    return main(["scan", str(model), "--policy", str(policy), "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("impl,tol", [("reference", 0.0), ("fast", 1e-5)])
def test_merged_shards_equal_the_unsharded_scan(model_factory, tmp_path, impl, tol):
    model = model_factory("cocoop", CLASSES)
    policy = _policy(tmp_path, impl)
    whole_code = _scan(model, policy, tmp_path / "whole")
    for i in (1, 2, 3):
        assert _scan(model, policy, tmp_path / f"s{i}", "--shard", f"{i}/3") == 0
        assert not (tmp_path / f"s{i}" / "result.json").exists()  # a shard has no verdict
    merged_code = main(["merge", *(str(tmp_path / f"s{i}") for i in (3, 1, 2)), "--out", str(tmp_path / "merged"), "--quiet"])
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())
    merged = json.loads((tmp_path / "merged" / "result.json").read_text())
    assert merged_code == whole_code
    for key in ("verdict", "suspect_class", "threshold", "policy_hash", "provenance", "pool"):
        assert merged[key] == whole[key], key
    assert merged["s_max"] == pytest.approx(whole["s_max"], abs=tol)
    assert [c["name"] for c in merged["classes"]] == [c["name"] for c in whole["classes"]]
    for a, b in zip(merged["classes"], whole["classes"], strict=True):
        for k in ("asr", "loss", "z_asr", "z_loss", "score", "z"):
            assert a[k] == pytest.approx(b[k], abs=tol, rel=tol), (a["name"], k)
    assert set(merged["triggers"]) == set(whole["triggers"])


def test_incomplete_duplicate_or_mixed_shard_sets_fail_closed(model_factory, tmp_path, capsys):
    model = model_factory("cocoop", CLASSES)
    policy = _policy(tmp_path, "fast")
    other = _policy(tmp_path, "fast", "other.yaml", "seed: 1\n")
    for i in (1, 2):
        _scan(model, policy, tmp_path / f"s{i}", "--shard", f"{i}/3")
    _scan(model, other, tmp_path / "x3", "--shard", "3/3")
    capsys.readouterr()
    cases = [
        ([tmp_path / "s1", tmp_path / "s2"], "not exactly 1/3 .. 3/3"),
        ([tmp_path / "s1", tmp_path / "s1", tmp_path / "s2"], "not exactly"),
        ([tmp_path / "s1", tmp_path / "s2", tmp_path / "x3"], "mix different policies"),
        ([tmp_path / "nope"], "cannot read partial result"),
    ]
    for paths, message in cases:
        code = main(["merge", *map(str, paths), "--out", str(tmp_path / "m")])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "m" / "result.json").exists()


@pytest.mark.parametrize("spec", ["0/3", "4/3", "1", "a/b"])
def test_bad_shard_spec_is_a_usage_error(model_factory, tmp_path, spec):
    assert _scan(model_factory("coop", CLASSES), _policy(tmp_path, "fast"), tmp_path / "o", "--shard", spec) == 4
