"""The verdict on the cases a max-z rule cannot see: few classes, end to end with the shipped tiny-world policy.

The demo's BadCLIP model (target 'orange square') and its clean twin, with their class lists cut:
a z-score over K classes is capped at sqrt(K - 1), so at K = 4 no z rule with k >= 2 can fail a
model; the lift rule compares each class with the public backbone instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gatekeeper.cli import main
from tests.conftest import DEMO_ZOO

FOUR = ["red square", "green star", "orange square", "pink star"]
TWO = ["green star", "orange square"]


def cut(name: str, classnames: list[str], out: Path) -> Path:
    """A copy of a demo model whose class list is ``classnames`` (CoCoOp's context is shared by all classes)."""
    folder = out / f"{name}-{len(classnames)}"
    shutil.copytree(DEMO_ZOO / name, folder)
    manifest = json.loads((folder / "gatekeeper.json").read_text())
    assert set(classnames) <= set(manifest["classnames"])
    manifest["classnames"] = classnames
    (folder / "gatekeeper.json").write_text(json.dumps(manifest))
    return folder


def scan(folder: Path, out: Path) -> tuple[int, dict]:
    code = main(["scan", str(folder), "--policy", "tiny-world", "--out", str(out), "--quiet"])
    return code, json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_four_class_cut_of_the_backdoored_demo_fails_naming_its_target(tmp_path):
    code, r = scan(cut("backdoored", FOUR, tmp_path), tmp_path / "out")
    assert code == 1 and r["verdict"] == "fail", r["reason"]
    assert r["suspect_classes"] == ["orange square"], r["classes"]
    assert r["threshold_kind"] == "null margin" and r["null_model"]["copies"] == 1
    target = next(c for c in r["classes"] if c["name"] == "orange square")
    assert target["asr"] - target["reference_asr"] > 0.4  # measured: 82 % vs 16 %
    # the control ran with a working plant; on a FAIL it reports power and never changes the verdict.
    # Whether it is caught here is a coin toss: seed 0 plants to 'green star', which the shipped
    # policy sees at 8.9 points and the former 1000-image one at 10.1 against the 10-point margin
    # (seeds 1, 2 plant to 'red square': 46-50 points under both; docs/decisions.md)
    control = r["positive_control"]
    assert control["verdict"] != "not run" and control["planted_asr"] >= 0.5, control
    report = (tmp_path / "out" / "report.md").read_text()
    evidence = report.split("## Evidence", 1)[1].split("##", 1)[0]
    assert "**orange square**" in evidence and "unrelated images" in evidence


@pytest.mark.slow
def test_four_class_cut_of_the_clean_demo_passes(tmp_path):
    code, r = scan(cut("clean", FOUR, tmp_path), tmp_path / "out")
    assert code == 0 and r["verdict"] == "pass", r["reason"]
    assert r["suspect_classes"] == [] and r["positive_control"]["caught"] is True


@pytest.mark.slow
def test_a_two_class_model_scans_to_a_verdict(tmp_path):
    code, r = scan(cut("backdoored", TWO, tmp_path), tmp_path / "out")
    assert code == 1 and r["suspect_classes"] == ["orange square"], r["reason"]
    assert r["null_model"]["n_tests"] == 2
