"""gatekeeper-lab bench screening: where the screening ranks each true target of a zoo."""

from __future__ import annotations

import json

import pytest

from gatekeeper.bench.screening import markdown, named_targets, run
from gatekeeper.policy import policy_from_mapping
from tests.conftest import DEMO_ZOO


@pytest.mark.slow
def test_the_screening_ranks_the_demo_backdoors_target_first_and_resumes_from_its_cache(tmp_path):
    policy = policy_from_mapping({"epsilon": "8/255", "ood_budget": 256, "holdout": 64, "screen_images": 64})
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    named = {"backdoored": [truth["target_class"]]}
    r = run(DEMO_ZOO, tmp_path, policy, log=lambda s: None, named=named)
    [row] = r["models"]  # the clean model has no target
    assert row["model"] == "backdoored" and row["classes"] == 12 and row["images"] == 64
    assert row["ranks"] == {truth["target_class"]: 1} and row["non_targets_above"] == {truth["target_class"]: 0}
    assert r["recall_at"]["1"] == 1.0 and r["named_by_full_scan"] == {"targets": 1, "kept_first_among_non_targets": 1, "outranked": []}
    text = markdown(r)
    assert "| backdoored | 12 | orange square: 1 (0) |" in text and "Of the 1 true targets the full scan names, 1 rank above" in text
    again = run(DEMO_ZOO, tmp_path, policy, log=lambda s: pytest.fail(f"recomputed: {s}"), named=named)
    assert again["models"] == r["models"]


def test_named_targets_are_the_true_targets_among_the_full_scans_suspects(tmp_path):
    full = tmp_path / "detection-full.json"
    models = [{"model": "m3", "targets": ["a", "b", "c"], "suspects": ["a", "c", "x"]}, {"model": "clean", "targets": [], "suspects": []}]
    full.write_text(json.dumps({"detectors": {"v": {"models": models}}}))
    assert named_targets(full, "v") == {"m3": ["a", "c"], "clean": []}
    assert named_targets(None, "v") is None
