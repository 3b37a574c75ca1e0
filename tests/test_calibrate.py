"""Youden's J and AUROC against scikit-learn; `gatekeeper calibrate` writes a policy whose tau is scoped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from gatekeeper.calibrate import youden_threshold
from gatekeeper.cli import main
from gatekeeper.errors import PolicyError
from gatekeeper.policy import load_policy, policy_from_mapping


@pytest.mark.parametrize("seed", range(5))
def test_youden_matches_scikit_learn_roc(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 15 + [1] * 12)
    scores = np.concatenate([rng.normal(1.5, 0.5, 15), rng.normal(2.6, 0.6, 12)]).round(2)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j_ref = float(np.max(tpr - fpr))
    tau, j, t, f = youden_threshold(labels, scores)
    assert j == pytest.approx(j_ref)
    flagged = scores >= tau
    assert t == pytest.approx(flagged[labels == 1].mean()) and f == pytest.approx(flagged[labels == 0].mean())
    assert tau in set(thresholds.tolist())


def test_perfect_separation_picks_the_lowest_backdoor_score():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([1.0, 1.2, 1.9, 2.4, 3.0])
    assert youden_threshold(labels, scores) == (2.4, 1.0, 1.0, 0.0)


def _result(path, s_max, n_classes=12, budget=1000, scoring="differential"):
    policy = policy_from_mapping({"ood_budget": budget, "scoring": scoring}).to_dict()
    classes = [{"name": f"c{i}"} for i in range(n_classes)]
    path.write_text(json.dumps({"verdict": "pass", "s_max": s_max, "policy": policy, "classes": classes}))
    return str(path)


def test_calibrate_writes_a_scoped_policy(tmp_path, capsys):
    clean = [_result(tmp_path / f"c{i}.json", s) for i, s in enumerate([1.1, 1.6, 2.1, 1.3])]
    bad = [_result(tmp_path / f"b{i}.json", s) for i, s in enumerate([2.5, 3.1, 2.2])]
    out = tmp_path / "calibrated.yaml"
    assert main(["calibrate", "--clean", *clean, "--backdoored", *bad, "--out", str(out)]) == 0
    policy = load_policy(out)
    assert policy.calibration is not None and policy.calibration.tau == 2.2
    scores = [1.1, 1.6, 2.1, 1.3, 2.5, 3.1, 2.2]
    assert f"AUROC {roc_auc_score([0] * 4 + [1] * 3, scores):.3f}" in out.read_text()
    assert policy.threshold(12) == (2.2, "tau")
    with pytest.raises(PolicyError):
        policy.threshold(20)
    assert main(["calibrate", "--clean", *clean, "--backdoored", *bad, "--out", str(out)]) == 4  # never overwrites


def test_calibrate_refuses_mixed_settings(tmp_path, capsys):
    clean = [_result(tmp_path / "c0.json", 1.0), _result(tmp_path / "c1.json", 1.2, n_classes=20)]
    bad = [_result(tmp_path / "b0.json", 3.0), _result(tmp_path / "b1.json", 2.9)]
    code = main(["calibrate", "--clean", *clean, "--backdoored", *bad, "--out", str(tmp_path / "p.yaml")])
    assert code == 2 and "different settings" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.slow
def test_calibrate_on_the_users_own_backbone_builds_clean_and_planted_copies(tmp_path, capsys):
    from tests.conftest import DEMO_ZOO

    policy = tmp_path / "p.yaml"
    policy.write_text("epsilon: 8/255\nood_budget: 64\nholdout: 32\nscoring: differential\n")
    out = tmp_path / "cal.yaml"
    code = main(["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--policy", str(policy), "--copies", "2", "--epochs", "2", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("clean: s_max") == 2 and err.count("planted: s_max") == 2
    cal = load_policy(str(out)).calibration
    assert cal is not None and cal.n_candidates == 12 and cal.ood_budget == 64
    assert "Youden" in out.read_text().splitlines()[0]


def test_calibrate_backbone_refuses_mixed_or_too_few_inputs(tmp_path, capsys):
    from tests.conftest import DEMO_ZOO

    r = tmp_path / "r.json"
    _result(r, 1.0)
    assert main(["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--clean", str(r), "--out", str(tmp_path / "a.yaml")]) == 4
    assert "either --backbone or --clean" in capsys.readouterr().err
    diff = tmp_path / "diff.yaml"
    diff.write_text("scoring: differential\n")
    assert main(["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--policy", str(diff), "--copies", "1", "--out", str(tmp_path / "b.yaml")]) == 4
    assert "at least 2 clean and 2 planted" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path / "c.yaml")]) == 4
    assert main(["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--out", str(tmp_path / "d.yaml")]) == 4  # default: lift
    assert "not calibrated with a tau" in capsys.readouterr().err
    assert not any(p.name != "diff.yaml" for p in tmp_path.glob("*.yaml"))


def test_calibrate_refuses_lift_results(tmp_path, capsys):
    clean = [_result(tmp_path / f"c{i}.json", s, scoring="lift") for i, s in enumerate([0.01, 0.02])]
    bad = [_result(tmp_path / f"b{i}.json", s, scoring="lift") for i, s in enumerate([0.5, 0.6])]
    assert main(["calibrate", "--clean", *clean, "--backdoored", *bad, "--out", str(tmp_path / "p.yaml")]) == 4
    assert "null margin" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()
