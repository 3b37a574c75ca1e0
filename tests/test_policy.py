from pathlib import Path

import pytest

from gatekeeper.errors import ExitCode, PolicyError
from gatekeeper.policy import Calibration, Policy, load_policy, parse_epsilon, policy_from_mapping


def test_default_policy_carries_the_papers_settings():
    p = load_policy("default")
    assert p.epsilon == pytest.approx(4 / 255)
    assert (p.batch_size, p.epochs, p.lr, p.ood_budget, p.k, p.min_trigger_asr) == (32, 1, 0.1, 1000, 2.0, 0.5)
    assert p.candidates is None and p.calibration is None


def test_every_shipped_policy_validates():
    from gatekeeper.resources import data_path

    files = sorted(data_path("policies").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        assert isinstance(load_policy(f), Policy)


@pytest.mark.parametrize("text,value", [("4/255", 4 / 255), ("16/255", 16 / 255), (0.03, 0.03), ("0.01", 0.01)])
def test_epsilon_forms(text, value):
    assert parse_epsilon(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"epsilon": "4/0"}, "epsilon"),
        ({"epsilon": "1"}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "32"}, "batch_size"),
        ({"k": -1}, "k"),
        ({"candidates": 1}, "candidates"),
        ({"detector": "magic"}, "detector"),
        ({"on_inconclusive": "maybe"}, "on_inconclusive"),
        ({"epsilom": "4/255"}, "epsilom"),
        ({"version": 2}, "version"),
        ({"calibration": {"tau": 1.0}}, "calibration"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, raw, key):
    import yaml

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.key == key
    assert str(f) in info.value.message and key in info.value.message
    assert info.value.exit_code == ExitCode.USAGE


def test_unknown_key_lists_allowed_keys(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("epsilon: 4/255\nthreshhold: 3\n")
    with pytest.raises(PolicyError, match="unknown key 'threshhold'.*allowed keys:.*epsilon"):
        load_policy(f)


def test_not_yaml_and_missing_file(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("epsilon: [4/255\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(f)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_policy_is_frozen_and_hash_is_stable():
    p = policy_from_mapping({"epsilon": "8/255"})
    with pytest.raises(AttributeError):
        p.k = 3  # type: ignore[misc]
    assert p.digest() == policy_from_mapping({"epsilon": 8 / 255}).digest()
    assert p.digest() != policy_from_mapping({"epsilon": "4/255"}).digest()


def test_calibrated_tau_only_applies_to_its_setting():
    cal = {"tau": 1.7, "n_candidates": 12, "ood_budget": 1000, "epsilon": "4/255"}
    p = policy_from_mapping({"calibration": cal, "scoring": "differential"})
    assert p.calibration == Calibration(1.7, 12, 1000, 4 / 255)
    assert p.threshold(12) == (1.7, "tau")
    with pytest.raises(PolicyError, match="valid for \\|C\\|=12"):
        p.threshold(20)
    with pytest.raises(PolicyError, match="calibration was made at epsilon"):
        policy_from_mapping({"calibration": cal, "epsilon": "8/255", "scoring": "differential"})
    assert policy_from_mapping({}).threshold(5) == (2.0, "k")


def test_calibrated_tau_only_applies_to_its_pool():
    cal = {"tau": 1.7, "n_candidates": 12, "ood_budget": 1000, "epsilon": "4/255", "pool": "procedural:0", "pool_hash": "ab" * 32}
    p = policy_from_mapping({"calibration": cal, "scoring": "differential"})
    assert p.threshold(12, "ab" * 32) == (1.7, "tau")
    assert p.threshold(12) == (1.7, "tau")  # a caller without the pool (the decide stage, after the scan checked it)
    with pytest.raises(PolicyError, match=r"measured on the OOD pool procedural:0 \(pixels sha256 abababababab\)") as info:
        p.threshold(12, "cd" * 32)
    assert "--ood procedural:0" in info.value.one_line()
    legacy = policy_from_mapping({"calibration": {k: v for k, v in cal.items() if not k.startswith("pool")}, "scoring": "differential"})
    assert legacy.threshold(12, "cd" * 32) == (1.7, "tau")  # a calibration that recorded no pool is not checked


def test_a_scan_on_another_pool_than_tau_was_calibrated_on_is_refused(tmp_path, capsys):
    from gatekeeper.cli import main
    from tests.conftest import DEMO_ZOO

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "scoring: differential\nepsilon: 8/255\nood_budget: 8\nholdout: 8\nrestarts: 1\npositive_control: \"off\"\n"
        f"calibration: {{tau: 2.0, n_candidates: 12, ood_budget: 8, epsilon: 8/255, pool: procedural:0, pool_hash: '{'ab' * 32}'}}\n"
    )
    rc = main(["scan", str(DEMO_ZOO / "clean"), "--policy", str(policy), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"])
    assert rc == 4
    assert "measured on the OOD pool procedural:0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "result.json").exists()
