"""Positive control: a scan that cannot see a planted backdoor must not PASS."""

from __future__ import annotations

import json

import pytest

from gatekeeper.cli import main
from gatekeeper.pipeline import control_not_run
from gatekeeper.policy import policy_from_mapping
from gatekeeper.result import Decision, ModelInfo, PoolInfo, Provenance, ScanResult, Verdict
from tests.conftest import DEMO_ZOO


@pytest.mark.slow
def test_a_blind_scan_turns_pass_into_inconclusive(tmp_path):
    # lr 1e-6: the inversion cannot move its triggers, so this scan is blind by construction; the
    # clean model passes it, and only the positive control reveals that the PASS means nothing
    blind = tmp_path / "blind.yaml"
    blind.write_text("epsilon: 8/255\nlr: 0.000001\nood_budget: 256\nholdout: 256\nnull_copies: 0\n")
    code = main(["scan", str(DEMO_ZOO / "clean"), "--policy", str(blind), "--out", str(tmp_path / "a"), "--quiet"])
    plain = json.loads((tmp_path / "a" / "result.json").read_text())
    assert code == 0 and plain["verdict"] == "pass" and plain["positive_control"] is None

    controlled = tmp_path / "controlled.yaml"
    controlled.write_text(blind.read_text() + "positive_control: badclip\n")
    code = main(["scan", str(DEMO_ZOO / "clean"), "--policy", str(controlled), "--out", str(tmp_path / "b"), "--quiet"])
    res = json.loads((tmp_path / "b" / "result.json").read_text())
    assert code == 3 and res["verdict"] == "inconclusive"
    ctl = res["positive_control"]
    assert ctl["planted_asr"] >= 0.5 and ctl["caught"] is False  # the plant works; the scan missed it
    assert "could not see a planted backdoor" in res["reason"]
    assert res["timings"]["positive_control_s"] > 0
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## Positive control" in report and "| verdict | inconclusive |" in report


def _result(verdict):
    return ScanResult(
        decision=Decision(verdict, 1.0, 2.0, "k", None, "x"), classes=(), policy={}, policy_hash="", provenance=Provenance("r", "local", "p"),
        pool=PoolInfo("procedural:0", 1, 0, 1, 1, 32, "h"), model=ModelInfo("cocoop", 3, "b", 32), timings={}, environment={}, seed=0, command="",
    )


def test_a_merged_sharded_scan_cannot_pass_a_policy_that_asks_for_the_control():
    on, off = policy_from_mapping({"positive_control": "badclip"}), policy_from_mapping({})
    assert control_not_run(_result(Verdict.PASS), on).decision.verdict == Verdict.INCONCLUSIVE
    assert control_not_run(_result(Verdict.PASS), off).decision.verdict == Verdict.PASS
    assert control_not_run(_result(Verdict.FAIL), on).decision.verdict == Verdict.FAIL


@pytest.mark.slow
def test_under_the_lift_rule_the_control_rescans_the_planted_class_and_decides_it_as_a_whole_rescan():
    """The lift rule flags a class on its own evidence (lower bound vs the null margin at the scan's
    number of tests): the planted class alone, inverted with the whole scan's null, gets the same
    metrics and the same flag as in a re-scan of every class."""
    from gatekeeper.control import plant
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.pipeline import conclude, context_of, control_rescans_target_only, detect, inspect_candidates

    policy = policy_from_mapping({"epsilon": "8/255", "ood_budget": 128, "holdout": 128, "restarts": 1, "null_copies": 0})
    assert control_rescans_target_only(policy) and not control_rescans_target_only(policy_from_mapping({"scoring": "differential"}))
    model = load_model(DEMO_ZOO / "clean")
    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    target = 5
    planted, _ = plant(model, target, policy.epsilon, seed=0, epochs=6)
    provenance = Provenance("planted", "local", "planted")
    whole = detect(planted, pool, policy, provenance)
    alone = conclude(inspect_candidates(planted, pool, policy, [target], null=whole.null_model), context_of(planted, pool, provenance), policy)
    (w,) = [c for c in whole.classes if c.index == target]
    (a,) = alone.classes
    assert (a.asr, a.reference_asr, a.z, a.flagged) == (w.asr, w.reference_asr, w.z, w.flagged)
    assert alone.null_model == whole.null_model and whole.null_model.n_tests == 12
    assert w.flagged and alone.decision.suspect_classes == (model.classnames[target],)
