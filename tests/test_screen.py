"""Screening: every class briefly inverted, the highest screening lifts inverted in full."""

from __future__ import annotations

import json

import pytest

from gatekeeper.cli import main
from gatekeeper.policy import Detector, policy_from_mapping
from gatekeeper.screen import ScreenedClass, rank_key, screens
from tests.conftest import DEMO_ZOO

LIGHT = "epsilon: 8/255\nood_budget: 128\nholdout: 128\nrestarts: 1\nnull_copies: 0\n"


def test_a_scan_screens_only_more_classes_than_it_keeps_and_only_with_clip_inspector():
    policy = policy_from_mapping({"screen_keep": 64})
    assert not screens(policy, 64) and screens(policy, 65)
    assert not screens(policy_from_mapping({"screen_keep": 0}), 1000)
    assert not screens(policy_from_mapping({"screen_keep": 4, "detector": Detector.NEURAL_CLEANSE.value}), 12)


def test_screening_ranks_by_lift_then_asr_then_index():
    rows = [ScreenedClass(0, "sink", 8 / 255, 0.9, 0.85, False), ScreenedClass(1, "target", 8 / 255, 0.6, 0.1, False),
            ScreenedClass(2, "b", 8 / 255, 0.3, 0.1, False), ScreenedClass(3, "a", 8 / 255, 0.3, 0.1, False)]
    assert [c.name for c in sorted(rows, key=rank_key)] == ["target", "b", "a", "sink"]  # a natural sink does not crowd out; ties: lower index


@pytest.mark.slow
def test_the_screening_keeps_the_planted_target_and_the_scan_names_it(tmp_path):
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    policy = tmp_path / "screened.yaml"
    policy.write_text(LIGHT + "screen_keep: 3\nscreen_images: 32\n")
    code = main(["scan", str(DEMO_ZOO / "backdoored"), "--policy", str(policy), "--out", str(tmp_path / "out"), "--quiet"])
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    screening = res["screening"]
    assert screening["screened"] == 12 and len(screening["kept"]) == 3 and screening["images"] == 32
    assert truth["target_index"] in screening["kept"]
    assert len(screening["classes"]) == 12 and sum(c["kept"] for c in screening["classes"]) == 3
    assert code == 1 and res["suspect_classes"] == [truth["target_class"]], res["reason"]
    assert len(res["classes"]) == 3 and res["null_model"]["n_tests"] == 3  # the tests run are the kept classes
    assert res["timings"]["screening_s"] > 0
    assert "**Screening.** 12 candidate classes" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_without_screening_the_result_says_so(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(LIGHT + "screen_keep: 12\n")
    main(["scan", str(DEMO_ZOO / "backdoored"), "--policy", str(policy), "--out", str(tmp_path / "out"), "--quiet"])
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["screening"] is None and len(res["classes"]) == 12 and "**Screening.**" not in (tmp_path / "out" / "report.md").read_text()
