"""The core: ``audit(model, pool, policy) -> AuditResult`` (inspect -> decide)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from gatekeeper import __version__
from gatekeeper.decide import anomaly_scores, candidate_classes, decide
from gatekeeper.inspect.base import InversionSettings, Progress, no_progress
from gatekeeper.inspect.clip_inspector import ClipInspector
from gatekeeper.inspect.fast import FastClipInspector
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Implementation, Policy
from gatekeeper.result import AuditResult, ModelInfo, Provenance


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
    device = next(iter(model.buffers())).device
    candidates = candidate_classes(len(model.classnames), policy)
    policy.threshold(len(candidates))  # refuse a mismatched tau before spending compute
    settings = InversionSettings(policy.epsilon, policy.batch_size, policy.epochs, policy.lr, policy.seed)
    t0 = time.perf_counter()
    model.freeze_text()
    detector = ClipInspector() if policy.implementation == Implementation.REFERENCE else FastClipInspector()
    inversions = detector.invert(model, pool.inversion, pool.holdout, candidates, settings, progress)
    t1 = time.perf_counter()
    scores = anomaly_scores([i.metrics for i in inversions], policy.min_trigger_asr)
    decision = decide(scores, policy)
    result = AuditResult(
        decision=decision,
        classes=tuple(scores),
        policy=policy.to_dict(),
        policy_hash=policy.digest(),
        provenance=provenance,
        pool=pool.info,
        model=ModelInfo(
            kind=model.kind.value,
            n_classes=len(model.classnames),
            backbone=model.manifest.backbone.describe(),
            image_size=model.image_size,
        ),
        timings={"inversion_s": round(t1 - t0, 3), "per_class_s": round((t1 - t0) / len(candidates), 3)},
        environment=environment(device),
        seed=policy.seed,
        command=command,
    )
    triggers = {i.metrics.name: i.trigger for i in inversions}
    return AuditOutput(result, triggers, pool.holdout[0])
