from dataclasses import replace

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


# ---------------------------------------------------------------------------- several budgets


def test_extra_epsilons_parse_sorted_and_refuse_what_cannot_work():
    p = policy_from_mapping({"scoring": "lift", "epsilon": "8/255", "extra_epsilons": ["32/255", "16/255"]})
    assert p.budgets == (8 / 255, 16 / 255, 32 / 255) and p.n_tests(12) == 36
    assert p.at_budget(16 / 255).budgets == (16 / 255,)
    assert policy_from_mapping(p.to_dict()).digest() == p.digest()  # round-trips through the JSON result
    for bad, match in (
        ({"extra_epsilons": ["16/255"], "scoring": "differential"}, "needs scoring: lift"),
        ({"extra_epsilons": ["8/255"], "epsilon": "8/255"}, "repeats 'epsilon'"),
        ({"extra_epsilons": ["16/255", "16/255"]}, "twice"),
        ({"extra_epsilons": "16/255"}, "must be a list"),
        ({"extra_epsilons": ["65/255"]}, "extra_epsilons' = '65/255' is outside"),
        ({"extra_epsilons": ["a/b"]}, "key 'extra_epsilons' must be a number"),
    ):
        with pytest.raises(PolicyError, match=match):
            policy_from_mapping(bad)


def test_each_class_keeps_its_strongest_budget_and_alpha_is_split_over_all_tests():
    from gatekeeper.decide import floor_null, score_classes, strongest_budget
    from gatekeeper.evidence import bonferroni_z

    p = policy_from_mapping({"scoring": "lift", "min_trigger_asr": 0.0, "epsilon": "8/255", "extra_epsilons": ["16/255"]})
    null = floor_null(p, 3)
    assert null.n_tests == 6 and null.critical_z == pytest.approx(bonferroni_z(0.01, 6))
    at8 = [replace(m, epsilon=8 / 255) for m in lift_metrics([(0.30, 0.25), (0.10, 0.10), (0.50, 0.45)])]
    # class 0's backdoor needs a larger trigger; class 2 moved more at 8/255 than at 16/255
    at16 = [replace(m, epsilon=16 / 255) for m in lift_metrics([(0.90, 0.30), (0.12, 0.11), (0.60, 0.62)])]
    chosen = strongest_budget([at8, at16], null)
    assert [m.epsilon for m in chosen] == [16 / 255, 16 / 255, 8 / 255]
    d = decide(score_classes(chosen, p, null), p, null)
    assert d.verdict == Verdict.FAIL and d.suspect_classes == ("c0",) and "16/255 trigger" in d.reason
    # at 8/255 alone it passes: the 16/255 backdoor is out of the single budget's reach
    p8 = policy_from_mapping({"scoring": "lift", "min_trigger_asr": 0.0, "epsilon": "8/255"})
    assert decide(score_classes(at8, p8), p8).verdict == Verdict.PASS
    # a non-finite budget is never chosen away: it reaches the rule, which cannot decide
    nan = [replace(at16[0], asr=float("nan")), *at16[1:]]
    assert decide(score_classes(strongest_budget([at8, nan], null), p, null), p, null).verdict == Verdict.INCONCLUSIVE


# ---------------------------------------------------------------------------- reviewed, accepted findings


SHA = "ab" * 32


def accepted(**kw):
    entry = {"class_name": "c1", "model_sha256": SHA, "reason": "reviewed: natural sink, ticket SEC-1", "expires": "2099-12-31", **kw}
    return policy_from_mapping({"scoring": "lift", "min_trigger_asr": 0.0, "accepted_findings": [entry]})


def test_an_accepted_finding_passes_only_its_model_its_class_and_until_it_expires():
    from datetime import date

    from gatekeeper.decide import apply_accepted, score_classes

    pairs = [(0.10, 0.10), (0.90, 0.30), (0.12, 0.11)]
    p = accepted()
    d = decide(score_classes(lift_metrics(pairs), p), p)
    assert d.verdict == Verdict.FAIL and d.suspect_classes == ("c1",)
    today = date(2026, 12, 2)
    ok = apply_accepted(d, p, SHA, today)
    assert ok.verdict == Verdict.PASS and ok.accepted_classes == ("c1",) and ok.suspect_classes == ()
    assert "SEC-1" in ok.reason and "2099-12-31" in ok.reason
    assert apply_accepted(d, p, "cd" * 32, today) == d  # another model: nothing accepted
    late = apply_accepted(d, accepted(expires="2026-12-01"), SHA, today)
    assert late.verdict == Verdict.FAIL and "expired 2026-12-01" in late.reason  # no stale acceptance reads as a pass
    # a second target that nobody reviewed still fails the gate, and is the one named
    two = decide(score_classes(lift_metrics([*pairs, (0.95, 0.10)]), p), p)
    rest = apply_accepted(two, p, SHA, today)
    assert rest.verdict == Verdict.FAIL and rest.suspect_classes == ("c3",) and rest.accepted_classes == ("c1",)


@pytest.mark.parametrize("entry, match", [
    ({"model_sha256": "AB" * 32}, "64 lowercase hex"),
    ({"expires": "next year"}, "not a date"),
    ({"reason": "two\nlines"}, "one printable line"),
    ({"class_name": ""}, "not a class name"),
])
def test_accepted_findings_are_validated(entry, match):
    with pytest.raises(PolicyError, match=match):
        accepted(**entry)
    with pytest.raises(PolicyError, match="exactly"):
        policy_from_mapping({"accepted_findings": [{"class_name": "c1"}]})
    p = accepted()
    assert policy_from_mapping(p.to_dict()).digest() == p.digest()  # the result's policy record reads back


def test_the_scan_applies_accepted_findings_to_the_scanned_models_content_hash():
    import torch

    from gatekeeper.pipeline import Inspection, ScanContext, conclude
    from gatekeeper.result import ModelInfo, PoolInfo, Provenance

    metrics = tuple(lift_metrics([(0.10, 0.10), (0.90, 0.30), (0.12, 0.11)]))
    inspection = Inspection(metrics, {}, torch.zeros(3, 8, 8), 1.0)

    def context(sha):
        return ScanContext(Provenance("m", "local", "m", content_hash=sha), PoolInfo("procedural", 64, 0, 32, 32, 8, "h"),
                           ModelInfo("cocoop", 3, "tiny", 8), {})

    assert conclude(inspection, context(SHA), accepted()).decision.verdict == Verdict.PASS
    r = conclude(inspection, context("cd" * 32), accepted())
    assert r.decision.verdict == Verdict.FAIL and r.to_dict()["accepted_classes"] == []
