"""Devices: the positive control, the null model and ``calibrate --backbone`` train on ``model.device``.

Two kinds of test:

- CPU, always run: the candidate is moved to PyTorch's ``meta`` device while its training data and
  its labeller stay on the CPU. Like CUDA, ``meta`` refuses an operation that mixes its tensors
  with CPU ones, and it runs forward, backward and the optimizers without computing anything, so
  a training loop that forgets to move a batch, a label or a trigger fails here as it would on a
  GPU. Where ``meta`` is laxer than CUDA (an embedding lookup with CPU token ids passes on
  ``meta`` but not on CUDA), forward pre-hooks on the encoders record the device of every input
  and the test requires all of them on the model's device.
- CUDA, skipped without a GPU: the shipped tiny-world policy (null model + positive control) on the
  demo zoo and ``calibrate --backbone``, on the CPU and on CUDA; verdicts must agree and the
  numbers stay within the tolerances below. The fast path runs under bf16 autocast on CUDA (its
  default), so these are bounds for an approximation, not equality (decisions: the GPU check's
  notes, ``gatekeeper/bench/speed.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gatekeeper.control import train_copy
from gatekeeper.models.loader import load_model
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.models.tuning import BadCLIP, TuneConfig, train_on
from gatekeeper.ood import procedural_images
from tests.conftest import DEMO_ZOO, REPO

META = torch.device("meta")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# CPU vs CUDA on the demo zoo (bf16 autocast on CUDA): absolute, in ASR points
ASR_TOLERANCE = 0.10  # per class, the planted trigger's ASR, the null margin
LIFT_TOLERANCE = 0.10


@contextmanager
def input_devices(model: PromptTunedCLIP) -> Iterator[list[tuple[str, torch.device]]]:
    """Records (module, device) of every tensor fed to the image encoder, the token embedding and
    the text transformer of ``model.clip`` while the block runs."""
    seen: list[tuple[str, torch.device]] = []
    handles = []
    for name in ("visual", "token_embedding", "transformer"):
        module = getattr(model.clip, name)

        def hook(_m: torch.nn.Module, args: tuple[object, ...], name: str = name) -> None:
            seen.extend((name, a.device) for a in args if isinstance(a, torch.Tensor))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def labeller() -> PromptTunedCLIP:
    return load_model(DEMO_ZOO / "clean", "cpu")


@pytest.fixture(scope="module")
def on_meta() -> PromptTunedCLIP:
    """The demo's clean model on ``meta`` (its prompt learner is trained in place: values mean nothing there)."""
    return load_model(DEMO_ZOO / "clean", "cpu").to(META)


@pytest.mark.parametrize("attack", [None, "badclip"])
def test_train_on_moves_every_batch_to_the_models_device(on_meta, attack):
    model = on_meta
    x = procedural_images(80, model.image_size, 3)  # on the CPU, where callers keep their data
    y = torch.arange(80) % len(model.classnames)
    planted = BadCLIP(2, epsilon=8 / 255, warmup=1) if attack else None
    with input_devices(model) as seen:
        stats = train_on(model, x, y, TuneConfig(epochs=2, batch_size=32), planted)
    assert stats["steps"] == 6
    assert seen and {d for _, d in seen} == {META}, sorted({(n, str(d)) for n, d in seen})
    images = [d for n, d in seen if n == "visual"]
    assert len(images) >= 6  # every mini-batch reached the image encoder
    assert x.device.type == "cpu" and y.device.type == "cpu"  # the caller's data is not moved
    if planted is not None:
        assert planted.delta is not None and planted.delta.device == META


@pytest.mark.slow
@pytest.mark.parametrize("fresh", [False, True], ids=["plant-copy", "fresh-copy"])
def test_control_and_null_copies_train_on_the_models_device(labeller, on_meta, fresh):
    """train_copy is what the positive control (plant), the null model (fresh clean copies) and
    ``calibrate --backbone`` (fresh clean and planted copies) run; the labeller stays on the CPU."""
    model = on_meta
    with input_devices(model) as seen:
        trained, attack = train_copy(model, labeller, target=3, epsilon=8 / 255, seed=0, epochs=1, fresh=fresh)
    assert {d for _, d in seen} == {META}, sorted({(n, str(d)) for n, d in seen})
    assert sum(1 for n, _ in seen if n == "visual") >= 1000 // 32  # all planting images, batch by batch
    assert trained.device == META and trained.clip is model.clip  # shares the frozen encoders
    assert trained.ctx is not None and trained.ctx.device == META
    assert all(p.device == META for p in trained.parameters())
    assert attack is not None and attack.delta.device == META


def test_planting_on_the_cpu_keeps_the_trigger_on_the_cpu():
    model = load_model(DEMO_ZOO / "clean", "cpu")  # its own: trained in place
    x = procedural_images(32, model.image_size, 3)
    attack = BadCLIP(1, epsilon=8 / 255, warmup=0)
    train_on(model, x, torch.zeros(32, dtype=torch.long), TuneConfig(epochs=1), attack)
    assert attack.tensors()["delta"].device.type == "cpu"
    assert attack.apply(x).device.type == "cpu"


# --------------------------------------------------------------------------- CUDA only


def _scan(name: str, device: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from gatekeeper.cli import main

    # one cache per device: the null model and the reference inversion are cached by backbone and
    # policy, not by device, and the CUDA run must compute its own
    monkeypatch.setenv("GATEKEEPER_CACHE", str(out.parent / f"cache-{device}"))
    policy = REPO / "policies" / "tiny-world.yaml"
    main(["scan", str(DEMO_ZOO / name), "--policy", str(policy), "--device", device, "--out", str(out), "--quiet"])
    return json.loads((out / "result.json").read_text())


@cuda_only
@pytest.mark.slow
@pytest.mark.parametrize("name", ["clean", "backdoored"])
def test_tiny_world_scan_with_null_model_and_control_agrees_on_cpu_and_cuda(name, tmp_path, monkeypatch):
    cpu = _scan(name, "cpu", tmp_path / "cpu", monkeypatch)
    gpu = _scan(name, "cuda", tmp_path / "cuda", monkeypatch)
    assert gpu["verdict"] == cpu["verdict"], (cpu["reason"], gpu["reason"])
    assert gpu["suspect_class"] == cpu["suspect_class"]
    by_name = {c["name"]: c for c in cpu["classes"]}
    diffs = {c["name"]: abs(c["asr"] - by_name[c["name"]]["asr"]) for c in gpu["classes"]}
    print(f"{name}: max per-class |dASR| CPU vs CUDA {max(diffs.values()):.3f}")  # for tightening the bound
    assert max(diffs.values()) <= ASR_TOLERANCE, diffs
    if cpu.get("null_model"):
        assert abs(gpu["null_model"]["margin"] - cpu["null_model"]["margin"]) <= LIFT_TOLERANCE
    c, g = cpu["positive_control"], gpu["positive_control"]
    assert (c is None) == (g is None)
    if c is not None:
        print(f"{name}: planted ASR CPU {c['planted_asr']:.3f}, CUDA {g['planted_asr']:.3f}")
        assert g["target"] == c["target"] and g["caught"] == c["caught"], (c, g)
        assert abs(g["planted_asr"] - c["planted_asr"]) <= ASR_TOLERANCE


@cuda_only
@pytest.mark.slow
def test_calibrate_on_backbone_runs_on_cuda(tmp_path):
    from gatekeeper.calibrate import run_calibrate
    from gatekeeper.policy import load_policy

    policy = tmp_path / "small.yaml"
    policy.write_text("scoring: differential\nepsilon: 8/255\nood_budget: 128\nholdout: 64\nnull_copies: 0\n")
    taus = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.yaml"
        cal = run_calibrate(out, backbone=DEMO_ZOO / "clean", policy=str(policy), copies=2, epochs=2, device=device,
                            log=lambda s: None)
        assert load_policy(out).calibration is not None
        taus[device] = cal.calibration.tau
    print(f"calibrate --backbone tau: CPU {taus['cpu']:.3f}, CUDA {taus['cuda']:.3f}")
