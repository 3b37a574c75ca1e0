"""The detection benchmark's metrics against scikit-learn, and its class-level counting."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc, f1_score, roc_auc_score

from gatekeeper.bench.detection import Outcome, class_counts, f1, summarize
from gatekeeper.calibrate import auroc, roc_points


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_roc_curve_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = rng.normal(labels * 1.2, 1.0).round(1)  # rounding makes ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr = roc_points(labels, scores)
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_extremes():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auroc(np.array([0, 1]), np.array([1.0, 1.0])) == 0.5


def _o(attack, flagged, suspect=None, target="t", s=1.0):
    return Outcome("m", "task", attack, None if attack == "clean" else target, s, flagged, suspect, 1.0)


def test_class_level_counts_and_f1_match_scikit_learn():
    outcomes = [
        _o("badclip", True, "t"),  # TP
        _o("badclip", True, "other"),  # FP + FN: flagged the wrong class
        _o("blended", False),  # FN
        _o("clean", True, "x"),  # FP
        _o("clean", False),  # TN
        _o("wanet", True, "t"),  # TP
    ]
    tp, fp, fn = class_counts(outcomes)
    assert (tp, fp, fn) == (2, 2, 2)
    # the same counts as a binary problem over (model, class) decisions
    y_true = [1, 1, 0, 1, 0, 1, 0]
    y_pred = [1, 1, 1, 0, 1, 0, 0]  # TP, TP, FP, FN, FP, FN, TN
    assert f1(tp, fp, fn) == pytest.approx(f1_score(y_true, y_pred))
    s = summarize(outcomes)
    assert s["accuracy"] == pytest.approx(4 / 6)  # flagged == backdoored on 4 of 6 models
    assert s["fpr"] == pytest.approx(0.5) and s["tpr"] == pytest.approx(3 / 4)
    assert f1(0, 0, 0) == 0.0


def test_calibrated_operating_point_is_chosen_without_the_held_out_task():
    from gatekeeper.bench.detection import calibrated

    def o(task, attack, s):
        return Outcome(f"{task}-{attack}-{s}", task, attack, None if attack == "clean" else "t", s, False, None, 1.0, top="t")

    # tasks a and b separate at 2.0 / 2.5; task c's backdoor (2.2) sits between them
    outs = [o("a", "clean", 1.0), o("a", "badclip", 2.0), o("b", "clean", 1.5), o("b", "badclip", 2.5), o("c", "clean", 1.2), o("c", "badclip", 2.2)]
    c = calibrated(outs)
    # held out c: tau from {a, b} is 2.0 (largest J, then the largest tau) -> c's 2.2 flagged, 1.2 not
    assert c["tau_per_held_out_task"]["c"] == 2.0
    # held out b: tau from {a, c} = 2.0 -> 2.5 flagged, 1.5 not; held out a: tau from {b, c} = 2.2 -> a's 2.0 missed
    assert c["tau_per_held_out_task"]["a"] == 2.2
    lo = c["leave_one_task_out"]
    assert lo["tpr"] == pytest.approx(2 / 3) and lo["fpr"] == 0.0 and lo["accuracy"] == pytest.approx(5 / 6)
    assert lo["class_tp"] == 2 and lo["class_fn"] == 1


def _run(policy_hash: str, rows: list[tuple[str, bool, float, list[str]]]) -> dict:
    from gatekeeper.bench.detection import margins

    outcomes = [Outcome(model=m, task="t", attack="clean" if m.startswith("c") else "badclip",
                        target=None if m.startswith("c") else "cat", s_max=s, flagged=flagged, suspect=(sus or [None])[0],
                        seconds=1.0, top="cat", targets=() if m.startswith("c") else ("cat",), suspects=tuple(sus))
                for m, flagged, s, sus in rows]
    det = {**summarize(outcomes), "separation": margins(outcomes, {o.model for o in outcomes}),
           "models": [{"model": o.model, "flagged": o.flagged, "s_max": o.s_max, "suspects": list(o.suspects), "targets": list(o.targets)} for o in outcomes]}
    return {"policy_hash": policy_hash, "policy": {"ood_budget": 1000}, "detectors": {"lift": det}}


def test_comparing_two_runs_names_every_verdict_and_named_class_that_differs():
    from gatekeeper.bench.detection import compare
    from gatekeeper.errors import UsageError

    a = _run("a" * 64, [("c1", False, -0.02, []), ("b1", True, 0.40, ["cat"]), ("b2", True, 0.20, ["cat"])])
    b = _run("b" * 64, [("c1", False, -0.03, []), ("b1", True, 0.35, ["cat", "dog"]), ("b2", False, 0.05, [])])
    text = compare(a, "lift", b, "lift")
    assert "Verdicts that differ: 1\n- b2: A fail (+0.200), B pass (+0.050)" in text
    assert "Named classes that differ: 2" in text and "b1 (target cat): A ['cat'], B ['cat', 'dog']" in text
    assert "median -5.0" in text  # shifts -1, -5, -15 points
    same = compare(a, "lift", a, "lift")
    assert "Verdicts that differ: 0 (every model gets the same verdict)" in same and "Named classes that differ: 0" in same
    with pytest.raises(UsageError, match="not in that run"):
        compare(a, "paper", b, "lift")
