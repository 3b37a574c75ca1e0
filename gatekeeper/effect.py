"""What a flagged class's trigger does, for the report: its ASR as the trigger is scaled, on the
scanned model and on the public backbone, and the model's predictions on a few triggered images.

Part of the inspect stage (it needs the model, the hold-out images and the trigger; a report is a
pure function of the result), forward passes only: per flagged class, ``len(SCALES)`` passes over
the scan's hold-out images on each of the two models.
"""

from __future__ import annotations

import torch

from gatekeeper.inversion.base import Progress, no_progress
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, predict
from gatekeeper.result import ClassScore, TriggerEffect

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)  # factors of the inverted trigger δ; 1 is δ itself
GRID = 8  # hold-out images shown with the trigger applied, with the model's prediction


def _asr(model: PromptTunedCLIP, holdout: torch.Tensor, delta: torch.Tensor, target: int) -> float:
    """Eq. 5 as the detectors report it: hits / images, a Python float (no float32 rounding)."""
    from gatekeeper.inversion.clip_inspector import apply_trigger

    pred = predict(model, holdout, lambda x: apply_trigger(x, delta.to(x.device)))
    return int((pred == target).sum()) / len(pred) if len(pred) else 0.0


def trigger_effect(
    model: PromptTunedCLIP, backbone: PromptTunedCLIP, holdout: torch.Tensor, cls: ClassScore, delta: torch.Tensor, epsilon: float
) -> TriggerEffect:
    """One class's :class:`TriggerEffect`: ASR of s·δ (clamped to ±``epsilon``) for each s in SCALES on
    ``model`` and ``backbone``, and ``model``'s predictions on the first GRID images with δ."""
    from gatekeeper.inversion.clip_inspector import apply_trigger

    delta = delta.to(model.device)
    scaled = [(s * delta).clamp(-epsilon, epsilon) for s in SCALES]
    model_asr = tuple(_asr(model, holdout, d, cls.index) for d in scaled)
    backbone_asr = tuple(_asr(backbone, holdout, d, cls.index) for d in scaled)
    shown = holdout[:GRID]
    pred = predict(model, shown, lambda x: apply_trigger(x, delta.to(x.device)))
    names = tuple(model.classnames[int(i)] for i in pred)
    return TriggerEffect(cls.name, epsilon, SCALES, model_asr, backbone_asr, len(holdout), names)


def trigger_effects(
    model: PromptTunedCLIP,
    holdout: torch.Tensor,
    classes: tuple[ClassScore, ...],
    triggers: dict[str, torch.Tensor],
    epsilon: float,
    progress: Progress = no_progress,
) -> tuple[TriggerEffect, ...]:
    """:func:`trigger_effect` of every flagged class that has a trigger (none flagged: no work)."""
    from gatekeeper.pipeline import reference_model

    flagged = [c for c in classes if c.flagged and c.name in triggers]
    if not flagged:
        return ()
    backbone = reference_model(model)
    out = []
    for done, c in enumerate(flagged):
        progress(done, len(flagged), c.name)
        out.append(trigger_effect(model, backbone, holdout, c, triggers[c.name], c.epsilon or epsilon))
    progress(len(flagged), len(flagged), "")
    return tuple(out)
