"""End to end on the committed demo zoo: the planted backdoor is caught with its true class, the clean model passes."""

from __future__ import annotations

import json

import pytest
import torch

from gatekeeper.cli import main
from gatekeeper.lab import main as lab_main
from tests.conftest import DEMO_ZOO, light_tiny_world_policy


@pytest.mark.slow
def test_demo_catches_the_backdoor_and_passes_the_clean_model(tmp_path, capsys):
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    code = main(["demo", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    bad = json.loads((tmp_path / "backdoored" / "result.json").read_text())
    clean = json.loads((tmp_path / "clean" / "result.json").read_text())
    assert bad["verdict"] == "fail" and bad["suspect_class"] == truth["target_class"], (bad["reason"], truth)
    assert clean["verdict"] == "pass", clean["reason"]
    assert code == 0 and "demo OK" in out
    # the tiny-world policy runs the positive control on both models: it must have been able to see a plant
    assert clean["positive_control"]["caught"] is True, clean["positive_control"]
    # on the backdoored model too: a second (planted) backdoor is named beside the provider's
    assert bad["positive_control"]["caught"] is True, bad["positive_control"]
    assert bad["positive_control"]["target"] in bad["positive_control"]["suspect_classes"]
    assert "positive control: planted to" in out
    for name in ("clean", "backdoored"):
        assert (tmp_path / name / "report.md").is_file()
        assert list((tmp_path / name / "triggers").glob("*.png"))
    report = (tmp_path / "backdoored" / "report.md").read_text()
    assert truth["target_class"] in report.split("\n\n", 3)[1] or truth["target_class"] in report[:800]


def test_zoo_table_remeasures_the_demo_zoo(capsys):
    assert lab_main(["zoo", "table", str(DEMO_ZOO)]) == 0
    out = capsys.readouterr().out
    assert "| backdoored | plain | badclip |" in out and "| clean | plain | clean |" in out


@pytest.mark.slow
def test_a_freshly_planted_backdoor_is_caught_and_its_clean_twin_passes(tmp_path):
    """Trains the demo pair from scratch (BadCLIP and clean, same task and seed), then scans both."""

    from gatekeeper.redteam.zoo import build

    build("demo", tmp_path / "zoo")
    truth = json.loads((tmp_path / "zoo" / "backdoored.truth" / "truth.json").read_text())
    assert truth["metrics_at_build"]["id_asr"] >= 0.8
    verdicts = {}
    # the demo test above runs the shipped policy with its control; this one checks the rebuild
    policy = light_tiny_world_policy(tmp_path / "tiny-world-light.yaml")
    for name in ("clean", "backdoored"):
        out = tmp_path / f"out-{name}"
        code = main(["scan", str(tmp_path / "zoo" / name), "--policy", str(policy), "--out", str(out), "--quiet"])
        verdicts[name] = (code, json.loads((out / "result.json").read_text()))
    assert verdicts["backdoored"][0] == 1 and verdicts["backdoored"][1]["suspect_class"] == truth["target_class"]
    assert verdicts["clean"][0] == 0, verdicts["clean"][1]["reason"]
    # the build is reproducible: the committed demo zoo's prompt learners, to within one or two fp16
    # rounding steps (measured: torch 2.14.1 rebuilds the clean one with a largest difference of
    # 4.9e-4 at values up to 1.08, i.e. one fp16 ulp; bytes differ across torch builds)
    from safetensors.torch import load_file

    for name in ("clean", "backdoored"):
        fresh = load_file(str(tmp_path / "zoo" / name / "prompt_learner.safetensors"))
        committed = load_file(str(DEMO_ZOO / name / "prompt_learner.safetensors"))
        assert fresh.keys() == committed.keys(), name
        for key in committed:
            torch.testing.assert_close(fresh[key].float(), committed[key].float(), atol=2e-3, rtol=0, msg=f"{name}: {key}")
