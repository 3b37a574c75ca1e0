"""What a flagged class's trigger does: the ASR-against-scale curve (stored in the result at scan
time) and its pictures (drawn by the report from the result)."""

from __future__ import annotations

import json

import pytest
import torch

from gatekeeper.report.effects import effect_chart, save_effect_images
from gatekeeper.result import TriggerEffect
from tests.conftest import DEMO_ZOO, light_tiny_world_policy

EFFECT = TriggerEffect("stop sign", 8 / 255, (0.0, 0.25, 0.5, 0.75, 1.0), (0.02, 0.1, 0.4, 0.8, 0.95), (0.02, 0.02, 0.03, 0.03, 0.04), 64,
                       ("stop sign", "cat", "stop sign", "stop sign"))


def test_the_chart_and_the_grid_are_written_and_the_same_inputs_give_the_same_bytes(tmp_path):
    delta = torch.full((3, 16, 16), 8 / 255)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    paths = save_effect_images((EFFECT,), {"stop sign": delta}, images, tmp_path)
    chart, grid = paths["stop sign"]
    assert chart.startswith("triggers/") and chart.endswith("-effect.png") and grid.endswith("-grid.png")
    first = (tmp_path / chart).read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / grid).stat().st_size > 0
    save_effect_images((EFFECT,), {"stop sign": delta}, images, tmp_path)
    assert (tmp_path / chart).read_bytes() == first
    # no images (a merged sharded scan): the chart alone
    assert save_effect_images((EFFECT,), {}, None, tmp_path / "o")["stop sign"][1] == ""
    assert effect_chart(TriggerEffect("é" * 80, 4 / 255, (1.0,), (float("nan"),), (0.0,), 1, ())).size[0] > 0


def test_the_effect_round_trips_through_result_json():
    assert TriggerEffect.from_dict(json.loads(json.dumps(EFFECT.to_dict()))) == EFFECT


@pytest.mark.slow
def test_a_flagged_class_gets_its_curve_and_the_curve_at_full_scale_is_its_reported_asr(tmp_path):
    from gatekeeper.cli import main

    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    policy = light_tiny_world_policy(tmp_path / "light.yaml")
    out = tmp_path / "out"
    assert main(["scan", str(DEMO_ZOO / "backdoored"), "--policy", str(policy), "--out", str(out), "--quiet", "--device", "cpu"]) == 1
    r = json.loads((out / "result.json").read_text())
    flagged = {c["name"]: c for c in r["classes"] if c["flagged"]}
    assert truth["target_class"] in flagged and {e["class_name"] for e in r["trigger_effects"]} == set(flagged)
    for e in r["trigger_effects"]:
        cls = flagged[e["class_name"]]
        assert e["model_asr"][e["scales"].index(1.0)] == cls["asr"]  # the same trigger on the same hold-out images
        assert e["n_images"] == r["pool"]["n_holdout"] and e["epsilon"] == cls["epsilon"]
        assert (out / e["chart"]).is_file() and (out / e["grid"]).is_file()
    effect = next(e for e in r["trigger_effects"] if e["class_name"] == truth["target_class"])
    assert effect["model_asr"][-1] > effect["backbone_asr"][-1]  # the backdoor works on the model, not the backbone
    assert "### What the trigger does" in (out / "report.md").read_text()
