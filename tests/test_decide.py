import numpy as np
import pytest

from gatekeeper.decide import anomaly_scores, candidate_classes, decide
from gatekeeper.errors import PolicyError
from gatekeeper.policy import policy_from_mapping
from gatekeeper.result import ClassMetrics, Verdict


def metrics(asr, loss):
    return [ClassMetrics(i, f"c{i}", a, lo) for i, (a, lo) in enumerate(zip(asr, loss, strict=False))]


def test_anomaly_scores_follow_eq_6_and_7():
    asr = np.array([0.9, 0.1, 0.05, 0.0, 0.2])
    loss = np.array([-3.0, 1.0, 1.5, 2.0, 0.5])
    scores = anomaly_scores(metrics(asr, loss), 0.5)
    za = (asr - asr.mean()) / asr.std()
    zl = (loss - loss.mean()) / loss.std()
    s = za - zl
    z = (s - s.mean()) / s.std()
    assert [c.score for c in scores] == pytest.approx(list(s))
    assert [c.z for c in scores] == pytest.approx(list(z))
    assert [c.valid for c in scores] == [True, False, False, False, False]


def test_backdoor_flagged_with_its_class():
    asr = [0.95] + [0.02] * 11
    loss = [-4.0] + [2.0 + 0.1 * i for i in range(11)]
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({}))
    assert d.verdict == Verdict.FAIL and d.suspect_class == "c0" and d.s_max >= 2


def test_anomaly_with_low_asr_is_invalid_and_passes():
    asr = [0.30] + [0.0] * 11
    loss = [-1.0] + [2.0] * 11
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({}))
    assert d.verdict == Verdict.PASS and d.suspect_class is None and "invalid" in d.reason


def test_clean_spread_passes():
    rng = np.random.default_rng(0)
    asr, loss = rng.uniform(0, 0.1, 12), rng.normal(2, 0.1, 12)
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({"k": 3.5}))
    assert d.verdict == Verdict.PASS


def test_nan_or_no_spread_is_inconclusive():
    p = policy_from_mapping({})
    d = decide(anomaly_scores(metrics([0.1, 0.2, 0.3], [1.0, float("nan"), 2.0]), 0.5), p)
    assert d.verdict == Verdict.INCONCLUSIVE
    d = decide(anomaly_scores(metrics([0.0] * 4, [1.0] * 4), 0.5), p)
    assert d.verdict == Verdict.INCONCLUSIVE


def test_candidate_sampling_is_seeded_and_bounded():
    p = policy_from_mapping({"candidates": 5, "seed": 3})
    a, b = candidate_classes(20, p), candidate_classes(20, p)
    assert a == b and len(a) == 5 and a == sorted(a)
    assert candidate_classes(4, p) == [0, 1, 2, 3]
    with pytest.raises(PolicyError):
        candidate_classes(2, policy_from_mapping({}))
