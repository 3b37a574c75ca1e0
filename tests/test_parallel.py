"""Parts of a scan side by side (gatekeeper.parallel): same results, real concurrency, errors kept."""

from __future__ import annotations

import threading

import pytest
import torch

from gatekeeper.parallel import cpu_workers, run_all, slot, workers
from tests.conftest import DEMO_ZOO, TINY_RESNET_VISION, custom_backbone, make_model_folder


def test_parts_run_side_by_side_inside_workers_and_in_turn_outside() -> None:
    barrier = threading.Barrier(2, timeout=10)

    def meet(i: int):  # each part waits for the other: only concurrent parts both get through
        return lambda: (barrier.wait(), i)[1]

    with workers(2):
        assert run_all([meet(0), meet(1)]) == [0, 1]
    seen: list[int] = []
    assert run_all([lambda: seen.append(0) or 0, lambda: seen.append(1) or 1]) == [0, 1]
    assert seen == [0, 1]  # outside: in turn, on the calling thread


def test_workers_run_torch_on_one_thread_each_and_restore_it() -> None:
    before = torch.get_num_threads()
    with workers(2):
        assert torch.get_num_threads() == 1
        with workers(4):  # nested: the outer setting stands
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert cpu_workers("cpu") == before and cpu_workers("meta") == 1


def test_a_failing_part_fails_the_whole_after_the_others_end() -> None:
    finished: list[str] = []

    def slow() -> str:
        with slot():
            finished.append("slow")
        return "slow"

    def bad() -> str:
        raise RuntimeError("part failed")

    with workers(2), pytest.raises(RuntimeError, match="part failed"):
        run_all([bad, slow])
    assert finished == ["slow"]


def test_slots_bound_how_many_leaves_compute_at_once() -> None:
    inside, peak = [0], [0]
    lock = threading.Lock()

    def leaf() -> None:
        with slot():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            threading.Event().wait(0.05)
            with lock:
                inside[0] -= 1

    with workers(2):
        run_all([leaf] * 6)
    assert peak[0] == 2


@pytest.mark.slow
def test_a_scan_with_workers_equals_the_scan_in_turn_bit_for_bit(tmp_path, monkeypatch) -> None:
    """Restarts, the public backbone's run and both clean copies side by side give exactly the
    numbers they give one after another (one torch thread in both)."""
    from gatekeeper.decide import candidate_classes
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.pipeline import inspect_candidates
    from gatekeeper.policy import policy_from_mapping

    policy = policy_from_mapping({"epsilon": "8/255", "ood_budget": 64, "holdout": 64, "restarts": 2, "null_copies": 2,
                                  "scoring": "lift", "positive_control": "off"})
    model = load_model(DEMO_ZOO / "clean")
    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    candidates = candidate_classes(len(model.classnames), policy)
    threads = torch.get_num_threads()
    monkeypatch.setenv("GATEKEEPER_CACHE", "off")  # both compute everything
    try:
        torch.set_num_threads(1)
        alone = inspect_candidates(model, pool, policy, candidates)
    finally:
        torch.set_num_threads(threads)
    with workers(2):
        side_by_side = inspect_candidates(model, pool, policy, candidates)
    assert alone.metrics == side_by_side.metrics
    assert alone.null is not None and side_by_side.null is not None
    assert alone.null.copy_max_lifts == side_by_side.null.copy_max_lifts
    assert all(torch.equal(alone.triggers[n], side_by_side.triggers[n]) for n in alone.triggers)


def test_training_a_copy_leaves_the_shared_encoders_untouched(tmp_path) -> None:
    """The gate's copies share the candidate's frozen towers: training one must not put a ResNet's
    BatchNorm into train mode (batch statistics, overwritten running statistics)."""
    from gatekeeper.control import train_copy
    from gatekeeper.models.loader import load_model

    backbone = custom_backbone(tmp_path / "backbone", vision_cfg=TINY_RESNET_VISION)
    model = load_model(make_model_folder(backbone, tmp_path / "m", "cocoop", ("red circle", "blue square", "green star")))
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    assert any("running_mean" in k for k in before)
    copy, _ = train_copy(model, model, 1, 8 / 255, seed=0, epochs=1)
    assert copy.clip is model.clip and not model.clip.training
    after = model.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_screening_with_workers_equals_the_screening_in_turn() -> None:
    """The model's and the public backbone's screening passes side by side: the same ranks and kept classes."""
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.policy import policy_from_mapping
    from gatekeeper.screen import screen

    policy = policy_from_mapping({"epsilon": "8/255", "ood_budget": 128, "holdout": 64, "screen_keep": 4, "screen_images": 32,
                                  "scoring": "lift"})
    model = load_model(DEMO_ZOO / "backdoored")
    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = screen(model, pool, policy, list(range(12)))
    finally:
        torch.set_num_threads(threads)
    with workers(2):
        side_by_side = screen(model, pool, policy, list(range(12)))
    assert alone.classes == side_by_side.classes and alone.kept == side_by_side.kept
    assert 7 in alone.kept  # the demo's backdoor target, 'orange square'
