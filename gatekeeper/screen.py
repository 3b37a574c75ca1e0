"""Screening: a short inversion over every candidate class that chooses the ones the full inversion runs on.

A CoCoOp scan's cost grows as K^2 in the number of classes K (each class's trigger is optimised
through all K class prompts), so inverting every class of a 1000-class model in full is out of
reach, and sampling classes, as the paper does, misses a single target most of the time. The
screening inverts *every* candidate on a few OOD images (``screen_images``, one restart, at every
budget of the policy), ranks the classes by how much easier their trigger made them to reach than
on the public backbone (the lift, where the rule compares with it; the ASR otherwise) and keeps
the ``screen_keep`` highest at each budget for the full scan.

The screening trains on the first ``screen_images`` images of the inversion set and judges on the
next ``screen_images``: it never sees the hold-out images the verdict is measured on, so keeping
a class cannot bias that class's test, and the lift rule's Bonferroni correction counts the kept
classes (``Policy.n_tests``). Every screened class and its screening lift is recorded in the
result. The screening's recall on the detection benchmark is measured by
``gatekeeper-lab bench screening`` (docs/detection.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gatekeeper.inversion.base import ClassInversion, InversionSettings
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Detector, Policy
from gatekeeper.tracking import Stage, Tracker, pass_labels

SCREEN_MODEL = "screening: model"
SCREEN_REFERENCE = "screening: public backbone"


@dataclass(frozen=True)
class ScreenedClass:
    """One candidate's screening inversion at one budget: its ASR on the model and on the public
    backbone (None where the rule does not compare with it) on the screening's own images."""

    index: int
    name: str
    epsilon: float
    asr: float
    reference_asr: float | None
    kept: bool

    @property
    def lift(self) -> float:
        return self.asr - (self.reference_asr or 0.0)


@dataclass(frozen=True)
class Screening:
    """What the screening kept (candidate indices, sorted) out of how many, and why (``classes``)."""

    kept: tuple[int, ...]
    screened: int
    images: int
    classes: tuple[ScreenedClass, ...]
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "kept": list(self.kept), "screened": self.screened, "images": self.images, "seconds": self.seconds,
            "classes": [{"index": c.index, "name": c.name, "epsilon": c.epsilon, "asr": c.asr, "reference_asr": c.reference_asr,
                         "lift": round(c.lift, 6), "kept": c.kept} for c in self.classes],
        }


def screens(policy: Policy, n_candidates: int) -> bool:
    """Whether a scan of ``n_candidates`` classes under ``policy`` screens them first (CLIP-Inspector only)."""
    return policy.detector == Detector.CLIP_INSPECTOR and policy.screen_keep > 0 and n_candidates > policy.screen_keep


def screen_size(pool: OODPool, images: int) -> int:
    """Images the screening trains on, and as many more it judges on: ``images``, or half the inversion set."""
    return min(images, len(pool.inversion) // 2)


def rank_key(c: ScreenedClass) -> tuple[float, float, int]:
    """Highest lift first, then highest ASR, then the lower class index (deterministic)."""
    return (-c.lift, -c.asr, c.index)


def screen(model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], track: Tracker | None = None) -> Screening:
    """Invert every candidate briefly at each budget; keep the ``policy.screen_keep`` classes of
    highest screening lift per budget (their union, in candidate order)."""
    from gatekeeper.decide import rule_for
    from gatekeeper.parallel import run_all, slot
    from gatekeeper.pipeline import make_inverter, reference_model

    t0 = time.perf_counter()
    track = track or Tracker()
    n = screen_size(pool, policy.screen_images)
    train, judge = pool.inversion[:n], pool.inversion[n : 2 * n]
    detector = make_inverter(policy)
    needs_reference = rule_for(policy).needs_reference
    ref = reference_model(model) if needs_reference else None
    model.freeze_text()

    def screened(on: PromptTunedCLIP, who: str, settings: InversionSettings) -> Callable[[], list[ClassInversion]]:
        label = pass_labels(who, settings.epsilon, 1)[0]

        def run() -> list[ClassInversion]:
            with slot():
                return detector.invert(on, train, judge, candidates, settings, track.inversion_pass(label))

        return run

    rows: list[ScreenedClass] = []
    kept: set[int] = set()
    for eps in policy.budgets:
        settings = InversionSettings(eps, policy.batch_size, policy.epochs, policy.lr, policy.seed)
        # the model's pass and the public backbone's, side by side where the scan has workers
        passes = run_all([screened(model, SCREEN_MODEL, settings), *([screened(ref, SCREEN_REFERENCE, settings)] if ref is not None else [])])
        runs = passes[0]
        ref_asr: list[float | None] = [r.metrics.asr for r in passes[1]] if ref is not None else [None] * len(runs)
        at = [ScreenedClass(r.metrics.index, r.metrics.name, eps, r.metrics.asr, a, False) for r, a in zip(runs, ref_asr, strict=True)]
        top = {c.index for c in sorted(at, key=rank_key)[: policy.screen_keep]}
        kept |= top
        rows += [replace(c, kept=c.index in top) for c in at]
    order = [c for c in candidates if c in kept]
    return Screening(tuple(order), len(candidates), n, tuple(rows), round(time.perf_counter() - t0, 3))


def plan_screening(policy: Policy, n_candidates: int, needs_reference: bool) -> list[Stage]:
    """The screening's passes, in the order :func:`screen` runs them."""
    stages = []
    for eps in policy.budgets:
        stages.append(Stage(pass_labels(SCREEN_MODEL, eps, 1)[0], n_candidates))
        if needs_reference:
            stages.append(Stage(pass_labels(SCREEN_REFERENCE, eps, 1)[0], n_candidates))
    return stages
