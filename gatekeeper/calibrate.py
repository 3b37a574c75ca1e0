"""Calibration: a threshold tau on s_max from scans of known clean and backdoored models.

tau is chosen by Youden's J (max TPR - FPR) on the ROC curve of s_max (paper, Sec. 3.3), and is
valid only for the same |C|, OOD budget and epsilon; the policy records them and the gate
refuses tau under any other setting (``Policy.threshold``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gatekeeper.errors import ResultError, UsageError
from gatekeeper.policy import Calibration


@dataclass(frozen=True)
class CalibrationReport:
    """How a tau was chosen: the policy's :class:`~gatekeeper.policy.Calibration` (tau and the
    |C|, budget and epsilon it is valid for) plus the statistics behind it."""

    calibration: Calibration
    youden_j: float
    tpr: float
    fpr: float
    auroc: float
    n_clean: int
    n_backdoored: int


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[list[float], list[float]]:
    """(FPR, TPR) at every distinct threshold, flagging score >= t, from (0, 0) to (1, 1)."""
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        fpr.append(float(flagged[labels == 0].mean()))
        tpr.append(float(flagged[labels == 1].mean()))
    fpr.append(1.0)
    tpr.append(1.0)
    return fpr, tpr


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float, float]:
    """(tau, J, TPR, FPR) maximizing J = TPR - FPR, flagging ``score >= tau``.

    Candidate thresholds are the observed scores (an infinite threshold flags nothing and is
    never chosen); ties in J go to the larger tau (fewer false positives).
    """
    best: tuple[float, float, float, float] | None = None
    pos, neg = labels == 1, labels == 0
    for tau in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= tau
        tpr = float(flagged[pos].mean())
        fpr = float(flagged[neg].mean())
        if best is None or tpr - fpr > best[1]:
            best = (float(tau), tpr - fpr, tpr, fpr)
    assert best is not None
    return best


def _load(path: Path) -> dict[str, Any]:
    from gatekeeper.report.jsonout import read_result

    d = read_result(path)
    if "s_max" not in d:
        raise ResultError(f"{path} is not a gatekeeper scan result", "give result.json files written by `gatekeeper scan`")
    if d.get("verdict") in ("error", "inconclusive") or d.get("s_max") is None:
        raise ResultError(f"{path} has no usable s_max (verdict {d.get('verdict')})", "calibrate on completed scans only")
    return d


def calibrate(clean: list[Path], backdoored: list[Path]) -> CalibrationReport:
    """Youden's J threshold from labelled scan results.

    Raises:
        UsageError: fewer than 2 results on either side.
        ResultError: unreadable results, or results made with different |C|, budget or epsilon.
    """
    if len(clean) < 2 or len(backdoored) < 2:
        raise UsageError("calibration needs at least 2 clean and 2 backdoored scan results", "pass more --clean/--backdoored")
    results = [(_load(p), 0) for p in clean] + [(_load(p), 1) for p in backdoored]
    settings = {(len(d["classes"]), d["policy"]["ood_budget"], round(d["policy"]["epsilon"], 9)) for d, _ in results}
    if len(settings) != 1:
        raise ResultError(
            f"the results were made under different settings (|C|, ood_budget, epsilon): {sorted(settings)}",
            "tau is only valid for one setting: calibrate on scans made with the same policy and class count",
        )
    (n_c, budget, eps), = settings
    pools = {(p.get("source"), p.get("content_hash")) for d, _ in results if isinstance(p := d.get("pool"), dict)}
    if len({h for _, h in pools}) > 1:
        raise ResultError(
            f"the results were scanned on different OOD pools: {sorted(str(s) for s, _ in pools)[:4]}",
            "tau belongs to one pool: calibrate on scans made with the same --ood",
        )
    pool, pool_hash = next(iter(pools)) if len(pools) == 1 else (None, None)
    labels = np.array([y for _, y in results])
    scores = np.array([float(d["s_max"]) for d, _ in results])
    tau, j, tpr, fpr = youden_threshold(labels, scores)
    cal = Calibration(tau, n_c, budget, eps, pool=pool, pool_hash=pool_hash)
    return CalibrationReport(cal, j, tpr, fpr, auroc(labels, scores), len(clean), len(backdoored))


def calibrated_policy_yaml(base: dict[str, Any], cal: CalibrationReport) -> str:
    """The base policy (as a mapping) with ``calibration`` set, as YAML with a provenance comment."""
    import yaml

    policy = {k: v for k, v in base.items() if k != "calibration"}
    policy["calibration"] = {k: v for k, v in asdict(cal.calibration).items() if v is not None}
    pool = cal.calibration.pool
    header = (
        f"# written by `gatekeeper calibrate`: tau by Youden's J on {cal.n_clean} clean and {cal.n_backdoored} "
        f"backdoored scans{f' on the OOD pool {pool}' if pool else ''}\n# AUROC {cal.auroc:.3f}; at tau: TPR {cal.tpr:.2f}, FPR {cal.fpr:.2f}, J {cal.youden_j:.2f}\n"
        "# valid only for the |C|, ood_budget and epsilon recorded under calibration\nversion: 1\n"
    )
    return header + yaml.safe_dump(policy, sort_keys=False)


def calibrate_on_backbone(model: Any, pool: Any, policy: Any, copies: int, epochs: int, log: Any = print) -> tuple[CalibrationReport, list[dict[str, Any]]]:
    """tau from the user's own backbone, no zoo: ``copies`` clean and ``copies`` BadCLIP-planted
    prompt learners of the model's shape, trained from scratch on OOD images labelled by the
    un-tuned backbone used zero-shot, each scanned under ``policy``; Youden's J on their s_max.

    Raises:
        UsageError: fewer than 2 copies, or a zero-shot model (no prompt learner shape to copy).
    """
    from dataclasses import replace

    from gatekeeper.control import choose_target, train_copy
    from gatekeeper.pipeline import detect, reference_model
    from gatekeeper.policy import PositiveControl
    from gatekeeper.result import Provenance

    if copies < 2:
        raise UsageError(f"--copies {copies}: need at least 2 clean and 2 planted copies", "use --copies 2 or more")
    if model.ctx is None:
        raise UsageError("a zero-shot model has no prompt learner to build copies of", "calibrate with a CoOp or CoCoOp model folder")
    plain = replace(policy, positive_control=PositiveControl.OFF, calibration=None)
    labeller = reference_model(model)
    rows, labels, scores = [], [], []
    for i in range(copies):
        for planted in (False, True):
            target = choose_target(len(model.classnames), None, policy.seed + 1000 + i) if planted else None
            copy, _ = train_copy(model, labeller, target, policy.epsilon, seed=policy.seed + 100 + i, epochs=epochs, fresh=True)
            res = detect(copy, pool, plain, Provenance(reference=f"copy-{i}", source="calibration", path=""))
            rows.append({"copy": i, "planted": planted, "target": model.classnames[target] if target is not None else None,
                         "s_max": res.decision.s_max, "verdict": res.decision.verdict.value, "suspect": res.decision.suspect_class})
            labels.append(int(planted))
            scores.append(res.decision.s_max)
            log(f"copy {i + 1}/{copies} {'planted' if planted else 'clean'}: s_max {res.decision.s_max:.2f} ({res.decision.verdict.value})")
    lab, sc = np.array(labels), np.nan_to_num(np.array(scores, dtype=np.float64), nan=-1e9)
    tau, j, tpr, fpr = youden_threshold(lab, sc)
    from gatekeeper.decide import candidate_classes

    n_c = len(candidate_classes(len(model.classnames), plain))
    info = getattr(pool, "info", None)
    cal = Calibration(
        tau, n_c, policy.ood_budget, policy.epsilon,
        pool=getattr(info, "source", None), pool_hash=getattr(info, "content_hash", None),
    )
    return CalibrationReport(cal, j, tpr, fpr, auroc(lab, sc), copies, copies), rows


def _calibratable(scoring: str, where: str) -> None:
    """τ is a threshold on the z-score s_max; the lift rule's threshold is its null margin."""
    if scoring not in ("paper", "differential"):
        raise UsageError(
            f"{where}: scoring '{scoring}' is not calibrated with a tau (its threshold is the null margin: lift_margin, null_copies)",
            "calibrate a policy with scoring: differential or paper, or tune lift_margin/null_copies instead",
        )


def run_calibrate(
    out: Path,
    *,
    clean: list[Path] | None = None,
    backdoored: list[Path] | None = None,
    backbone: Path | None = None,
    policy: str = "default",
    copies: int = 4,
    epochs: int = 12,
    device: str = "auto",
    log: Any = print,
    ood: str | None = None,
) -> CalibrationReport:
    """Choose tau from scans of known models (``clean``/``backdoored`` result.json files), or from
    clean and planted copies built on ``backbone``'s own prompt learner and scanned on the OOD pool
    ``ood`` (a scan's ``--ood`` spec; default ``procedural``), and write the calibrated policy to
    ``out`` (which must not exist), atomically. The calibration records the pool it was made on.

    Raises:
        UsageError: ``out`` exists, a bad combination of arguments, a bad ``ood`` spec, or a lift
            policy (no tau).
        PoolError: the pool is too small for the policy.
    """
    import json

    from gatekeeper._io import atomic_write_text
    from gatekeeper.policy import load_policy, policy_from_mapping
    from gatekeeper.untrusted import load_yaml

    if out.exists():
        raise UsageError(f"--out {out} exists", "choose a new file; calibrate never overwrites a policy")
    if backbone is not None:
        if clean or backdoored:
            raise UsageError(
                "--backbone builds its own clean and planted copies", "give either --backbone or --clean/--backdoored"
            )
        if epochs < 1:
            raise UsageError(f"--epochs {epochs}: must be at least 1", "e.g. --epochs 12")
        from gatekeeper.models.loader import load_model
        from gatekeeper.ood import check_spec, load_pool
        from gatekeeper.scan import resolve_device

        spec = ood or "procedural"
        check_spec(spec)  # a bad --ood is a usage error, before any model is loaded
        chosen = load_policy(policy)
        _calibratable(chosen.scoring.value, policy)
        model = load_model(backbone, resolve_device(device))
        pool = load_pool(spec, model.image_size, chosen.ood_budget, chosen.holdout, chosen.seed, model.resize)
        cal, _rows = calibrate_on_backbone(model, pool, chosen, copies, epochs, log=log)
        base = chosen.to_dict()
    else:
        if ood is not None:
            raise UsageError(
                "--ood applies with --backbone only", "scan results already record the pool they were scanned on"
            )
        if not clean or not backdoored:
            raise UsageError(
                "calibrate needs --clean and --backdoored scan results, or --backbone MODEL",
                "see `gatekeeper calibrate --help`",
            )
        base = json.loads(clean[0].read_text()).get("policy") or {}
        _calibratable(str(base.get("scoring", "paper")), str(clean[0]))
        cal = calibrate(clean, backdoored)
    text = calibrated_policy_yaml(base, cal)
    policy_from_mapping(load_yaml(text, str(out)), str(out))  # what we write must load
    atomic_write_text(out, text)
    return cal
