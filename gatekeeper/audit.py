"""The core: ``audit(model, pool, policy) -> AuditResult`` (inspect -> decide)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from gatekeeper import __version__
from gatekeeper.decide import anomaly_scores, candidate_classes, decide
from gatekeeper.inspect.base import ClassInversion, Detector, InversionSettings, Progress, no_progress
from gatekeeper.inspect.clip_inspector import ClipInspector
from gatekeeper.inspect.fast import FastClipInspector
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Implementation, Policy
from gatekeeper.result import AuditResult, ClassMetrics, ModelInfo, PoolInfo, Provenance


@dataclass(frozen=True)
class AuditOutput:
    result: AuditResult
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


def invert_candidates(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], progress: Progress = no_progress
) -> tuple[list[ClassInversion], float]:
    """Algorithm 1 on ``candidates`` (the inspect stage); returns (inversions, seconds)."""
    settings = InversionSettings(policy.epsilon, policy.batch_size, policy.epochs, policy.lr, policy.seed)
    t0 = time.perf_counter()
    model.freeze_text()
    detector: Detector = ClipInspector() if policy.implementation == Implementation.REFERENCE else FastClipInspector()
    inversions = detector.invert(model, pool.inversion, pool.holdout, candidates, settings, progress)
    return inversions, time.perf_counter() - t0


def conclude(
    metrics: list[ClassMetrics],
    policy: Policy,
    *,
    provenance: Provenance,
    pool: PoolInfo,
    model: ModelInfo,
    seconds: float,
    environment: dict[str, str],
    command: str,
) -> AuditResult:
    """Scores (Eq. 6-7) and the verdict (Eq. 8) from raw per-class metrics (the decide stage)."""
    scores = anomaly_scores(metrics, policy.min_trigger_asr)
    return AuditResult(
        decision=decide(scores, policy),
        classes=tuple(scores),
        policy=policy.to_dict(),
        policy_hash=policy.digest(),
        provenance=provenance,
        pool=pool,
        model=model,
        timings={"inversion_s": round(seconds, 3), "per_class_s": round(seconds / max(len(metrics), 1), 3)},
        environment=environment,
        seed=policy.seed,
        command=command,
    )


def audit(
    model: PromptTunedCLIP,
    pool: OODPool,
    policy: Policy,
    *,
    provenance: Provenance,
    command: str = "",
    progress: Progress = no_progress,
) -> AuditOutput:
    """Run CLIP-Inspector on ``model`` with ``pool`` under ``policy`` and decide.

    Raises:
        PolicyError: fewer than 3 candidates, or a calibrated tau that does not apply.
    """
    candidates = candidate_classes(len(model.classnames), policy)
    policy.threshold(len(candidates))  # refuse a mismatched tau before spending compute
    inversions, seconds = invert_candidates(model, pool, policy, candidates, progress)
    result = conclude(
        [i.metrics for i in inversions],
        policy,
        provenance=provenance,
        pool=pool.info,
        model=model_info(model),
        seconds=seconds,
        environment=environment(next(iter(model.buffers())).device),
        command=command,
    )
    triggers = {i.metrics.name: i.trigger for i in inversions}
    return AuditOutput(result, triggers, pool.holdout[0])
