"""Domain objects that flow between the stages: provenance, pool info, scores, the audit result.

``ScanResult.to_dict`` is the JSON result (schema ``schemas/result.schema.json``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from gatekeeper.errors import ExitCode

SCHEMA_VERSION = "1.0"


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"

    def exit_code(self, on_inconclusive: Any = "fail") -> ExitCode:
        """The gate's exit code for this verdict (the one table; ``on_inconclusive: pass`` makes 3 a 0)."""
        if self is Verdict.INCONCLUSIVE and getattr(on_inconclusive, "value", on_inconclusive) == "pass":
            return ExitCode.PASS
        return _EXIT_CODES[self]


_EXIT_CODES = {
    Verdict.PASS: ExitCode.PASS,
    Verdict.FAIL: ExitCode.BACKDOOR,
    Verdict.INCONCLUSIVE: ExitCode.INCONCLUSIVE,
    Verdict.ERROR: ExitCode.SCAN_ERROR,
}


@dataclass(frozen=True)
class Provenance:
    """Where the model came from and what exactly was scanned."""

    reference: str
    source: str  # local | hf | mlflow ...
    path: str
    revision: str | None = None  # resolved commit sha / registry version
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    content_hash: str = ""  # sha256 over the sorted (path, sha256) pairs
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolInfo:
    """Where the OOD pool came from, how big it is, and a hash of its pixels."""

    source: str
    n_found: int
    n_skipped: int
    n_inversion: int
    n_holdout: int
    image_size: int
    content_hash: str


@dataclass(frozen=True)
class ClassMetrics:
    """Raw outcome of inverting one candidate class (what a shard produces)."""

    index: int
    name: str
    asr: float  # ASR(c) on the hold-out T (Eq. 5)
    loss: float  # L_avg(c): mean margin loss over the inversion steps (baselines: their own loss)
    size: float | None = None  # baselines: trigger size (NC: mask l1 norm, PB: perturbed pixels)
    reference_asr: float | None = None  # differential scoring: the same inversion on the un-tuned backbone
    reference_loss: float | None = None
    epsilon: float | None = None  # the l-inf budget these numbers were measured at (None: the policy's epsilon)


@dataclass(frozen=True)
class ClassScore:
    """Per-class score and whether its trigger is valid (ASR >= min).

    ``z`` is the statistic the rule compares with the threshold: the standardised S of Eqs. 6-7
    (scorings paper/differential), the MAD anomaly index (baselines), or, for the lift scoring,
    ``lift_lower``: the lower confidence bound of the ASR lift over the public backbone.
    """

    index: int
    name: str
    asr: float
    loss: float
    z_asr: float
    z_loss: float
    score: float  # S(c) = z_ASR(c) - z_loss(c)
    z: float  # standardized S (baselines: the MAD anomaly index of the trigger size)
    valid: bool
    size: float | None = None
    reference_asr: float | None = None
    reference_loss: float | None = None
    lift: float | None = None  # lift scoring: ASR - reference ASR on the same hold-out images
    lift_lower: float | None = None  # its one-sided lower bound (Newcombe, Bonferroni over the candidates)
    flagged: bool = False  # this class cleared the threshold with a valid trigger
    epsilon: float | None = None  # the l-inf budget of this class's evidence (None: the policy's epsilon)


_SCORE_FLOATS = frozenset({"asr", "loss", "z_asr", "z_loss", "score", "z"})  # never None in a ClassScore


@dataclass(frozen=True)
class NullModel:
    """How far clean prompt tuning of this backbone may move a class (lift scoring's threshold).

    ``margin`` = max(``floor``, the largest lift seen on any class of ``copies`` clean prompt
    learners tuned on the user's backbone with the same class names, policy and pool).
    """

    margin: float
    floor: float
    source: str  # "floor" (policy lift_margin only) | "clean copies"
    copies: int
    copy_max_lifts: tuple[float, ...]  # per clean copy: its largest class lift
    alpha: float
    critical_z: float  # one-sided critical value of each class's bound (alpha / K, Bonferroni)
    n_tests: int
    n_holdout: int
    seconds: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class ControlOutcome:
    """What the positive control did: the planted target, how well the plant works, whether the scan
    of the planted copy caught it (failed and named the target)."""

    target: str
    epsilon: float
    planted_asr: float  # the planted trigger's ASR on the scan's hold-out OOD images
    caught: bool  # the scan of the planted copy failed and named the planted target
    verdict: str
    s_max: float
    suspect: str | None
    seconds: float
    reason: str
    suspects: tuple[str, ...] = ()  # every class the copy's scan flagged

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlOutcome:
        return cls(
            d["target"], float(d["epsilon"]), float(d["planted_asr"]), bool(d["caught"]), str(d["verdict"]),
            math.nan if d.get("s_max") is None else float(d["s_max"]), d.get("suspect_class"), float(d["seconds"]),
            str(d["reason"]), tuple(d.get("suspect_classes") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "epsilon": self.epsilon, "planted_asr": self.planted_asr, "caught": self.caught,
            "verdict": self.verdict, "s_max": self.s_max if math.isfinite(self.s_max) else None, "suspect_class": self.suspect, "seconds": self.seconds,
            "reason": self.reason, "suspect_classes": list(self.suspects),
        }


@dataclass(frozen=True)
class TriggerEffect:
    """What a flagged class's inverted trigger δ does as it is scaled: the ASR on the scan's hold-out
    images at each ``scale`` (the trigger s·δ, inside the budget for s <= 1) on the scanned model
    and, with the same trigger, on the public backbone; and the scanned model's prediction for the
    first few hold-out images with δ applied (the report's grid). ``model_asr`` at scale 1 is the
    class's reported ASR. ``chart`` and ``grid`` are the report's PNGs (relative paths, once drawn)."""

    class_name: str
    epsilon: float
    scales: tuple[float, ...]
    model_asr: tuple[float, ...]
    backbone_asr: tuple[float, ...]
    n_images: int
    predictions: tuple[str, ...]
    chart: str = ""
    grid: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerEffect:
        return cls(
            str(d["class_name"]), float(d["epsilon"]), tuple(float(v) for v in d["scales"]), tuple(float(v) for v in d["model_asr"]),
            tuple(float(v) for v in d["backbone_asr"]), int(d["n_images"]), tuple(str(v) for v in d["predictions"]),
            str(d.get("chart") or ""), str(d.get("grid") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scales": list(self.scales), "model_asr": list(self.model_asr),
                "backbone_asr": list(self.backbone_asr), "predictions": list(self.predictions)}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    s_max: float
    threshold: float
    threshold_kind: str  # "k", "tau" or "null margin"
    suspect_class: str | None
    reason: str
    suspect_classes: tuple[str, ...] = ()  # every flagged class, strongest first (several targets)
    accepted_classes: tuple[str, ...] = ()  # flagged classes the policy's accepted_findings let pass


@dataclass(frozen=True)
class ModelInfo:
    kind: str
    n_classes: int
    backbone: str
    image_size: int
    # the per-channel pixel mean and std the model normalised with: the backbone's open_clip
    # preprocess_cfg, OpenAI CLIP's where it states none (None in results written before they were recorded)
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("pixel_mean", "pixel_std"):  # JSON gives lists
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("pixel_mean", "pixel_std"):
            d[name] = list(d[name]) if d[name] is not None else None
        return d


@dataclass(frozen=True)
class ScanResult:
    """Everything a report needs; pure data."""

    decision: Decision
    classes: tuple[ClassScore, ...]
    policy: dict[str, Any]
    policy_hash: str
    provenance: Provenance
    pool: PoolInfo
    model: ModelInfo
    timings: dict[str, float]
    environment: dict[str, str]  # device, versions
    seed: int
    command: str
    triggers: dict[str, str] = field(default_factory=dict)  # class name -> PNG path (relative)
    shard: str | None = None  # "i/n" for a partial result
    positive_control: ControlOutcome | None = None  # when the policy ran one
    null_model: NullModel | None = None  # lift scoring: the threshold's derivation
    trigger_effects: tuple[TriggerEffect, ...] = ()  # per flagged class: its trigger's ASR against its scale
    screening: dict[str, Any] | None = None  # gatekeeper.screen.Screening.to_dict(), when the scan screened its classes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanResult:
        """The typed read side of :meth:`to_dict`, e.g. of a ``result.json`` (a number written as null,
        because it was not finite, reads back as NaN).

        Raises:
            KeyError, TypeError, ValueError: not a gatekeeper scan result.
        """

        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        def score(c: dict[str, Any]) -> ClassScore:
            fields: dict[str, Any] = {k: num(v) if k in _SCORE_FLOATS else v for k, v in c.items()}
            return ClassScore(**fields)

        classes = tuple(sorted((score(c) for c in d["classes"]), key=lambda c: c.index))  # candidate order
        null = d.get("null_model")
        return cls(
            decision=Decision(
                Verdict(d["verdict"]), num(d.get("s_max")), num(d.get("threshold")), str(d.get("threshold_kind", "")),
                d.get("suspect_class"), str(d.get("reason", "")), tuple(d.get("suspect_classes") or ()),
                tuple(d.get("accepted_classes") or ()),
            ),
            classes=classes,
            policy=dict(d["policy"]),
            policy_hash=str(d["policy_hash"]),
            provenance=Provenance(**d["provenance"]),
            pool=PoolInfo(**d["pool"]),
            model=ModelInfo(**d["model"]),
            timings=dict(d.get("timings") or {}),
            environment=dict(d.get("environment") or {}),
            seed=int(d["seed"]),
            command=str(d.get("command", "")),
            triggers=dict(d.get("triggers") or {}),
            shard=d.get("shard"),
            positive_control=ControlOutcome.from_dict(d["positive_control"]) if d.get("positive_control") else None,
            null_model=NullModel(**{**null, "copy_max_lifts": tuple(null["copy_max_lifts"])}) if null else None,
            trigger_effects=tuple(TriggerEffect.from_dict(e) for e in d.get("trigger_effects") or ()),
            screening=dict(d["screening"]) if d.get("screening") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON result: top-level verdict, s_max, threshold, suspect_class, classes, ..."""
        d = self.decision
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": d.verdict.value,
            "reason": d.reason,
            "s_max": d.s_max,
            "threshold": d.threshold,
            "threshold_kind": d.threshold_kind,
            "suspect_class": d.suspect_class,
            "suspect_classes": list(d.suspect_classes),
            "accepted_classes": list(d.accepted_classes),
            "classes": [asdict(c) for c in sorted(self.classes, key=lambda c: -c.z)],
            "model": self.model.to_dict(),
            "provenance": asdict(self.provenance),
            "pool": asdict(self.pool),
            "policy": self.policy,
            "policy_hash": self.policy_hash,
            "timings": self.timings,
            "environment": self.environment,
            "seed": self.seed,
            "command": self.command,
            "triggers": self.triggers,
            "shard": self.shard,
            "positive_control": self.positive_control.to_dict() if self.positive_control else None,
            "null_model": {**asdict(self.null_model), "copy_max_lifts": list(self.null_model.copy_max_lifts)} if self.null_model else None,
            "trigger_effects": [e.to_dict() for e in self.trigger_effects],
            "screening": self.screening,
        }

