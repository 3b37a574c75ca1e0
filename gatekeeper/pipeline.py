"""The core of a scan: ``scan_model(model, pool, policy) -> ScanOutput`` (invert -> decide), on a loaded
model and pool; :mod:`gatekeeper.scan` wraps it with source, load and report."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import torch

from gatekeeper import __version__
from gatekeeper.decide import apply_accepted, candidate_classes, decide, rule_for, score_classes
from gatekeeper.inversion.base import ClassInversion, InversionSettings, Inverter, Progress, no_progress
from gatekeeper.inversion.clip_inspector import ClipInspector
from gatekeeper.inversion.fast import FastClipInspector
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Detector, Implementation, Policy, PositiveControl
from gatekeeper.result import ClassMetrics, Decision, ModelInfo, NullModel, PoolInfo, Provenance, ScanResult, Verdict


@dataclass(frozen=True)
class ScanContext:
    """Where a scan's numbers come from: the model's provenance, the pool, the model, the machine,
    and the command line."""

    provenance: Provenance
    pool: PoolInfo
    model: ModelInfo
    environment: dict[str, str]
    command: str = ""


@dataclass(frozen=True)
class Inspection:
    """The inspect stage's record: per-class metrics (candidate order), each class's inverted trigger,
    one hold-out OOD image for the report, the inversion time, and the lift rule's null model.
    A shard is an Inspection of a subset of the candidates; a merge concatenates them."""

    metrics: tuple[ClassMetrics, ...]
    triggers: dict[str, torch.Tensor]  # class name -> delta (3, H, W)
    example: torch.Tensor
    seconds: float
    null: NullModel | None = None


@dataclass(frozen=True)
class ScanOutput:
    result: ScanResult
    triggers: dict[str, torch.Tensor]  # class name -> delta (3, H, W)
    example: torch.Tensor  # one hold-out OOD image, for the report's before/after picture


def environment(device: torch.device) -> dict[str, str]:
    import open_clip

    env = {
        "device": str(device),
        "gatekeeper": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def model_info(model: PromptTunedCLIP) -> ModelInfo:
    return ModelInfo(
        kind=model.kind.value,
        n_classes=len(model.classnames),
        backbone=model.manifest.backbone.describe(),
        image_size=model.image_size,
    )


def make_inverter(policy: Policy) -> Inverter:
    """The inversion the policy asks for."""
    from gatekeeper.inversion.baselines import NeuralCleanse, PixelBackdoor

    if policy.detector == Detector.NEURAL_CLEANSE:
        return NeuralCleanse()
    if policy.detector == Detector.PIXEL_BACKDOOR:
        return PixelBackdoor()
    return ClipInspector() if policy.implementation == Implementation.REFERENCE else FastClipInspector()


def restart_rank(m: ClassMetrics) -> tuple[float, float]:
    """How restarts of one class compare: higher ASR wins, ties go to the lower loss (a restart
    can only find an easier trigger)."""
    return (m.asr, -m.loss)


def best_of_restarts(
    detector: Inverter, model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], progress: Progress
) -> list[ClassInversion]:
    """``policy.restarts`` inversions per class from seeds seed, seed+1, ...; per class the best by
    :func:`restart_rank` counts."""
    best: list[ClassInversion] | None = None
    for r in range(policy.restarts):
        settings = InversionSettings(policy.epsilon, policy.batch_size, policy.epochs, policy.lr, policy.seed + r)
        run = detector.invert(model, pool.inversion, pool.holdout, candidates, settings, progress)
        if best is None:
            best = run
        else:
            best = [max(a, b, key=lambda i: restart_rank(i.metrics)) for a, b in zip(best, run, strict=True)]
    assert best is not None
    return best


def reference_model(model: PromptTunedCLIP) -> PromptTunedCLIP:
    """The un-tuned backbone used zero-shot ("a photo of a {}.") with the delivered class names."""
    from gatekeeper.models.manifest import ModelKind

    manifest = replace(model.manifest, kind=ModelKind.ZEROSHOT)
    ref = PromptTunedCLIP(model.clip, model.tokenizer, manifest)
    ref.to(model.device).eval()
    ref.freeze_text()
    return ref


def invert_candidates(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], progress: Progress = no_progress
) -> tuple[list[ClassInversion], float]:
    """The inspect stage on ``candidates``: the policy's detector (with restarts, and the public
    backbone's run for the scorings that compare with it, cached: ``gatekeeper.null``); returns
    (inversions, seconds)."""
    from gatekeeper.null import reference_inversions

    t0 = time.perf_counter()
    model.freeze_text()
    detector = make_inverter(policy)
    inversions = best_of_restarts(detector, model, pool, policy, candidates, progress)
    if rule_for(policy).needs_reference:
        ref = reference_inversions(model, pool, policy, candidates, progress)
        inversions = [
            ClassInversion(replace(i.metrics, reference_asr=r.asr, reference_loss=r.loss), i.trigger)
            for i, r in zip(inversions, ref, strict=True)
        ]
    return inversions, time.perf_counter() - t0


def null_for(model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], inversions: list[ClassInversion],
             progress: Progress = no_progress) -> NullModel | None:
    """The lift scoring's null margin at the policy's (single) budget; None for the other scorings."""
    if not rule_for(policy).uses_null:
        return None
    from gatekeeper.null import measure_null

    return measure_null(model, pool, policy, candidates, [i.metrics.reference_asr or 0.0 for i in inversions], progress)


def conclude(inspection: Inspection, context: ScanContext, policy: Policy) -> ScanResult:
    """Scores and the verdict from an inspection (the decide stage)."""
    null = inspection.null
    if rule_for(policy).uses_null and null is None:
        from gatekeeper.decide import floor_null

        null = floor_null(policy, len(inspection.metrics))
    metrics = list(inspection.metrics)
    scores = score_classes(metrics, policy, null)
    seconds = inspection.seconds
    timings = {"inversion_s": round(seconds, 3), "per_class_s": round(seconds / max(len(metrics), 1), 3)}
    if null is not None:
        timings["null_model_s"] = 0.0 if null.cached else null.seconds
    decision = apply_accepted(decide(scores, policy, null), policy, context.provenance.content_hash, datetime.now(UTC).date())
    return ScanResult(
        decision=decision,
        classes=tuple(scores),
        policy=policy.to_dict(),
        policy_hash=policy.digest(),
        provenance=context.provenance,
        pool=context.pool,
        model=context.model,
        timings=timings,
        environment=context.environment,
        seed=policy.seed,
        command=context.command,
        null_model=null,
    )


def inspect_candidates(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], progress: Progress = no_progress
) -> Inspection:
    """Invert ``candidates`` at every budget of the policy (with restarts, and the public backbone
    where the rule needs it) and measure the null model where the rule uses one. With several
    budgets each class keeps the budget whose evidence is strongest (``decide.strongest_budget``)."""
    from gatekeeper.decide import strongest_budget
    from gatekeeper.null import combine_nulls

    per_budget: list[list[ClassInversion]] = []
    nulls: list[NullModel] = []
    seconds = 0.0
    for eps in policy.budgets:
        at = policy.at_budget(eps)
        inversions, s = invert_candidates(model, pool, at, candidates, progress)
        per_budget.append([ClassInversion(replace(i.metrics, epsilon=eps), i.trigger) for i in inversions])
        seconds += s
        null = null_for(model, pool, at, candidates, inversions, progress)
        if null is not None:
            nulls.append(null)
    chosen = per_budget[0]
    combined = nulls[0] if nulls else None
    if len(per_budget) > 1:
        combined = combine_nulls(policy, policy.n_tests(len(candidates)), nulls)
        best = strongest_budget([[i.metrics for i in run] for run in per_budget], combined)
        by_budget = {eps: {i.metrics.index: i for i in run} for eps, run in zip(policy.budgets, per_budget, strict=True)}
        chosen = [by_budget[m.epsilon or policy.epsilon][m.index] for m in best]
    triggers = {i.metrics.name: i.trigger for i in chosen}
    return Inspection(tuple(i.metrics for i in chosen), triggers, pool.holdout[0], seconds, combined)


def context_of(model: PromptTunedCLIP, pool: OODPool, provenance: Provenance, command: str = "") -> ScanContext:
    return ScanContext(provenance, pool.info, model_info(model), environment(model.device), command)


def scan_model(
    model: PromptTunedCLIP,
    pool: OODPool,
    policy: Policy,
    *,
    provenance: Provenance,
    command: str = "",
    progress: Progress = no_progress,
) -> ScanOutput:
    """Run the policy's detector on ``model`` with ``pool``, decide, and (if the policy asks) run
    the positive control before a PASS is issued.

    Raises:
        PolicyError: fewer candidates than the rule needs, or a calibrated tau that does not apply.
    """
    candidates = candidate_classes(len(model.classnames), policy)
    if rule_for(policy).standardised:
        policy.threshold(len(candidates))  # refuse a mismatched tau before spending compute
    inspection = inspect_candidates(model, pool, policy, candidates, progress)
    result = conclude(inspection, context_of(model, pool, provenance, command), policy)
    if policy.positive_control != PositiveControl.OFF and result.decision.verdict in (Verdict.PASS, Verdict.FAIL):
        # on a FAIL too, so every report shows the scan's power on this model; only a PASS can change
        result = with_positive_control(model, pool, policy, result, provenance)
    return ScanOutput(result, inspection.triggers, inspection.example)


def with_positive_control(model: PromptTunedCLIP, pool: OODPool, policy: Policy, result: ScanResult, provenance: Provenance) -> ScanResult:
    """A PASS stands only if the same scan catches a backdoor planted in a copy of the model."""
    from gatekeeper.control import run_control

    plain = replace(policy, positive_control=PositiveControl.OFF)

    def scan(copy: PromptTunedCLIP) -> ScanResult:
        return scan_model(copy, pool, plain, provenance=provenance).result

    top = max(result.classes, key=lambda c: c.z).index if result.classes else None
    outcome = run_control(model, pool, policy, top, scan)
    decision = result.decision
    if not outcome.caught and decision.verdict == Verdict.PASS:
        decision = Decision(Verdict.INCONCLUSIVE, decision.s_max, decision.threshold, decision.threshold_kind, None, outcome.reason)
    timings = {**result.timings, "positive_control_s": outcome.seconds}
    return replace(result, decision=decision, positive_control=outcome, timings=timings)


def control_not_run(result: ScanResult, policy: Policy) -> ScanResult:
    """A merged sharded scan cannot run the positive control (it needs the model): no PASS then."""
    if policy.positive_control == PositiveControl.OFF or result.decision.verdict != Verdict.PASS:
        return result
    d = result.decision
    reason = "the policy asks for a positive control, which a merged sharded scan cannot run: scan unsharded"
    return replace(result, decision=Decision(Verdict.INCONCLUSIVE, d.s_max, d.threshold, d.threshold_kind, None, reason))
