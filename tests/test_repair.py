"""`gatekeeper repair` on the committed demo backdoor: it removes the true backdoor, keeps accuracy,
never touches the input, and refuses bad data folders and outputs with exit code 4."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from gatekeeper.cli import main
from gatekeeper.models.loader import load_model
from gatekeeper.redteam.evaluate import measure
from gatekeeper.redteam.truth import true_attack
from gatekeeper.redteam.world import TASKS, sample_task
from tests.conftest import DEMO_ZOO

MODEL = DEMO_ZOO / "backdoored"
TARGET = "orange square"


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    task = TASKS["plain"]
    x, y = sample_task(task, 240, 32, seed=4321)
    root = tmp_path_factory.mktemp("labelled")
    for i, (img, lab) in enumerate(zip(x, y, strict=True)):
        d = root / task.classnames[int(lab)].replace(" ", "_")
        d.mkdir(exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    policy = out / "p.yaml"
    policy.write_text("epsilon: 8/255\nood_budget: 128\nholdout: 64\nnull_copies: 0\n")
    main(["scan", str(MODEL), "--policy", str(policy), "--out", str(out / "r"), "--quiet"])
    return out / "r"


def test_repair_removes_the_true_backdoor_and_keeps_accuracy(data, scan, tmp_path):
    before_hash = _tree_hash(MODEL)
    out = tmp_path / "repaired"
    code = main(["repair", str(MODEL), "--scan", str(scan), "--data", str(data), "--out", str(out), "--class", TARGET, "--quiet"])
    assert code in (0, 1, 3)  # the re-scan's verdict decides the exit code
    assert _tree_hash(MODEL) == before_hash  # the input is never touched
    record = json.loads((out / "repair.json").read_text())
    assert record["class"] == TARGET and record["data"]["classes_missing"] == []
    assert record["rescan_verdict"] == json.loads((out / "scan" / "result.json").read_text())["verdict"]
    assert (out / "repair.md").read_text().startswith("# Repair of")
    # measured with the *true* trigger from the zoo's ground truth, which repair never saw
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    attack = true_attack(truth, DEMO_ZOO / "backdoored.truth")
    task = TASKS["plain"]
    was, now = measure(load_model(MODEL), task, attack), measure(load_model(out / "model"), task, attack)
    assert was["id_asr"] > 0.9
    assert now["id_asr"] < 0.2, now
    assert now["clean_accuracy"] >= was["clean_accuracy"] - 0.02


def _run(*argv):
    return main(["repair", *map(str, argv), "--quiet"])


def test_repair_refuses_bad_data_and_outputs(data, scan, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "red_circle_typo").mkdir(parents=True)
    (bad / "orange_square").mkdir()
    assert _run(MODEL, "--scan", scan, "--data", bad, "--out", tmp_path / "o1", "--class", TARGET) == 4
    err = capsys.readouterr().err
    assert "red_circle_typo" in err and "name no class of the model" in err
    few = tmp_path / "few"
    (few / "orange_square").mkdir(parents=True)
    (few / "green_star").mkdir()
    for d in ("orange_square", "green_star"):
        src = next((data / d).iterdir())
        (few / d / src.name).write_bytes(src.read_bytes())
    assert _run(MODEL, "--scan", scan, "--data", few, "--out", tmp_path / "o2", "--class", TARGET) == 4
    assert "fewer than 2 readable images" in capsys.readouterr().err
    assert _run(MODEL, "--scan", scan, "--data", data, "--out", MODEL / "inside", "--class", TARGET) == 4
    assert "overlaps the input model" in capsys.readouterr().err
    assert not (MODEL / "inside").exists()
    assert _run(MODEL, "--scan", scan, "--data", data, "--out", tmp_path / "o3", "--class", "no such class") == 4
    assert "not a class of the model" in capsys.readouterr().err
    passed = {**json.loads(Path(scan).read_text() if Path(scan).is_file() else (Path(scan) / "result.json").read_text()),
              "verdict": "pass", "suspect_class": None, "suspect_classes": []}
    (tmp_path / "passed.json").write_text(json.dumps(passed))
    assert _run(MODEL, "--scan", tmp_path / "passed.json", "--data", data, "--out", tmp_path / "o4") == 4
    assert "no class was flagged" in capsys.readouterr().err


def test_finetune_reaches_a_coop_context_even_after_a_scan_cached_its_text(model_factory):
    import torch

    from gatekeeper.repair import LabelledSet, RepairSettings, finetune

    model = load_model(model_factory("coop", ("red circle", "blue square", "green star")))
    model.freeze_text()  # what a scan does before repair runs
    before = model.ctx.detach().clone()
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 3
    finetune(model, LabelledSet(x, y, x[:0], y[:0], ("red circle", "blue square", "green star"), ()), None, RepairSettings(epochs=1))
    assert not torch.equal(model.ctx.detach(), before), "the context did not move: training ran against cached text"
    assert model._cached_text is not None  # re-frozen with the new context
