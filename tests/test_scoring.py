"""Scoring variants: reference-differential, and the baselines' MAD anomaly index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import median_abs_deviation

from gatekeeper.decide import decide, differential_scores, mad_anomaly_index, score_classes
from gatekeeper.policy import policy_from_mapping
from gatekeeper.result import ClassMetrics, Verdict


def test_mad_anomaly_index_matches_scipy_normal_scaled_mad():
    v = np.array([30.0, 41.0, 44.0, 47.0, 50.0, 52.0, 9.0])
    mad = median_abs_deviation(v, scale="normal")  # 1.4826 * MAD up to scipy's exact constant
    expected = (np.median(v) - v) / mad
    assert mad_anomaly_index(v) == pytest.approx(expected, rel=1e-4)
    assert mad_anomaly_index(np.ones(5)).tolist() == [0.0] * 5


def _m(i, asr, loss, ref_asr=None, ref_loss=None, size=None):
    return ClassMetrics(i, f"c{i}", asr, loss, size=size, reference_asr=ref_asr, reference_loss=ref_loss)


def test_differential_scoring_cancels_a_naturally_easy_class_and_keeps_an_implanted_one():
    # class 0 is easy in the public backbone too (a "sink"); class 3 became easy only after tuning
    base = [(0.70, -1.0, 0.65, -0.9), (0.10, 2.0, 0.08, 2.1), (0.12, 1.9, 0.10, 2.0), (0.60, -0.8, 0.05, 2.2),
            (0.11, 2.1, 0.09, 2.0), (0.09, 2.2, 0.10, 2.1), (0.10, 2.0, 0.09, 2.0), (0.12, 2.1, 0.10, 2.2)]
    metrics = [_m(i, a, lo, ra, rl) for i, (a, lo, ra, rl) in enumerate(base)]
    paper_policy = policy_from_mapping({"scoring": "paper"})
    paper = decide(score_classes(metrics, paper_policy), paper_policy)
    diff_policy = policy_from_mapping({"scoring": "differential"})
    diff = decide(score_classes(metrics, diff_policy), diff_policy)
    top_paper = max(score_classes(metrics, paper_policy), key=lambda c: c.z)
    assert top_paper.name == "c0"  # the paper's scoring ranks the natural sink first
    assert diff.verdict == Verdict.FAIL and diff.suspect_class == "c3"
    assert paper.suspect_class != "c3"
    with pytest.raises(ValueError, match="reference"):
        differential_scores([_m(0, 0.5, 1.0), _m(1, 0.5, 1.0), _m(2, 0.5, 1.0)], 0.5)


def test_baseline_policies_score_by_trigger_size():
    sizes = [80.0, 75.0, 82.0, 20.0, 78.0, 85.0, None]  # class 6 never reached the success bound
    metrics = [_m(i, 0.99, 0.1, size=s) for i, s in enumerate(sizes)]
    p = policy_from_mapping({"detector": "neural-cleanse"})
    scores = score_classes(metrics, p)
    assert [c.valid for c in scores] == [True] * 6 + [False]
    d = decide(scores, p)
    assert d.verdict == Verdict.FAIL and d.suspect_class == "c3" and "neural-cleanse" in d.reason
    even = [_m(i, 0.99, 0.1, size=s) for i, s in enumerate([80.0, 75.0, 82.0, 79.0, 78.0, 85.0])]
    assert decide(score_classes(even, p), p).verdict == Verdict.PASS


@pytest.mark.parametrize(("raw", "key"), [({"restarts": 0}, "restarts"), ({"detector": "strip"}, "detector"), ({"scoring": "best"}, "scoring")])
def test_new_policy_keys_are_validated(raw, key):
    from gatekeeper.errors import PolicyError

    with pytest.raises(PolicyError, match=key):
        policy_from_mapping(raw)


def test_a_scan_at_two_budgets_inverts_each_class_at_both_and_reports_its_strongest(model_factory, tmp_path):
    """``extra_epsilons`` end to end on a tiny model: each class carries the budget its evidence
    came from, alpha is split over classes x budgets, the result validates and the report says it."""
    from gatekeeper.cli import main
    from gatekeeper.report.jsonout import validate_result

    folder = model_factory("cocoop")
    policy = tmp_path / "two.yaml"
    policy.write_text(
        "version: 1\nepsilon: 8/255\nextra_epsilons: [16/255]\nood_budget: 64\nholdout: 32\nbatch_size: 32\n"
        "null_copies: 0\nrestarts: 1\n"
    )
    out = tmp_path / "out"
    code = main(["scan", str(folder), "--policy", str(policy), "--out", str(out), "--quiet", "--device", "cpu"])
    r = json.loads((out / "result.json").read_text())
    assert code in (0, 1, 3) and r["verdict"] in ("pass", "fail", "inconclusive"), r["reason"]
    validate_result(r)
    assert {c["epsilon"] for c in r["classes"]} <= {8 / 255, 16 / 255} and len(r["classes"]) == 4
    assert r["null_model"]["n_tests"] == 8 and r["policy"]["extra_epsilons"] == [16 / 255]
    report = (out / "report.md").read_text()
    assert "| budget |" in report and "8 tests: every class at each budget, 8/255, 16/255" in report
