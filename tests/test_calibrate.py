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


def _fake_copies(monkeypatch):
    """Stand-ins for training and scanning copies: planted copies score 3, clean ones 1; the pool is recorded."""
    from types import SimpleNamespace

    import gatekeeper.control
    import gatekeeper.pipeline

    pools = []

    def scan(copy, pool, policy, provenance):
        pools.append(pool.info.source)
        planted = copy[1] is not None
        d = SimpleNamespace(s_max=3.0 if planted else 1.0, verdict=SimpleNamespace(value="pass"), suspect_class=None)
        return SimpleNamespace(decision=d)

    monkeypatch.setattr(gatekeeper.control, "train_copy", lambda model, labeller, target, *a, **k: ((model, target), None))
    monkeypatch.setattr(gatekeeper.pipeline, "reference_model", lambda model: model)
    monkeypatch.setattr(gatekeeper.pipeline, "detect", scan)
    return pools


def test_calibrate_on_the_backbone_scans_on_the_given_ood_pool_and_records_it(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from tests.conftest import DEMO_ZOO

    pools = _fake_copies(monkeypatch)
    policy = tmp_path / "p.yaml"
    policy.write_text("ood_budget: 8\nholdout: 8\nscoring: differential\n")
    images = tmp_path / "ood"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    base = ["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--policy", str(policy), "--copies", "2", "--device", "cpu"]
    assert main([*base, "--ood", f"dir:{images}", "--out", str(tmp_path / "dir.yaml")]) == 0
    assert pools and set(pools) == {f"dir:{images}"}
    cal = load_policy(str(tmp_path / "dir.yaml")).calibration
    assert cal is not None and cal.pool == f"dir:{images}" and cal.pool_hash and len(cal.pool_hash) == 64
    assert f"on the OOD pool dir:{images}" in (tmp_path / "dir.yaml").read_text().splitlines()[0]
    assert main([*base, "--ood", "procedural:7", "--out", str(tmp_path / "seed.yaml")]) == 0
    assert load_policy(str(tmp_path / "seed.yaml")).calibration.pool == "procedural:7"
    assert main([*base, "--out", str(tmp_path / "default.yaml")]) == 0  # default: the scan's default pool
    assert load_policy(str(tmp_path / "default.yaml")).calibration.pool == "procedural:0"


def test_calibrate_ood_errors_are_usage_errors_before_any_model_loads(tmp_path, capsys):
    from tests.conftest import DEMO_ZOO

    policy = tmp_path / "p.yaml"
    policy.write_text("scoring: differential\n")
    base = ["calibrate", "--backbone", str(DEMO_ZOO / "clean"), "--policy", str(policy)]
    assert main([*base, "--ood", "dir:/no/such/folder", "--out", str(tmp_path / "a.yaml")]) == 4
    assert main([*base, "--ood", "procedural:x", "--out", str(tmp_path / "a.yaml")]) == 4
    r = tmp_path / "r.json"
    _result(r, 1.0)
    assert main(["calibrate", "--clean", str(r), str(r), "--backdoored", str(r), str(r), "--ood", "procedural", "--out", str(tmp_path / "a.yaml")]) == 4
    assert "--ood applies with --backbone only" in capsys.readouterr().err
    assert not (tmp_path / "a.yaml").exists()


def test_calibrate_from_results_records_their_pool_and_refuses_mixed_pools(tmp_path, capsys):
    def with_pool(path, s_max, source, digest):
        _result(path, s_max)
        d = json.loads(path.read_text())
        d["pool"] = {"source": source, "content_hash": digest}
        path.write_text(json.dumps(d))
        return str(path)

    clean = [with_pool(tmp_path / f"c{i}.json", s, "procedural:3", "ab" * 32) for i, s in enumerate([1.0, 1.2])]
    bad = [with_pool(tmp_path / f"b{i}.json", s, "procedural:3", "ab" * 32) for i, s in enumerate([2.5, 3.1])]
    assert main(["calibrate", "--clean", *clean, "--backdoored", *bad, "--out", str(tmp_path / "p.yaml")]) == 0
    cal = load_policy(str(tmp_path / "p.yaml")).calibration
    assert (cal.pool, cal.pool_hash) == ("procedural:3", "ab" * 32)
    other = with_pool(tmp_path / "b9.json", 2.9, "procedural:4", "cd" * 32)
    assert main(["calibrate", "--clean", *clean, "--backdoored", bad[0], other, "--out", str(tmp_path / "q.yaml")]) == 2
    assert "different OOD pools" in capsys.readouterr().err and not (tmp_path / "q.yaml").exists()


def test_a_policy_without_a_recorded_pool_keeps_its_digest():
    plain = policy_from_mapping({"scoring": "differential", "calibration": {"tau": 2.0, "n_candidates": 12, "ood_budget": 1000, "epsilon": 4 / 255}})
    assert "pool" not in plain.to_dict()["calibration"]
    pooled = policy_from_mapping(
        {"scoring": "differential", "calibration": {"tau": 2.0, "n_candidates": 12, "ood_budget": 1000, "epsilon": 4 / 255, "pool": "procedural:0"}}
    )
    assert pooled.calibration.pool == "procedural:0" and pooled.digest() != plain.digest()
    with pytest.raises(PolicyError, match="calibration.pool"):
        policy_from_mapping({"scoring": "differential", "calibration": {"tau": 2.0, "n_candidates": 12, "ood_budget": 1000, "epsilon": 4 / 255, "pool": 3}})
