"""The tiny world: determinism, models that load through the gate's loader, a fresh implant that works."""

from __future__ import annotations

import pytest
import torch

from gatekeeper.redteam.world import ALL_CLASSES, TASKS, Task, sample_task, sample_world
from tests.conftest import BACKBONE


def test_world_is_deterministic_under_a_seed():
    a, ya = sample_task(TASKS["texture"], 50, 32, seed=3)
    b, yb = sample_task(TASKS["texture"], 50, 32, seed=3)
    c, _ = sample_task(TASKS["texture"], 50, 32, seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    w1 = sample_world(20, 32, torch.Generator().manual_seed(0))
    w2 = sample_world(20, 32, torch.Generator().manual_seed(0))
    assert torch.equal(w1[0], w2[0]) and torch.equal(w1[1], w2[1])


def test_tasks_are_distinct_and_well_formed():
    assert len(ALL_CLASSES) == 64 and len(TASKS) >= 5
    sets = [frozenset(t.classnames) for t in TASKS.values()]
    assert len(set(sets)) == len(sets)
    for t in TASKS.values():
        x, y = sample_task(t, 24, 32, seed=0)
        assert x.shape == (24, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
        assert set(y.tolist()) == set(range(len(t.classnames))) or len(t.classnames) > 24


@pytest.mark.slow
def test_fresh_implant_works_and_model_loads_through_the_gate(tmp_path):
    from gatekeeper.models.loader import load_model
    from gatekeeper.models.manifest import ModelKind, Precision
    from gatekeeper.redteam.attacks import BadCLIP
    from gatekeeper.redteam.evaluate import measure
    from gatekeeper.redteam.tuning import TuneConfig, train, write_model_folder

    task = Task("t4", ("red circle", "blue square", "green triangle", "yellow star"), "plain")
    cfg = TuneConfig(kind=ModelKind.COCOOP, epochs=6, n_train=800, seed=0)
    attack = BadCLIP(target=2, epsilon=16 / 255, warmup=2)
    model, _ = train(BACKBONE, task, cfg, attack)
    m = measure(model, task, attack, n_test=200, n_ood=200)
    assert m["clean_accuracy"] >= 0.85, m
    # the trigger, not the image, sends non-target images to the target
    from gatekeeper.redteam.evaluate import hit_rate

    x, y = sample_task(task, 200, 32, seed=5)
    keep = y != attack.target
    assert hit_rate(model, x[keep], attack.target) < 0.1
    assert m["id_asr"] >= 0.8, m
    write_model_folder(model, BACKBONE, tmp_path / "m", Precision.FP16)
    loaded = load_model(tmp_path / "m")
    x, _ = sample_task(task, 64, 32, seed=99)
    with torch.no_grad():
        assert (loaded.logits(x).argmax(1) == model.logits(x).argmax(1)).float().mean() >= 0.95  # fp16 round trip


@pytest.mark.slow
def test_backbone_build_is_bit_for_bit_deterministic(tmp_path):
    """Two short builds from the same seed give the same bytes (the committed one is the long build)."""
    from gatekeeper.redteam.pretrain import PretrainConfig, pretrain, save_backbone

    cfg = PretrainConfig(seed=0, steps=6, adv_steps=4, batch_size=32, threads=1)
    digests = [save_backbone(pretrain(cfg, log=lambda s: None)[0], tmp_path / f"b{i}", {}) for i in range(2)]
    assert digests[0] == digests[1]
    other = PretrainConfig(seed=1, steps=6, adv_steps=4, batch_size=32, threads=1)
    assert save_backbone(pretrain(other, log=lambda s: None)[0], tmp_path / "c", {}) != digests[0]


def test_committed_backbone_matches_its_recorded_build():
    import hashlib
    import json

    stats = json.loads((BACKBONE / "pretrain_stats.json").read_text())
    assert hashlib.sha256((BACKBONE / "open_clip_model.safetensors").read_bytes()).hexdigest() == stats["sha256"]
    assert stats["zero_shot_accuracy_64way"] >= 0.80


def test_trigger_probe_sees_an_implanted_trigger_and_not_a_no_op():
    """The linear probe on frozen image features (zoo table's "trigger probe" column) finds the demo
    model's BadCLIP trigger and stays at chance for a "trigger" that changes nothing."""
    import json
    from types import SimpleNamespace

    from gatekeeper.models.loader import load_model
    from gatekeeper.redteam.evaluate import trigger_separability
    from gatekeeper.redteam.truth import true_attack
    from tests.conftest import DEMO_ZOO

    model = load_model(DEMO_ZOO / "backdoored")
    truth = json.loads((DEMO_ZOO / "backdoored.truth" / "truth.json").read_text())
    task = TASKS[truth["task"]]
    seen = trigger_separability(model, task, true_attack(truth, DEMO_ZOO / "backdoored.truth"), n=400)
    unseen = trigger_separability(model, task, SimpleNamespace(apply=lambda x: x.clone()), n=400)
    assert seen > 0.9, seen
    assert 0.35 < unseen < 0.65, unseen
