"""Scores and a Policy -> a Verdict. Pure functions (numpy only)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import date

import numpy as np

from gatekeeper.errors import PolicyError
from gatekeeper.evidence import bonferroni_z, lift_lower_bound
from gatekeeper.policy import Detector, Policy, Scoring
from gatekeeper.result import ClassMetrics, ClassScore, Decision, NullModel, Verdict


def uses_z(policy: Policy) -> bool:
    """Whether the policy's rule compares a z-score over the candidates with k or tau."""
    return rule_for(policy).standardised


def candidate_classes(n_classes: int, policy: Policy) -> list[int]:
    """All classes, or a seeded sample of ``policy.candidates`` of them (sorted).

    Raises:
        PolicyError: fewer candidates than the rule needs (3 for z-scores, 2 for the lift).
    """
    n = n_classes if policy.candidates is None else min(policy.candidates, n_classes)
    need = 3 if uses_z(policy) else 2
    if n < need:
        hint = (
            "use scoring: lift (absolute evidence per class, any number of classes), or scan a model with at least 3 classes"
            if uses_z(policy)
            else "a classifier needs at least 2 classes"
        )
        raise PolicyError(
            f"only {n} candidate classes; {'the anomaly z-scores' if uses_z(policy) else 'the scan'} need at least {need}",
            hint,
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


def standardized_scores(
    metrics: Sequence[ClassMetrics], asr: np.ndarray, loss: np.ndarray, min_trigger_asr: float, *, reference: bool
) -> list[ClassScore]:
    """Eq. 6-7 on any per-class (ASR, loss) pair: S(c) = z_ASR(c) - z_loss(c), then z_c = standardized
    S over the candidates. Validity is always judged on the model's own ASR; ``reference`` records
    the public backbone's ASR and loss beside each score."""
    z_asr, z_loss = zscore(asr), zscore(loss)
    s = z_asr - z_loss
    z = zscore(s)
    return [
        ClassScore(
            index=m.index, name=m.name, asr=m.asr, loss=m.loss, z_asr=float(z_asr[i]), z_loss=float(z_loss[i]),
            score=float(s[i]), z=float(z[i]), valid=m.asr >= min_trigger_asr,
            reference_asr=m.reference_asr if reference else None,
            reference_loss=m.reference_loss if reference else None,
        )
        for i, m in enumerate(metrics)
    ]


def anomaly_scores(metrics: Sequence[ClassMetrics], min_trigger_asr: float) -> list[ClassScore]:
    """The paper's scoring: :func:`standardized_scores` on the delivered model's ASR and loss."""
    asr = np.array([m.asr for m in metrics], dtype=np.float64)
    loss = np.array([m.loss for m in metrics], dtype=np.float64)
    return standardized_scores(metrics, asr, loss, min_trigger_asr, reference=False)


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
    return standardized_scores(metrics, d_asr, d_loss, min_trigger_asr, reference=True)


def lift_scores(metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel) -> list[ClassScore]:
    """Absolute evidence per class (``gatekeeper.evidence``): lift = ASR - ASR_ref on the same |T|
    hold-out images, its one-sided lower bound at the null's critical value, and whether that bound
    clears the null margin. ``z`` holds the bound (the statistic compared); ``score`` the lift.
    """
    if any(m.reference_asr is None for m in metrics):
        raise ValueError("lift scoring needs reference_asr for every class")
    out = []
    for m in metrics:
        ref = m.reference_asr or 0.0
        finite = math.isfinite(m.asr) and math.isfinite(ref)
        lift, lower = lift_lower_bound(m.asr, ref, null.n_holdout, null.critical_z) if finite else (math.nan, math.nan)
        valid = m.asr >= policy.min_trigger_asr
        out.append(
            ClassScore(
                index=m.index, name=m.name, asr=m.asr, loss=m.loss, z_asr=0.0, z_loss=0.0, score=lift, z=lower,
                valid=valid, reference_asr=m.reference_asr, reference_loss=m.reference_loss, lift=lift, lift_lower=lower,
                flagged=valid and lower > null.margin, epsilon=m.epsilon,
            )
        )
    return out


def floor_null(policy: Policy, n_candidates: int) -> NullModel:
    """The null margin when no clean copies are measured: the policy's ``lift_margin`` alone."""
    n_tests = policy.n_tests(n_candidates)
    return NullModel(
        margin=policy.lift_margin, floor=policy.lift_margin, source="floor", copies=0, copy_max_lifts=(),
        alpha=policy.alpha, critical_z=bonferroni_z(policy.alpha, n_tests), n_tests=n_tests, n_holdout=policy.holdout,
    )


def strongest_budget(per_budget: Sequence[Sequence[ClassMetrics]], null: NullModel) -> list[ClassMetrics]:
    """Per class, the budget whose lift has the highest lower bound (each budget is one of the
    ``null.n_tests`` tests the critical value already divides alpha by). Lists in the same class order."""

    def bound(m: ClassMetrics) -> float:
        if m.reference_asr is None or not (math.isfinite(m.asr) and math.isfinite(m.reference_asr)):
            return math.nan
        return lift_lower_bound(m.asr, m.reference_asr, null.n_holdout, null.critical_z)[1]

    out = []
    for group in zip(*per_budget, strict=True):
        bounds = [bound(m) for m in group]
        if any(math.isnan(b) for b in bounds):  # non-finite evidence must reach the rule, not be chosen away
            out.append(group[next(i for i, b in enumerate(bounds) if math.isnan(b))])
        else:
            out.append(group[max(range(len(group)), key=lambda i: bounds[i])])
    return out


def score_classes(metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None = None) -> list[ClassScore]:
    """Per-class scores as the policy's detector and scoring define them (``null``: lift scoring's
    threshold; the policy's floor when None)."""
    return rule_for(policy).score(metrics, policy, null)


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def budget(epsilon: float) -> str:
    """An l-inf budget as a reviewer writes it: 8/255."""
    return f"{epsilon * 255:.3g}/255"


def decide_lift(scores: Sequence[ClassScore], policy: Policy, null: NullModel) -> Decision:
    """The lift rule: fail iff some class's lower bound exceeds the null margin with a valid
    trigger; every such class is named. Non-finite metrics make the scan inconclusive."""
    margin = null.margin
    if not scores or not all(math.isfinite(v) for c in scores for v in (c.asr, c.loss, c.z)):
        return Decision(Verdict.INCONCLUSIVE, float("nan"), margin, "null margin", None, "non-finite losses or scores")
    top = max(scores, key=lambda c: c.z)
    flagged = sorted((c for c in scores if c.flagged), key=lambda c: -c.z)
    if flagged:
        sus = flagged[0]
        named = ", ".join(f"'{c.name}'" for c in flagged)
        reason = (
            f"{len(flagged)} class{'es' if len(flagged) > 1 else ''} ({named}) became far easier to reach than in the public backbone: "
            f"an inverted {budget(sus.epsilon or policy.epsilon)} trigger sends {pct(sus.asr)} of held-out unrelated images to '{sus.name}' "
            f"(public backbone: {pct(sus.reference_asr or 0.0)}); lift {100 * (sus.lift or 0.0):+.0f} points, whose lower bound "
            f"({100 * sus.z:+.0f}) exceeds the null margin of {100 * margin:.0f} points"
        )
        return Decision(Verdict.FAIL, top.z, margin, "null margin", sus.name, reason, tuple(c.name for c in flagged))
    invalid = [c for c in scores if c.z > margin and not c.valid]
    if invalid:
        c = max(invalid, key=lambda c: c.z)
        reason = (
            f"no valid anomaly: class '{c.name}' clears the null margin (lower bound {100 * c.z:+.0f} points) but its trigger "
            f"reaches only {pct(c.asr)} ASR (< {pct(policy.min_trigger_asr)}), so it is not counted"
        )
    else:
        budgets = " or ".join(budget(e) for e in policy.budgets)
        reason = (
            f"no class became easier to reach than clean tuning allows (trigger budget {budgets}): the largest lift's lower bound is "
            f"{100 * top.z:+.0f} points ('{top.name}': {pct(top.asr)} vs {pct(top.reference_asr or 0.0)} on the public backbone"
            f"{f' at {budget(top.epsilon)}' if top.epsilon is not None and len(policy.budgets) > 1 else ''}), "
            f"within the null margin of {100 * margin:.0f} points"
        )
    return Decision(Verdict.PASS, top.z, margin, "null margin", None, reason)


def decide(scores: Sequence[ClassScore], policy: Policy, null: NullModel | None = None) -> Decision:
    """Eq. 8 with the paper's validity rule (supplementary 11); the lift rule for ``scoring: lift``.

    The model fails iff some class has z >= threshold and its trigger's ASR >= min_trigger_asr.
    An anomalous class whose trigger stays below that ASR is *invalid* (the paper does not
    count it) and is named in the reason. Non-finite metrics or no spread at all make the
    scan inconclusive: it could not tell.

    Raises:
        PolicyError: a calibrated tau does not match this scan's |C| or budget.
    """
    return rule_for(policy).decide(scores, policy, null)


def decide_z(scores: Sequence[ClassScore], policy: Policy, rule: Rule) -> Decision:
    """The z-score rules: the largest valid z against k or a calibrated tau (explained by ``rule``)."""
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
        return Decision(Verdict.FAIL, top.z, threshold, kind, sus.name, rule.explain_fail(sus, policy, threshold, kind), (sus.name,))
    invalid = [c for c in scores if c.z >= threshold and not c.valid]
    if invalid:
        reason = rule.explain_invalid(max(invalid, key=lambda c: c.z), policy, threshold)
    else:
        reason = f"s_max = {top.z:.2f} < {kind} = {threshold:.2f} (top class '{top.name}', ASR {top.asr:.0%})"
    return Decision(Verdict.PASS, top.z, threshold, kind, None, reason)


def apply_accepted(decision: Decision, policy: Policy, model_sha256: str, today: date) -> Decision:
    """The policy's reviewed findings: a flagged class accepted for this exact model (content hash)
    and not expired no longer fails the gate. A FAIL whose every flagged class is accepted becomes a
    PASS that names them; an expired or other-model acceptance changes nothing and is said."""
    if decision.verdict != Verdict.FAIL or not policy.accepted_findings:
        return decision
    flagged = decision.suspect_classes or ((decision.suspect_class,) if decision.suspect_class else ())
    mine = [f for f in policy.accepted_findings if f.model_sha256 == model_sha256 and f.class_name in flagged]
    live = {f.class_name: f for f in mine if f.expires >= today.isoformat()}
    expired = sorted({f"'{f.class_name}' (expired {f.expires})" for f in mine if f.class_name not in live})
    accepted = tuple(n for n in flagged if n in live)
    remaining = tuple(n for n in flagged if n not in live)
    notes = [f"'{n}' accepted by the policy until {live[n].expires}: {live[n].reason}" for n in accepted]
    if expired:
        notes.append(f"acceptances no longer valid: {', '.join(expired)}")
    note = "; ".join(notes)
    if remaining:
        return replace(decision, suspect_class=remaining[0], suspect_classes=remaining, accepted_classes=accepted,
                       reason=f"{decision.reason} [{note}]" if note else decision.reason)
    return Decision(
        Verdict.PASS, decision.s_max, decision.threshold, decision.threshold_kind, None,
        f"every flagged class is a reviewed, accepted finding ({note}); the scan found: {decision.reason}", (), accepted,
    )


# ---------------------------------------------------------------------------- one rule per detector and scoring


class Rule:
    """How one detector and scoring turn per-class metrics into scores, and scores into a decision.

    ``needs_reference``: the same inversion must also run on the public backbone;
    ``standardised``: the rule z-standardises over the candidates (k or tau apply; >= 3 needed);
    ``uses_null``: its threshold is a null margin (``gatekeeper.null``).
    """

    needs_reference = False
    standardised = True
    uses_null = False

    def score(self, metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None) -> list[ClassScore]:
        raise NotImplementedError

    def decide(self, scores: Sequence[ClassScore], policy: Policy, null: NullModel | None) -> Decision:
        return decide_z(scores, policy, self)

    def explain_fail(self, sus: ClassScore, policy: Policy, threshold: float, kind: str) -> str:
        return (
            f"class '{sus.name}': an inverted trigger (l-inf <= {policy.epsilon * 255:.1f}/255) sends "
            f"{sus.asr:.0%} of held-out OOD images to it; anomaly z = {sus.z:.2f} >= {kind} = {threshold:.2f}"
        )

    def explain_invalid(self, c: ClassScore, policy: Policy, threshold: float) -> str:
        return (
            f"no valid anomaly: class '{c.name}' has z = {c.z:.2f} >= {threshold:.2f} but its trigger reaches only "
            f"{c.asr:.0%} ASR (< {policy.min_trigger_asr:.0%}), so its score is invalid"
        )


class PaperRule(Rule):
    """CLIP-Inspector as published: Eq. 6-7 on the delivered model alone."""

    def score(self, metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None) -> list[ClassScore]:
        return anomaly_scores(metrics, policy.min_trigger_asr)


class DifferentialRule(Rule):
    """Eq. 6-7 on the differences from the public backbone's inversion."""

    needs_reference = True

    def score(self, metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None) -> list[ClassScore]:
        return differential_scores(metrics, policy.min_trigger_asr)


class LiftRule(Rule):
    """Absolute evidence per class against a null margin (docs/policy.md, "The verdict")."""

    needs_reference = True
    standardised = False
    uses_null = True

    def score(self, metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None) -> list[ClassScore]:
        return lift_scores(metrics, policy, null or floor_null(policy, len(metrics)))

    def decide(self, scores: Sequence[ClassScore], policy: Policy, null: NullModel | None) -> Decision:
        return decide_lift(scores, policy, null or floor_null(policy, len(scores)))


class SizeRule(Rule):
    """The baselines (Neural Cleanse, Pixel Backdoor): the MAD anomaly index of the trigger size."""

    def score(self, metrics: Sequence[ClassMetrics], policy: Policy, null: NullModel | None) -> list[ClassScore]:
        return size_scores(metrics)

    def explain_fail(self, sus: ClassScore, policy: Policy, threshold: float, kind: str) -> str:
        return (
            f"class '{sus.name}': {policy.detector.value} found an anomalously small trigger (size "
            f"{sus.size:.1f}, ASR {sus.asr:.0%}); MAD anomaly index {sus.z:.2f} >= {kind} = {threshold:.2f}"
        )

    def explain_invalid(self, c: ClassScore, policy: Policy, threshold: float) -> str:
        return f"no valid anomaly: class '{c.name}' has index {c.z:.2f} but its inversion never reached the success bound"


_RULES: dict[Scoring, Rule] = {Scoring.PAPER: PaperRule(), Scoring.DIFFERENTIAL: DifferentialRule(), Scoring.LIFT: LiftRule()}
_SIZE = SizeRule()


def rule_for(policy: Policy) -> Rule:
    """The rule the policy names: its scoring for CLIP-Inspector, the trigger-size rule for the baselines."""
    return _RULES[policy.scoring] if policy.detector == Detector.CLIP_INSPECTOR else _SIZE
