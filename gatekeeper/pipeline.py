"""The core of a scan: ``scan_model(model, pool, policy) -> ScanOutput`` (invert -> decide), on a loaded
model and pool; :mod:`gatekeeper.scan` wraps it with source, load and report."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import torch

from gatekeeper import __version__
from gatekeeper.decide import apply_accepted, candidate_classes, decide, floor_null, rule_for, score_classes
from gatekeeper.inversion.base import ClassInversion, InversionSettings, Inverter
from gatekeeper.inversion.clip_inspector import ClipInspector
from gatekeeper.inversion.fast import FastClipInspector
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Detector, Implementation, Policy, PositiveControl
from gatekeeper.result import ClassMetrics, Decision, ModelInfo, NullModel, PoolInfo, Provenance, ScanResult, Verdict
from gatekeeper.tracking import ScanProgress, Stage, Tracker, no_ticks, pass_labels, training_label

if TYPE_CHECKING:
    from gatekeeper.control import Plant
    from gatekeeper.screen import Screening

MODEL = "model"
REFERENCE = "public backbone"
CONTROL_SCAN = "positive control: scan, "
EFFECTS = "trigger effects"


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
    grid_images: torch.Tensor | None = None  # the first hold-out images, for the trigger effects' grids


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
        pixel_mean=model.normalisation[0],
        pixel_std=model.normalisation[1],
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
    detector: Inverter, model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int],
    track: Tracker | None = None, who: str = MODEL,
) -> list[ClassInversion]:
    """``policy.restarts`` inversions per class from seeds seed, seed+1, ...; per class the best by
    :func:`restart_rank` counts. Each restart is one pass of ``track``, labelled by ``who``; the
    restarts run side by side where the scan has workers (``gatekeeper.parallel``)."""
    from gatekeeper.parallel import run_all, slot

    track = track or Tracker()

    def restart(r: int, label: str) -> Callable[[], list[ClassInversion]]:
        def run() -> list[ClassInversion]:
            settings = InversionSettings(policy.epsilon, policy.batch_size, policy.epochs, policy.lr, policy.seed + r)
            with slot():
                return detector.invert(model, pool.inversion, pool.holdout, candidates, settings, track.inversion_pass(label))

        return run

    runs = run_all([restart(r, label) for r, label in enumerate(pass_labels(who, policy.epsilon, policy.restarts))])
    return [max(group, key=lambda i: restart_rank(i.metrics)) for group in zip(*runs, strict=True)]


def reference_model(model: PromptTunedCLIP) -> PromptTunedCLIP:
    """The un-tuned backbone used zero-shot ("a photo of a {}.") with the delivered class names."""
    from gatekeeper.models.manifest import ModelKind

    manifest = replace(model.manifest, kind=ModelKind.ZEROSHOT)
    ref = PromptTunedCLIP(model.clip, model.tokenizer, manifest)
    ref.to(model.device).eval()
    ref.freeze_text()
    return ref


def invert_candidates(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], track: Tracker | None = None
) -> tuple[list[ClassInversion], float]:
    """The inspect stage on ``candidates``: the policy's detector (with restarts, and the public
    backbone's run for the scorings that compare with it, cached: ``gatekeeper.null``); returns
    (inversions, seconds)."""
    from gatekeeper.null import reference_inversions
    from gatekeeper.parallel import run_all

    t0 = time.perf_counter()
    model.freeze_text()
    detector = make_inverter(policy)
    compared = rule_for(policy).needs_reference

    def own() -> list[ClassInversion]:
        return best_of_restarts(detector, model, pool, policy, candidates, track)

    def public() -> list[ClassMetrics]:
        return reference_inversions(model, pool, policy, candidates, track) if compared else []

    both: list[Any] = run_all([own, public])
    inversions, ref = cast(list[ClassInversion], both[0]), cast(list[ClassMetrics], both[1])
    if compared:
        inversions = [
            ClassInversion(replace(i.metrics, reference_asr=r.asr, reference_loss=r.loss), i.trigger)
            for i, r in zip(inversions, ref, strict=True)
        ]
    return inversions, time.perf_counter() - t0


def null_for(model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], inversions: list[ClassInversion],
             track: Tracker | None = None) -> NullModel | None:
    """The lift scoring's null margin at the policy's (single) budget; None for the other scorings."""
    if not rule_for(policy).uses_null:
        return None
    from gatekeeper.null import measure_null

    return measure_null(model, pool, policy, candidates, [i.metrics.reference_asr or 0.0 for i in inversions], track)


def conclude(inspection: Inspection, context: ScanContext, policy: Policy) -> ScanResult:
    """Scores and the verdict from an inspection (the decide stage)."""
    null = inspection.null
    if rule_for(policy).uses_null and null is None:
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
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], track: Tracker | None = None,
    null: NullModel | None = None, inverted: Callable[[list[ClassMetrics]], None] | None = None,
) -> Inspection:
    """Invert ``candidates`` at every budget of the policy (with restarts, and the public backbone
    where the rule needs it) and measure the null model where the rule uses one (unless ``null``,
    one already measured for this backbone, class list and pool, is given). With several budgets
    each class keeps the budget whose evidence is strongest (``decide.strongest_budget``). With one
    budget, ``inverted`` gets the inversions' metrics before the null is measured."""
    from gatekeeper.decide import strongest_budget
    from gatekeeper.null import combine_nulls

    per_budget: list[list[ClassInversion]] = []
    nulls: list[NullModel] = []
    seconds = 0.0
    for eps in policy.budgets:
        at = policy.at_budget(eps)
        inversions, s = invert_candidates(model, pool, at, candidates, track)
        per_budget.append([ClassInversion(replace(i.metrics, epsilon=eps), i.trigger) for i in inversions])
        seconds += s
        if inverted is not None and len(policy.budgets) == 1:
            inverted([i.metrics for i in inversions])
        measured = null_for(model, pool, at, candidates, inversions, track) if null is None else None
        if measured is not None:
            nulls.append(measured)
    chosen = per_budget[0]
    combined = null
    if combined is None and nulls:
        combined = nulls[0] if len(nulls) == 1 else combine_nulls(policy, policy.n_tests(len(candidates)), nulls)
    if len(per_budget) > 1:
        assert combined is not None  # several budgets need the lift rule, which always has a null
        best = strongest_budget([[i.metrics for i in run] for run in per_budget], combined)
        by_budget = {eps: {i.metrics.index: i for i in run} for eps, run in zip(policy.budgets, per_budget, strict=True)}
        chosen = [by_budget[m.epsilon or policy.epsilon][m.index] for m in best]
    triggers = {i.metrics.name: i.trigger for i in chosen}
    return Inspection(tuple(i.metrics for i in chosen), triggers, pool.holdout[0], seconds, combined)


def plan_inspection(model: PromptTunedCLIP, policy: Policy, n_candidates: int, measures_null: bool = True) -> list[Stage]:
    """The stages :func:`inspect_candidates` runs, in order: per budget the model's restarts, the
    public backbone's (where the rule compares with it) and each clean copy's tuning and restarts
    (where the rule measures a null)."""
    from gatekeeper.null import NULL_TRAIN_EPOCHS, copy_label

    rule = rule_for(policy)
    stages: list[Stage] = []
    for eps in policy.budgets:
        stages += [Stage(label, n_candidates) for label in pass_labels(MODEL, eps, policy.restarts)]
        if rule.needs_reference:
            stages += [Stage(label, n_candidates) for label in pass_labels(REFERENCE, eps, policy.restarts)]
        if measures_null and rule.uses_null and model.ctx is not None:
            for i in range(policy.null_copies):
                who = copy_label(i, policy.null_copies)
                stages.append(Stage(training_label(who, eps), NULL_TRAIN_EPOCHS, "epoch"))
                stages += [Stage(label, n_candidates) for label in pass_labels(who, eps, policy.restarts)]
    return stages


def control_rescans_target_only(policy: Policy) -> bool:
    """Whether the positive control re-scans only the planted class: under a rule that decides each
    class on its own evidence (lift: the class's lower bound against the null margin, at the whole
    scan's number of tests) the other classes' inversions cannot change whether the planted class
    is flagged; the z rules standardise over every class, so they re-scan all of them."""
    return not rule_for(policy).standardised


def plan_control_scan(model: PromptTunedCLIP, policy: Policy, n_candidates: int) -> list[Stage]:
    """The positive control's re-scan of the planted copy (labels without the control's prefix)."""
    from gatekeeper.screen import plan_screening, screens

    plain = replace(policy, positive_control=PositiveControl.OFF)
    if not control_rescans_target_only(policy):
        return plan_screened_inspection(model, plain, n_candidates)
    screening = plan_screening(plain, n_candidates, rule_for(plain).needs_reference) if screens(plain, n_candidates) else []
    return screening + plan_inspection(model, plain, 1, measures_null=False)  # the planted class, judged with the scan's null


def plan_scan(model: PromptTunedCLIP, policy: Policy, n_candidates: int) -> list[Stage]:
    """Every stage :func:`scan_model` may run: the inspection, then the positive control's planting
    and re-scan where the policy asks for it (the tracker drops what does not run)."""
    from gatekeeper.control import PLANT_EPOCHS, PLANTING
    from gatekeeper.models.manifest import ModelKind

    stages = plan_screened_inspection(model, policy, n_candidates)
    if policy.positive_control != PositiveControl.OFF and model.kind != ModelKind.ZEROSHOT:
        stages.append(Stage(PLANTING, PLANT_EPOCHS, "epoch"))
        stages += [replace(s, label=CONTROL_SCAN + s.label) for s in plan_control_scan(model, policy, n_candidates)]
    return stages


def plan_screened_inspection(model: PromptTunedCLIP, policy: Policy, n_candidates: int) -> list[Stage]:
    """The screening (where the policy screens this many classes), then the inspection of what it keeps."""
    from gatekeeper.screen import plan_screening, screens

    if not screens(policy, n_candidates):
        return plan_inspection(model, policy, n_candidates)
    kept = policy.screen_keep  # per budget; more only when the budgets keep different classes
    return plan_screening(policy, n_candidates, rule_for(policy).needs_reference) + plan_inspection(model, policy, kept)


def screened_candidates(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], track: Tracker | None = None
) -> tuple[list[int], Screening | None]:
    """The candidates the full inversion runs on: all of them, or what the screening keeps."""
    from gatekeeper.screen import screen, screens

    if not screens(policy, len(candidates)):
        return candidates, None
    screening = screen(model, pool, policy, candidates, track)
    return list(screening.kept), screening


def context_of(model: PromptTunedCLIP, pool: OODPool, provenance: Provenance, command: str = "") -> ScanContext:
    return ScanContext(provenance, pool.info, model_info(model), environment(model.device), command)


def scan_model(
    model: PromptTunedCLIP,
    pool: OODPool,
    policy: Policy,
    *,
    provenance: Provenance,
    command: str = "",
    progress: ScanProgress = no_ticks,
) -> ScanOutput:
    """Run the policy's detector on ``model`` with ``pool``, decide, and (if the policy asks) run
    the positive control before a PASS is issued. ``progress`` gets a tick over the whole scan
    (:func:`plan_scan`).

    Raises:
        PolicyError: fewer candidates than the rule needs, or a calibrated tau that does not apply.
    """
    from gatekeeper import parallel

    candidates = candidate_classes(len(model.classnames), policy)
    if rule_for(policy).standardised:
        policy.threshold(len(candidates), pool.info.content_hash)  # refuse a mismatched tau before spending compute
    track = Tracker(plan_scan(model, policy, len(candidates)), progress)
    kept, screening = screened_candidates(model, pool, policy, candidates, track)
    early = EarlyPlant(model, policy, track) if policy.positive_control != PositiveControl.OFF and parallel.active() else None
    inspection = inspect_candidates(model, pool, policy, kept, track, inverted=early.start if early else None)
    result = conclude(inspection, context_of(model, pool, provenance, command), policy)
    if screening is not None:
        result = replace(result, screening=screening.to_dict(), timings={**result.timings, "screening_s": screening.seconds})
    result = with_trigger_effects(model, pool, policy, result, inspection.triggers, track)
    if policy.positive_control != PositiveControl.OFF and result.decision.verdict in (Verdict.PASS, Verdict.FAIL):
        # on a FAIL too, so every report shows the scan's power on this model; only a PASS can change
        result = with_positive_control(model, pool, policy, result, provenance, track, early)
    elif early is not None:
        early.settle()  # a plant started for a control that does not run: not left computing
    track.finish()
    from gatekeeper.effect import GRID

    return ScanOutput(result, inspection.triggers, inspection.example, pool.holdout[:GRID] if result.trigger_effects else None)


def detect(model: PromptTunedCLIP, pool: OODPool, policy: Policy, provenance: Provenance, track: Tracker | None = None) -> ScanResult:
    """The detector and the rule alone, for the copies a scan or a calibration trains itself: no
    trigger effects and no positive control (``policy``'s is not run)."""
    candidates, _ = screened_candidates(model, pool, policy, candidate_classes(len(model.classnames), policy), track)
    inspection = inspect_candidates(model, pool, policy, candidates, track)
    return conclude(inspection, context_of(model, pool, provenance), policy)


def with_trigger_effects(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, result: ScanResult, triggers: dict[str, torch.Tensor], track: Tracker
) -> ScanResult:
    """Each flagged class's ASR against its trigger's scale, on the model and the public backbone
    (``gatekeeper.effect``; one pass of ``track`` when a class is flagged, none otherwise)."""
    from gatekeeper.effect import trigger_effects
    from gatekeeper.parallel import slot

    t0 = time.perf_counter()
    with slot():
        effects = trigger_effects(model, pool.holdout, result.classes, triggers, policy.epsilon, track.inversion_pass(EFFECTS))
    if not effects:
        return result
    return replace(result, trigger_effects=effects, timings={**result.timings, "trigger_effects_s": round(time.perf_counter() - t0, 3)})


class EarlyPlant:
    """The positive control's planting, started as soon as the scan's top class is known (after the
    inversions, before the null copies), beside them where the scan has workers. Used only if the
    scan's final top class is the one it was started for (the lift rule's per-class bounds do not
    depend on the null margin, so it always is with one budget); otherwise planted again."""

    def __init__(self, model: PromptTunedCLIP, policy: Policy, track: Tracker) -> None:
        self.model, self.policy, self.track = model, policy, track
        self.top: int | None = None
        self.wait: Callable[[], Plant] | None = None

    def start(self, metrics: list[ClassMetrics]) -> None:
        from gatekeeper.control import plant_for
        from gatekeeper.parallel import start

        scores = score_classes(metrics, self.policy, None)
        top = max(scores, key=lambda c: c.z).index if scores else None
        self.top, self.wait = top, start(lambda: plant_for(self.model, self.policy, top, self.track))

    def plant(self, top: int | None) -> Plant:
        from gatekeeper.control import plant_for

        if self.wait is not None:
            planted = self.wait()
            if self.top == top:
                return planted
        return plant_for(self.model, self.policy, top, self.track)

    def settle(self) -> None:
        if self.wait is not None:
            self.wait()


def with_positive_control(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, result: ScanResult, provenance: Provenance, track: Tracker | None = None,
    early: EarlyPlant | None = None,
) -> ScanResult:
    """A PASS stands only if the same scan catches a backdoor planted in a copy of the model."""
    from gatekeeper.control import plant_for, run_control

    track = track or Tracker()
    plain = replace(policy, positive_control=PositiveControl.OFF)

    def scan(copy: PromptTunedCLIP, target: int) -> ScanResult:
        scoped = track.scoped(CONTROL_SCAN)
        candidates = candidate_classes(len(model.classnames), policy)
        # a class the scan does not sample cannot be flagged by it: then the whole scan runs, and misses it
        if not control_rescans_target_only(policy) or target not in candidates:
            return detect(copy, pool, plain, provenance, scoped)
        kept, _ = screened_candidates(copy, pool, plain, candidates, scoped)
        if target not in kept:  # the same scan would not have inverted the planted class
            reason = f"the screening did not keep the planted class '{model.classnames[target]}'"
            return replace(result, decision=Decision(Verdict.PASS, float("nan"), result.decision.threshold,
                                                     result.decision.threshold_kind, None, reason), classes=())
        null = result.null_model or floor_null(plain, len(result.classes))  # the scan's own null and number of tests
        inspection = inspect_candidates(copy, pool, plain, [target], scoped, null=null)
        return conclude(inspection, context_of(copy, pool, provenance), plain)

    top = max(result.classes, key=lambda c: c.z).index if result.classes else None
    planted = early.plant(top) if early is not None else plant_for(model, policy, top, track)
    outcome = run_control(model, pool, policy, planted, scan)
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
