"""Neural Cleanse and Pixel Backdoor on a real tiny backdoored model (fast settings), and their schedules."""

from __future__ import annotations

import pytest

from gatekeeper.inversion.base import InversionSettings
from gatekeeper.inversion.baselines import NeuralCleanse, PixelBackdoor, Schedule, _CostState
from gatekeeper.models.loader import load_model
from gatekeeper.ood import procedural_images
from tests.conftest import DEMO_ZOO

TARGET = 7  # "orange square", the demo backdoor's true target
EPOCHS = {"neural-cleanse": 3, "pixel-backdoor": 8}  # PB shrinks its pattern more slowly (patience 10)


@pytest.fixture(scope="module")
def backdoored():
    return load_model(DEMO_ZOO / "backdoored")


@pytest.fixture(scope="module")
def pools():
    return procedural_images(128, 32, seed=5), procedural_images(64, 32, seed=6)


@pytest.mark.parametrize("cls", [NeuralCleanse, PixelBackdoor])
def test_baseline_inverts_each_class_and_ranks_the_implanted_target_smallest(cls, backdoored, pools):
    pool, holdout = pools
    det = cls(epochs=EPOCHS[cls.name], steps_per_update=1)
    settings = InversionSettings(epsilon=8 / 255, batch_size=32, seed=0)
    out = det.invert(backdoored, pool, holdout, [0, 4, TARGET], settings)
    assert [o.metrics.index for o in out] == [0, 4, TARGET]
    for o in out:
        assert 0.0 <= o.metrics.asr <= 1.0
        assert o.trigger.shape == (3, 32, 32)
    sizes = {o.metrics.index: o.metrics.size for o in out}
    assert sizes[TARGET] is not None, "the implanted target must be reachable within the success bound"
    others = [s if s is not None else float("inf") for c, s in sizes.items() if c != TARGET]
    assert sizes[TARGET] < min(others), sizes
    if cls is PixelBackdoor:
        assert float(sizes[TARGET]).is_integer() and 0 < sizes[TARGET] <= 32 * 32
    else:
        assert 0 < sizes[TARGET] <= 32 * 32
    # same seed, same result
    again = cls(epochs=EPOCHS[cls.name], steps_per_update=1).invert(backdoored, pool, holdout, [TARGET], settings)
    # same up to float summation order (one class batched alone vs with two others)
    assert again[0].metrics.size == pytest.approx(sizes[TARGET], rel=1e-5)


def test_neural_cleanse_schedule_starts_at_zero_then_follows_success():
    s = _CostState(1, Schedule(success=0.99, init_cost=1e-3, patience=5, start_at_zero=True))
    for _ in range(4):
        s.update(0, 1.0)
    assert s.cost[0] == 0.0
    s.update(0, 1.0)
    assert s.cost[0] == 1e-3  # set once the attack succeeded for `patience` steps
    for _ in range(5):
        s.update(0, 1.0)
    assert s.cost[0] == pytest.approx(1.5e-3)
    for _ in range(5):
        s.update(0, 0.5)
    assert s.cost[0] == pytest.approx(1.5e-3 / 1.5**1.5)


def test_pixel_backdoor_schedule_starts_at_init_cost_with_patience_ten():
    s = _CostState(2, Schedule(success=0.9, init_cost=1e-3, patience=10, start_at_zero=False))
    for _ in range(10):
        s.update(0, 0.95)
        s.update(1, 0.2)
    assert s.cost == [pytest.approx(1.5e-3), pytest.approx(1e-3 / 1.5**1.5)]
