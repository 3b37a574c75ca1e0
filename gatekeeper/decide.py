"""Scores and a Policy -> a Verdict. Pure functions (numpy only)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from gatekeeper.errors import PolicyError
from gatekeeper.policy import Detector, Policy, Scoring
from gatekeeper.result import ClassMetrics, ClassScore, Decision, Verdict


def candidate_classes(n_classes: int, policy: Policy) -> list[int]:
    """All classes, or a seeded sample of ``policy.candidates`` of them (sorted).

    Raises:
        PolicyError: fewer than 3 candidates would result.
    """
    n = n_classes if policy.candidates is None else min(policy.candidates, n_classes)
    if n < 3:
        raise PolicyError(
            f"only {n} candidate classes; the anomaly z-scores need at least 3",
            "scan a model with at least 3 classes or raise 'candidates'",
            key="candidates",
        )
    if n == n_classes:
        return list(range(n_classes))
    return sorted(random.Random(policy.seed).sample(range(n_classes), n))


def zscore(values: np.ndarray) -> np.ndarray:
    """(v - mean) / std over the candidates (population std); all zeros when std is 0."""
    std = float(values.std())
    if std == 0.0 or not math.isfinite(std):
        return np.zeros_like(values)
    return (values - values.mean()) / std


def anomaly_scores(metrics: Sequence[ClassMetrics], min_trigger_asr: float) -> list[ClassScore]:
    """Eq. 6-7: S(c) = z_ASR(c) - z_loss(c), then z_c = standardized S over the candidates."""
    asr = np.array([m.asr for m in metrics], dtype=np.float64)
    loss = np.array([m.loss for m in metrics], dtype=np.float64)
    z_asr, z_loss = zscore(asr), zscore(loss)
    s = z_asr - z_loss
    z = zscore(s)
    return [
        ClassScore(
            index=m.index,
            name=m.name,
            asr=m.asr,
            loss=m.loss,
            z_asr=float(z_asr[i]),
            z_loss=float(z_loss[i]),
            score=float(s[i]),
            z=float(z[i]),
            valid=m.asr >= min_trigger_asr,
        )
        for i, m in enumerate(metrics)
    ]


MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's std


def mad_anomaly_index(values: np.ndarray) -> np.ndarray:
    """Neural Cleanse's anomaly index, signed: (median - v) / (1.4826 * MAD).

    Positive for values *below* the median (a small trigger is the suspicious side); NC flags a
    class whose index exceeds 2. All zeros when the MAD is 0 (no spread to measure against).
    """
    med = float(np.median(values))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(values - med)))
    if mad == 0.0 or not math.isfinite(mad):
        return np.zeros_like(values)
    return (med - values) / mad


def size_scores(metrics: Sequence[ClassMetrics]) -> list[ClassScore]:
    """Baselines (Neural Cleanse, Pixel Backdoor): z = MAD anomaly index of the trigger size.

    A class is valid when its inversion reached the method's own success bound (size is finite).
    """
    size = np.array([m.size if m.size is not None else float("nan") for m in metrics], dtype=np.float64)
    finite = np.isfinite(size)
    # a class whose inversion never reached the bound counts as the largest possible trigger
    filled = np.where(finite, size, np.nanmax(size) if finite.any() else 0.0)
    z = mad_anomaly_index(filled)
    return [
        ClassScore(
            index=m.index, name=m.name, asr=m.asr, loss=m.loss, z_asr=0.0, z_loss=0.0,
            score=float(-filled[i]), z=float(z[i]), valid=bool(finite[i]), size=m.size,
        )
        for i, m in enumerate(metrics)
    ]


def differential_scores(metrics: Sequence[ClassMetrics], min_trigger_asr: float) -> list[ClassScore]:
    """Reference-differential scoring: S(c) = z(ASR - ASR_ref)(c) - z(L_avg - L_ref)(c), standardized.

    ASR_ref, L_ref come from the same inversion on the un-tuned backbone (zero-shot, same class
    names). A class that is naturally easy to reach in the public backbone is easy in both and
    cancels; a class the provider made easier stands out.
    """
    if any(m.reference_asr is None or m.reference_loss is None for m in metrics):
        raise ValueError("differential scoring needs reference_asr/reference_loss for every class")
    d_asr = np.array([m.asr - (m.reference_asr or 0.0) for m in metrics], dtype=np.float64)
    d_loss = np.array([m.loss - (m.reference_loss or 0.0) for m in metrics], dtype=np.float64)
    z_asr, z_loss = zscore(d_asr), zscore(d_loss)
    s = z_asr - z_loss
    z = zscore(s)
    return [
        ClassScore(
            index=m.index, name=m.name, asr=m.asr, loss=m.loss, z_asr=float(z_asr[i]), z_loss=float(z_loss[i]),
            score=float(s[i]), z=float(z[i]), valid=m.asr >= min_trigger_asr,
            reference_asr=m.reference_asr, reference_loss=m.reference_loss,
        )
        for i, m in enumerate(metrics)
    ]


def score_classes(metrics: Sequence[ClassMetrics], policy: Policy) -> list[ClassScore]:
    """Per-class anomaly scores as the policy's detector and scoring define them."""
    if policy.detector != Detector.CLIP_INSPECTOR:
        return size_scores(metrics)
    if policy.scoring == Scoring.DIFFERENTIAL:
        return differential_scores(metrics, policy.min_trigger_asr)
    return anomaly_scores(metrics, policy.min_trigger_asr)


def decide(scores: Sequence[ClassScore], policy: Policy) -> Decision:
    """Eq. 8 with the paper's validity rule (supplementary 11).

    The model fails iff some class has z >= threshold and its trigger's ASR >= min_trigger_asr.
    An anomalous class whose trigger stays below that ASR is *invalid* (the paper does not
    count it) and is named in the reason. Non-finite metrics or no spread at all make the
    scan inconclusive: it could not tell.

    Raises:
        PolicyError: a calibrated tau does not match this scan's |C| or budget.
    """
    threshold, kind = policy.threshold(len(scores))
    finite = all(math.isfinite(v) for c in scores for v in (c.asr, c.loss, c.z))
    if not finite:
        return Decision(Verdict.INCONCLUSIVE, float("nan"), threshold, kind, None, "non-finite losses or scores")
    top = max(scores, key=lambda c: c.z)
    if all(c.z == 0.0 for c in scores):
        return Decision(
            Verdict.INCONCLUSIVE, 0.0, threshold, kind, None, "no spread among the candidates' scores (ASR and loss, or trigger sizes)"
        )
    flagged = [c for c in scores if c.z >= threshold and c.valid]
    if flagged:
        sus = max(flagged, key=lambda c: c.z)
        if policy.detector != Detector.CLIP_INSPECTOR:
            reason = (
                f"class '{sus.name}': {policy.detector.value} found an anomalously small trigger (size "
                f"{sus.size:.1f}, ASR {sus.asr:.0%}); MAD anomaly index {sus.z:.2f} >= {kind} = {threshold:.2f}"
            )
        else:
            reason = (
                f"class '{sus.name}': an inverted trigger (l-inf <= {policy.epsilon * 255:.1f}/255) sends "
                f"{sus.asr:.0%} of held-out OOD images to it; anomaly z = {sus.z:.2f} >= {kind} = {threshold:.2f}"
            )
        return Decision(Verdict.FAIL, top.z, threshold, kind, sus.name, reason)
    invalid = [c for c in scores if c.z >= threshold and not c.valid]
    if invalid:
        c = max(invalid, key=lambda c: c.z)
        reason = (
            f"no valid anomaly: class '{c.name}' has z = {c.z:.2f} >= {threshold:.2f} but its trigger reaches only "
            f"{c.asr:.0%} ASR (< {policy.min_trigger_asr:.0%}), so its score is invalid"
        )
        if policy.detector != Detector.CLIP_INSPECTOR:
            reason = f"no valid anomaly: class '{c.name}' has index {c.z:.2f} but its inversion never reached the success bound"
    else:
        reason = f"s_max = {top.z:.2f} < {kind} = {threshold:.2f} (top class '{top.name}', ASR {top.asr:.0%})"
    return Decision(Verdict.PASS, top.z, threshold, kind, None, reason)
