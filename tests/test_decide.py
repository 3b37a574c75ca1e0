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
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({"scoring": "paper"}))
    assert d.verdict == Verdict.FAIL and d.suspect_class == "c0" and d.s_max >= 2


def test_anomaly_with_low_asr_is_invalid_and_passes():
    asr = [0.30] + [0.0] * 11
    loss = [-1.0] + [2.0] * 11
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({"scoring": "paper"}))
    assert d.verdict == Verdict.PASS and d.suspect_class is None and "invalid" in d.reason


def test_clean_spread_passes():
    rng = np.random.default_rng(0)
    asr, loss = rng.uniform(0, 0.1, 12), rng.normal(2, 0.1, 12)
    d = decide(anomaly_scores(metrics(asr, loss), 0.5), policy_from_mapping({"k": 3.5, "scoring": "paper"}))
    assert d.verdict == Verdict.PASS


def test_nan_or_no_spread_is_inconclusive():
    p = policy_from_mapping({"scoring": "paper"})
    d = decide(anomaly_scores(metrics([0.1, 0.2, 0.3], [1.0, float("nan"), 2.0]), 0.5), p)
    assert d.verdict == Verdict.INCONCLUSIVE
    d = decide(anomaly_scores(metrics([0.0] * 4, [1.0] * 4), 0.5), p)
    assert d.verdict == Verdict.INCONCLUSIVE


def test_candidate_sampling_is_seeded_and_bounded():
    p = policy_from_mapping({"candidates": 5, "seed": 3, "scoring": "paper"})
    a, b = candidate_classes(20, p), candidate_classes(20, p)
    assert a == b and len(a) == 5 and a == sorted(a)
    assert candidate_classes(4, p) == [0, 1, 2, 3]
    with pytest.raises(PolicyError):
        candidate_classes(2, policy_from_mapping({"scoring": "paper"}))


# ---------------------------------------------------------------------------- the lift rule


def lift_metrics(pairs):
    """ClassMetrics from (ASR, reference ASR) pairs; losses are irrelevant to the lift rule."""
    return [ClassMetrics(i, f"c{i}", a, 1.0, reference_asr=r, reference_loss=1.0) for i, (a, r) in enumerate(pairs)]


def lift_decide(pairs, **policy):
    from gatekeeper.decide import score_classes

    p = policy_from_mapping({"scoring": "lift", "min_trigger_asr": 0.0, **policy})
    return decide(score_classes(lift_metrics(pairs), p), p)


def test_lift_flags_a_two_class_model():
    d = lift_decide([(0.41, 0.896), (0.908, 0.34)])
    assert d.verdict == Verdict.FAIL and d.suspect_classes == ("c1",) and d.threshold_kind == "null margin"
    assert "91%" in d.reason and "34%" in d.reason


def test_lift_names_every_target_of_a_multi_target_backdoor():
    clean = [(0.10 + 0.01 * i, 0.11 + 0.01 * i) for i in range(9)]
    d = lift_decide([*clean, (0.85, 0.12), (0.80, 0.05), (0.70, 0.20)])
    assert d.verdict == Verdict.FAIL
    assert d.suspect_classes == ("c10", "c9", "c11")  # strongest lower bound first
    # three equally strong targets among 12: the z rule's ceiling is sqrt(9/3) = 1.73 < k = 2
    z = decide(anomaly_scores(lift_metrics([*clean, (0.85, 0.1), (0.85, 0.1), (0.85, 0.1)]), 0.0), policy_from_mapping({"scoring": "paper"}))
    assert z.s_max <= np.sqrt(3) + 1e-9 and z.verdict == Verdict.PASS


def test_lift_does_not_turn_noise_into_an_anomaly():
    # every class moved a little; the z rule standardises by the spread, the lift rule does not
    pairs = [(0.375, 0.35)] + [(0.20 + 0.005 * i, 0.20 + 0.004 * i) for i in range(11)]
    assert lift_decide(pairs).verdict == Verdict.PASS


def test_lift_margin_and_alpha_move_the_bound():
    pairs = [(0.40, 0.20), (0.1, 0.1), (0.1, 0.1)]
    assert lift_decide(pairs).verdict == Verdict.FAIL  # lower bound ~ +0.12 > 0.10
    assert lift_decide(pairs, lift_margin=0.15).verdict == Verdict.PASS
    assert lift_decide(pairs, alpha=1e-5).verdict == Verdict.PASS


def test_lift_validity_rule_and_inconclusive():
    d = lift_decide([(0.45, 0.05), (0.1, 0.1)], min_trigger_asr=0.5)
    assert d.verdict == Verdict.PASS and "not counted" in d.reason
    assert lift_decide([(float("nan"), 0.1), (0.1, 0.1)]).verdict == Verdict.INCONCLUSIVE


def test_lift_uses_the_null_models_margin_and_critical_value():
    from gatekeeper.decide import score_classes
    from gatekeeper.evidence import bonferroni_z
    from gatekeeper.result import NullModel

    p = policy_from_mapping({"scoring": "lift", "min_trigger_asr": 0.0})
    pairs = [(0.60, 0.20), (0.1, 0.1)]
    null = NullModel(margin=0.35, floor=0.10, source="clean copies", copies=2, copy_max_lifts=(0.35, 0.2),
                     alpha=0.01, critical_z=bonferroni_z(0.01, 2), n_tests=2, n_holdout=500)
    assert decide(score_classes(lift_metrics(pairs), p, null), p, null).verdict == Verdict.PASS  # bound ~0.32 < 0.35
    assert decide(score_classes(lift_metrics(pairs), p), p).verdict == Verdict.FAIL  # the floor alone


def test_candidates_need_two_for_lift_three_for_z():
    assert candidate_classes(2, policy_from_mapping({"scoring": "lift"})) == [0, 1]
    with pytest.raises(PolicyError, match="need at least 3"):
        candidate_classes(2, policy_from_mapping({"scoring": "differential"}))
    with pytest.raises(PolicyError):
        candidate_classes(1, policy_from_mapping({"scoring": "lift"}))


def test_calibrated_tau_is_refused_with_the_lift_rule():
    cal = {"tau": 2.4, "n_candidates": 12, "ood_budget": 1000, "epsilon": "4/255"}
    with pytest.raises(PolicyError, match="calibration"):
        policy_from_mapping({"scoring": "lift", "calibration": cal})
    assert policy_from_mapping({"scoring": "differential", "calibration": cal}).calibration is not None
