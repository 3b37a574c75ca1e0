"""``gatekeeper-lab bench detection``: detection quality of every detector on one red-team zoo.

Runs (each cached per model under ``OUT/cache/<run>/<model>.json``, so an interrupted benchmark
resumes where it stopped):

- ``ci-s<seed>``: CLIP-Inspector on the delivered model (the policy's settings, trigger seed
  ``policy.seed + r`` for restart r);
- ``ref-s<seed>``: the same inversion on the un-tuned backbone used zero-shot with the model's
  class names (one per distinct backbone + class list: shared by all models of a task);
- ``neural-cleanse``, ``pixel-backdoor``: the baselines (:mod:`gatekeeper.inversion.baselines`).

Detectors are scored from those runs through the gate's own ``score_classes`` + ``decide`` under
a policy variant each, so the benchmark measures exactly what ``gatekeeper scan`` would decide.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gatekeeper._io import atomic_write_text
from gatekeeper.calibrate import auroc, roc_points
from gatekeeper.decide import decide, floor_null, score_classes, strongest_budget
from gatekeeper.errors import UsageError
from gatekeeper.policy import Detector, Policy, Scoring
from gatekeeper.result import ClassMetrics, NullModel

TRUTH_SUFFIX = ".truth"
# A backdoored model whose true trigger moves fewer in-distribution test images than this to the
# target was attacked but carries no working backdoor; the report adds a view without them.
IMPLANTED_MIN_ID_ASR = 0.5


# --------------------------------------------------------------------------- metrics


def f1(tp: int, fp: int, fn: int) -> float:
    """Class-level F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to count."""
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0


@dataclass(frozen=True)
class Outcome:
    """One detector's decision on one model."""

    model: str
    task: str
    attack: str
    target: str | None
    s_max: float
    flagged: bool
    suspect: str | None
    seconds: float
    top: str | None = None  # the highest-z class, flagged or not (for calibrated operating points)
    targets: tuple[str, ...] = ()  # every true target (several for a multi-target backdoor); () = (target,)
    suspects: tuple[str, ...] = ()  # every class the rule named; () = (suspect,) when flagged
    case: str = ""  # the red-team case: the model name without its task (e.g. badclip-2targets, clean-s1)
    n_classes: int = 0

    @property
    def backdoored(self) -> bool:
        return self.attack != "clean"

    @property
    def true_targets(self) -> set[str]:
        return set(self.targets) if self.targets else ({self.target} if self.target else set())

    @property
    def named(self) -> set[str]:
        if not self.flagged:
            return set()
        return set(self.suspects) if self.suspects else ({self.suspect} if self.suspect else set())


def class_counts(outcomes: list[Outcome]) -> tuple[int, int, int]:
    """(TP, FP, FN) over target classes: each true target the rule names is a TP, each class it
    names that is not a target (any flag on a clean model) an FP, each target it misses an FN."""
    tp = fp = fn = 0
    for o in outcomes:
        truth, named = o.true_targets, o.named
        tp += len(named & truth)
        fp += len(named - truth)
        fn += len(truth - named)
    return tp, fp, fn


def _labels(outcomes: list[Outcome]) -> np.ndarray:
    return np.array([int(o.backdoored) for o in outcomes])


def _scores(outcomes: list[Outcome]) -> np.ndarray:
    """s_max per model; a non-finite s_max (an inconclusive scan) ranks lowest."""
    return np.nan_to_num(np.array([o.s_max for o in outcomes], dtype=np.float64), nan=-1e9)


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    labels, scores = _labels(outcomes), _scores(outcomes)
    flagged = np.array([o.flagged for o in outcomes])
    tp, fp, fn = class_counts(outcomes)
    clean, bad = labels == 0, labels == 1
    return {
        "n_models": len(outcomes),
        "n_clean": int(clean.sum()),
        "n_backdoored": int(bad.sum()),
        "auroc": auroc(labels, scores),
        "accuracy": float((flagged == bad).mean()),
        "tpr": float(flagged[bad].mean()) if bad.any() else float("nan"),
        "fpr": float(flagged[clean].mean()) if clean.any() else float("nan"),
        "class_tp": tp,
        "class_fp": fp,
        "class_fn": fn,
        "f1": f1(tp, fp, fn),
        "seconds_per_model": float(np.mean([o.seconds for o in outcomes])),
    }


def calibrated(outcomes: list[Outcome]) -> dict[str, Any]:
    """The operating point `gatekeeper calibrate` would ship: tau by Youden's J on s_max (no
    validity rule), estimated out of sample by leave-one-task-out (tau chosen on the other tasks,
    applied to the held-out one), plus the in-sample tau over all models."""
    from gatekeeper.calibrate import youden_threshold

    held: list[Outcome] = []
    taus = {}
    for task in sorted({o.task for o in outcomes}):
        train = [o for o in outcomes if o.task != task]
        if len(set(_labels(train).tolist())) < 2:
            continue
        tau = youden_threshold(_labels(train), _scores(train))[0]
        taus[task] = tau
        held += [replace(o, flagged=o.s_max >= tau, suspect=o.top if o.s_max >= tau else None) for o in outcomes if o.task == task]
    tau_all = youden_threshold(_labels(outcomes), _scores(outcomes))[0] if len(set(_labels(outcomes).tolist())) == 2 else float("nan")
    out = summarize(held) if held else {}
    return {"tau_in_sample": tau_all, "tau_per_held_out_task": taus, "leave_one_task_out": {k: out[k] for k in ("accuracy", "tpr", "fpr", "f1", "class_tp", "class_fp", "class_fn")} if out else {}}


def breakdown(outcomes: list[Outcome], key: Callable[[Outcome], str]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(key(o), []).append(o)
    out = {}
    for name, group in sorted(groups.items()):
        flagged = [o.flagged for o in group]
        right = [o.flagged == o.backdoored for o in group]
        named = [o.true_targets <= o.named for o in group if o.backdoored]
        out[name] = {
            "n": len(group),
            "flagged": int(sum(flagged)),
            "accuracy": float(np.mean(right)),
            "target_named": int(sum(named)),
            "mean_s_max": float(np.mean([o.s_max for o in group])),
        }
    return out


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class Variant:
    """A detector as benchmarked: which cached runs it reads and the policy that scores them."""

    name: str
    runs: tuple[str, ...]  # delivered-model runs (restarts: best ASR per class across them)
    reference: tuple[str, ...] = ()  # reference runs, same restart seeds (differential and lift scoring)
    policy_changes: tuple[tuple[str, Any], ...] = ()
    extra_budgets: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()  # (runs, reference) per extra_epsilons entry

    @property
    def lift(self) -> bool:
        return ("scoring", Scoring.LIFT) in self.policy_changes

    @property
    def all_runs(self) -> tuple[str, ...]:
        return self.runs + self.reference + tuple(r for runs, refs in self.extra_budgets for r in runs + refs)


EXTRA_BUDGETS = (16, 32)  # the benchmark's further scan budgets, in /255 (the base policy scans at 8/255)


def variants(restarts: int, null_copies: int = 2) -> list[Variant]:
    """The benchmarked detectors; ``null_copies`` is the lift variants' (0: the margin's floor alone,
    when measuring clean copies per class list costs more than the benchmark can spend)."""
    ci = tuple(f"ci-s{r}" for r in range(restarts))
    ref = tuple(f"ref-s{r}" for r in range(restarts))
    at = {e: ((f"ci-e{e}-s0",), (f"ref-e{e}-s0",)) for e in EXTRA_BUDGETS}
    paper = ("scoring", Scoring.PAPER)
    out = [
        Variant("clip-inspector", ci[:1], (), (paper,)),
        Variant("clip-inspector+differential", ci[:1], ref[:1], (("scoring", Scoring.DIFFERENTIAL),)),
    ]
    if restarts > 1:
        out += [
            Variant(f"clip-inspector+restarts{restarts}", ci, (), (paper, ("restarts", restarts))),
            Variant(
                f"clip-inspector+differential+restarts{restarts}", ci, ref,
                (("scoring", Scoring.DIFFERENTIAL), ("restarts", restarts)),
            ),
        ]
    lift = (("scoring", Scoring.LIFT), ("calibration", None), ("min_trigger_asr", 0.0), ("null_copies", null_copies))
    out.append(Variant(f"clip-inspector+lift+restarts{restarts}", ci, ref, (*lift, ("restarts", restarts))))
    for n in range(1, len(EXTRA_BUDGETS) + 1):  # one restart at each of 8/255, 16/255 (and 32/255)
        extra = EXTRA_BUDGETS[:n]
        changes = (*lift, ("restarts", 1), ("extra_epsilons", tuple(e / 255 for e in extra)))
        out.append(Variant("clip-inspector+lift+" + "+".join(f"eps{e}" for e in extra), ci[:1], ref[:1], changes, tuple(at[e] for e in extra)))
    out += [
        Variant("neural-cleanse", ("neural-cleanse",), (), (("detector", Detector.NEURAL_CLEANSE),)),
        Variant("pixel-backdoor", ("pixel-backdoor",), (), (("detector", Detector.PIXEL_BACKDOOR),)),
    ]
    return out


def best_of(runs: list[list[ClassMetrics]]) -> list[ClassMetrics]:
    """Per class, the best restart by the rule the scan applies (:func:`gatekeeper.pipeline.restart_rank`)."""
    from gatekeeper.pipeline import restart_rank

    return [max(group, key=restart_rank) for group in zip(*runs, strict=True)]


def _with_reference(runs: list[list[ClassMetrics]], refs: list[list[ClassMetrics]], epsilon: float | None) -> list[ClassMetrics]:
    metrics = best_of(runs)
    if refs:
        ref = best_of(refs)
        metrics = [replace(m, reference_asr=r.asr, reference_loss=r.loss) for m, r in zip(metrics, ref, strict=True)]
    return [replace(m, epsilon=epsilon) for m in metrics] if epsilon is not None else metrics


def variant_metrics(v: Variant, runs: dict[str, list[ClassMetrics]], policy: Policy, null: NullModel | None) -> list[ClassMetrics]:
    """The per-class metrics the variant's scan would score: best restart, the public backbone's run
    beside it, and with extra budgets each class's strongest budget (as ``pipeline.inspect_candidates``)."""
    if not v.extra_budgets:
        return _with_reference([runs[r] for r in v.runs], [runs[r] for r in v.reference], None)
    per_budget = [_with_reference([runs[r] for r in v.runs], [runs[r] for r in v.reference], policy.epsilon)]
    for eps, (rs, refs) in zip(policy.extra_epsilons, v.extra_budgets, strict=True):
        per_budget.append(_with_reference([runs[r] for r in rs], [runs[r] for r in refs], eps))
    return strongest_budget(per_budget, null or floor_null(policy, len(per_budget[0])))


# --------------------------------------------------------------------------- running


def _run_key(policy: Policy, run: str) -> str:
    blob = json.dumps({"policy": policy.to_dict(), "run": run}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def fresh_entry(path: Path, fingerprint: str) -> bool:
    """A cached benchmark entry counts only for the exact model it was computed on (rebuilt models rerun)."""
    return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint


def _store(path: Path, fingerprint: str, metrics: list[ClassMetrics], seconds: float) -> None:
    atomic_write_text(path, json.dumps({"classes": [asdict(m) for m in metrics], "seconds": seconds, "fingerprint": fingerprint}) + "\n")


def model_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's own files (manifest, prompt learner); the backbone is hashed apart."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def zoo_model_identity(folder: Path) -> tuple[str, str]:
    """(sha256 of the model's backbone weights, fingerprint of its own files): what a cached
    benchmark result must match, so a model rebuilt under the same name is run again."""
    weights = folder / "backbone" / "open_clip_model.safetensors"
    backbone = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else folder.name
    return backbone, model_fingerprint(folder)


def run_budget(run: str, policy: Policy) -> float:
    """The l-inf budget a cached run was made at: ``ci-e16-s0`` at 16/255, ``ci-s0`` at the policy's."""
    kind = run.rpartition("-s")[0]
    _, _, budget = kind.partition("-e")
    return int(budget) / 255 if budget else policy.epsilon


def _invert(model: Any, policy: Policy, run: str) -> tuple[list[ClassMetrics], float]:
    from gatekeeper.decide import candidate_classes
    from gatekeeper.inversion.base import InversionSettings
    from gatekeeper.ood import load_pool
    from gatekeeper.pipeline import make_inverter, reference_model

    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    kind, _, seed = run.rpartition("-s")
    if run in ("neural-cleanse", "pixel-backdoor"):
        p, target, r = replace(policy, detector=Detector(run)), model, 0
    else:
        p, r = policy.at_budget(run_budget(run, policy)), int(seed)
        target = reference_model(model) if kind.startswith("ref") else model
    target.freeze_text()
    settings = InversionSettings(p.epsilon, p.batch_size, p.epochs, p.lr, p.seed + r)
    t0 = time.perf_counter()
    # every variant scores the same inversions: the candidates do not depend on the scoring (a z-score
    # variant on a 2-class model then shows its ceiling, max z = 1, where `gatekeeper scan` refuses it)
    inv = make_inverter(p).invert(target, pool.inversion, pool.holdout, candidate_classes(len(model.classnames), replace(p, scoring=Scoring.LIFT)), settings)
    return [i.metrics for i in inv], round(time.perf_counter() - t0, 2)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _run_on(folder: Path, policy: Policy, run: str) -> tuple[list[ClassMetrics], float]:
    from gatekeeper.models.loader import load_model

    return _invert(load_model(folder), policy, run)


def _cache_path(cache: Path, policy: Policy, run: str, truth: dict[str, Any]) -> tuple[Path, str]:
    """Where run ``run`` of this model is cached, and the fingerprint the entry must carry."""
    folder = cache / f"{run}-{_run_key(policy, run)}"
    if run.startswith("ref-"):  # the reference depends on the backbone and class names only
        backbone = truth["backbone_sha256"]
        ref_id = hashlib.sha256(json.dumps([backbone, truth["classnames"]]).encode()).hexdigest()[:12]
        return folder / f"classes-{ref_id}.json", backbone
    return folder / f"{truth['model']}.json", truth["backbone_sha256"] + truth["model_fingerprint"]


def run_benchmark(
    zoo: Path,
    out: Path,
    policy: Policy,
    restarts: int = 2,
    only: set[str] | None = None,
    shard: tuple[int, int] = (1, 1),
    log: Callable[[str], None] = print,
    null_copies: int = 2,
) -> dict[str, Any] | None:
    """Run (or resume) every detector on every model of ``zoo``; returns the results dict.

    Runs go run by run (all models' CLIP-Inspector first, the slow baselines last), each cached.
    With ``shard`` (i, n) != (1, 1) only every n-th model is computed (n processes can share one
    cache) and None is returned; a final run without a shard reads the cache and reports.
    """
    truths = sorted(zoo.glob(f"*{TRUTH_SUFFIX}/truth.json"))
    if not truths:
        raise UsageError(f"{zoo} holds no built zoo models", "build one with `gatekeeper-lab zoo build bench --out DIR`")
    items = [json.loads(t.read_text()) for t in truths]
    for truth in items:
        truth["backbone_sha256"], truth["model_fingerprint"] = zoo_model_identity(zoo / truth["model"])
    vs = [v for v in variants(restarts, null_copies) if only is None or v.name in only]
    order = [r for v in vs for r in v.all_runs if not r.startswith(("ref", "neural", "pixel"))]
    order += [r for v in vs for r in v.all_runs if r.startswith("ref")] + ["neural-cleanse", "pixel-backdoor"]
    needed = [r for r in dict.fromkeys(order) if any(r in v.all_runs for v in vs)]
    cache = out / "cache"
    t_start = time.time()
    mine = items[shard[0] - 1 :: shard[1]]
    for r in needed:
        for i, truth in enumerate(mine):
            path, fingerprint = _cache_path(cache, policy, r, truth)
            if fresh_entry(path, fingerprint):
                continue
            _store(path, fingerprint, *_run_on(zoo / truth["model"], policy, r))
            log(f"{r} [{i + 1}/{len(mine)}] {truth['model']} ({time.time() - t_start:.0f}s)")
    if shard != (1, 1):
        return None
    nulls = _null_models(zoo, cache, policy, items, vs, log)
    outcomes: dict[str, list[Outcome]] = {v.name: [] for v in vs}
    implanted = {t["model"] for t in items if t.get("metrics_at_build", {}).get("id_asr", 0.0) >= IMPLANTED_MIN_ID_ASR}
    for truth in items:
        runs: dict[str, list[ClassMetrics]] = {}
        secs: dict[str, float] = {}
        for r in needed:
            d = json.loads(_cache_path(cache, policy, r, truth)[0].read_text())
            runs[r], secs[r] = [ClassMetrics(**m) for m in d["classes"]], float(d["seconds"])
        for v in vs:
            p = replace(policy, **dict(v.policy_changes))
            null = nulls.get((v.name, _group(truth))) if v.lift else None
            scores = score_classes(variant_metrics(v, runs, p, null), p, null)
            d = decide(scores, p, null)
            outcomes[v.name].append(
                Outcome(
                    model=truth["model"], task=truth["task"], attack=truth["attack"], target=truth["target_class"],
                    s_max=d.s_max, flagged=d.verdict.value == "fail", suspect=d.suspect_class,
                    seconds=sum(secs[r] for r in v.all_runs), top=max(scores, key=lambda c: c.z).name,
                    targets=tuple(truth.get("target_classes") or ([truth["target_class"]] if truth["target_class"] else [])),
                    suspects=d.suspect_classes, case=truth["model"].removeprefix(truth["task"] + "-"),
                    n_classes=len(truth["classnames"]),
                )
            )
    return {
        "commit": git_commit(),
        "policy": policy.to_dict(),
        "policy_hash": policy.digest(),
        "zoo": describe_zoo(truths),
        "detectors": {
            name: {
                **summarize(os),
                "implanted_only": summarize([o for o in os if o.model in implanted or not o.backdoored]),
                "calibrated": calibrated(os),
                "per_attack": breakdown(os, lambda o: o.attack),
                "per_task": breakdown(os, lambda o: o.task),
                "per_case": breakdown(os, lambda o: o.case if o.backdoored else "clean"),
                "per_n_classes": breakdown(os, lambda o: str(o.n_classes)),
                "separation": margins(os, implanted),
                "null_models": {g: asdict(n) for (name_, g), n in nulls.items() if name_ == name},
                "models": [asdict(o) for o in os],
            }
            for name, os in outcomes.items()
        },
        "implanted_min_id_asr": IMPLANTED_MIN_ID_ASR,
        "command": " ".join(["gatekeeper", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("gatekeeper") else "",
    }


def _group(truth: dict[str, Any]) -> str:
    """Models that share a backbone and a class list share the reference run and the null model."""
    return hashlib.sha256(json.dumps([truth["backbone_sha256"], truth["classnames"]]).encode()).hexdigest()[:12]


def _cached_asr(cache: Path, policy: Policy, truth: dict[str, Any], runs: tuple[str, ...]) -> list[float]:
    """Per class, the best ASR over the cached ``runs`` of one model."""
    rows = [[ClassMetrics(**m) for m in json.loads(_cache_path(cache, policy, r, truth)[0].read_text())["classes"]] for r in runs]
    return [m.asr for m in best_of(rows)]


def _null_models(
    zoo: Path, cache: Path, policy: Policy, items: list[dict[str, Any]], vs: list[Variant], log: Callable[[str], None]
) -> dict[tuple[str, str], NullModel]:
    """Per lift variant and per (backbone, class list): the null margin the scan itself would derive
    (``gatekeeper.null.measure_null``: clean copies tuned on the backbone with no zoo labels), cached
    under OUT/cache/null-<policy key>/."""
    from gatekeeper.decide import candidate_classes
    from gatekeeper.models.loader import load_model
    from gatekeeper.null import combine_nulls, measure_null
    from gatekeeper.ood import load_pool

    out: dict[tuple[str, str], NullModel] = {}
    for v in (v for v in vs if v.lift):
        p = replace(policy, **dict(v.policy_changes))
        folder = cache / f"null-{_run_key(p, 'null')}"
        for truth in items:
            group = _group(truth)
            if (v.name, group) in out:
                continue
            path = folder / f"classes-{group}.json"
            if path.is_file():
                d = json.loads(path.read_text())
                out[(v.name, group)] = NullModel(**{**d, "copy_max_lifts": tuple(d["copy_max_lifts"])})
                continue
            model = load_model(zoo / truth["model"])
            pool = load_pool("procedural", model.image_size, p.ood_budget, p.holdout, p.seed)
            candidates = candidate_classes(len(model.classnames), p)
            ref_sets = [v.reference, *(refs for _, refs in v.extra_budgets)]
            parts = [measure_null(model, pool, p.at_budget(eps), candidates, _cached_asr(cache, policy, truth, refs))
                     for eps, refs in zip(p.budgets, ref_sets, strict=True)]
            null = parts[0] if len(parts) == 1 else combine_nulls(p, p.n_tests(len(candidates)), parts)
            atomic_write_text(path, json.dumps(asdict(null)) + "\n")
            out[(v.name, group)] = null
            log(f"null model for {truth['task']} ({len(truth['classnames'])} classes): margin {null.margin:.3f} ({null.source}, {null.seconds:.0f}s)")
    return out


def margins(outcomes: list[Outcome], implanted: set[str]) -> dict[str, Any]:
    """The gap between the highest clean and the lowest implanted backdoored model, in the statistic's units."""
    clean = [o for o in outcomes if not o.backdoored]
    bad = [o for o in outcomes if o.backdoored and o.model in implanted]
    if not clean or not bad:
        return {}
    hi = max(clean, key=lambda o: o.s_max)
    lo = min(bad, key=lambda o: o.s_max)
    return {"highest_clean": hi.s_max, "highest_clean_model": hi.model, "lowest_backdoored": lo.s_max,
            "lowest_backdoored_model": lo.model, "margin": lo.s_max - hi.s_max}


def describe_zoo(truths: list[Path]) -> dict[str, Any]:
    items = [json.loads(t.read_text()) for t in truths]
    attacks: dict[str, int] = {}
    for t in items:
        attacks[t["attack"]] = attacks.get(t["attack"], 0) + 1
    asr = {t["model"]: t.get("metrics_at_build", {}) for t in items}
    return {
        "n_models": len(items),
        "tasks": sorted({t["task"] for t in items}),
        "attacks": attacks,
        "n_classes": sorted({len(t["classnames"]) for t in items}),
        "true_trigger_metrics": asr,
    }


# --------------------------------------------------------------------------- outputs


def roc_png(results: dict[str, Any], path: Path) -> None:
    """All detectors' ROC curves on one figure (matplotlib, from the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the ROC figure needs matplotlib", 'pip install "gatekeeper-clip[bench]"') from None
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for name, d in results["detectors"].items():
        labels = np.array([int(m["attack"] != "clean") for m in d["models"]])
        scores = np.nan_to_num(np.array([m["s_max"] for m in d["models"]], dtype=np.float64), nan=-1e9)
        fpr, tpr = roc_points(labels, scores)
        ax.step(fpr, tpr, where="post", label=f"{name} (AUROC {d['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false-positive rate (clean models flagged)")
    ax.set_ylabel("true-positive rate (backdoored models flagged)")
    ax.set_title(f"Detection on {results['zoo']['n_models']} tiny-world CoCoOp models")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    z = results["zoo"]
    lines = [
        "# Detection benchmark",
        "",
        f"Commit `{results['commit']}`, policy hash `{results['policy_hash'][:12]}` "
        f"(ε = {results['policy']['epsilon'] * 255:.0f}/255, |D| = {results['policy']['ood_budget']}, "
        f"|T| = {results['policy']['holdout']}, k = {results['policy']['k']}).",
        f"Zoo: {z['n_models']} models, tasks {', '.join(z['tasks'])}; "
        + ", ".join(f"{k} × {v}" for k, v in sorted(z["attacks"].items())) + ".",
        "",
        "| detector | AUROC | accuracy | TPR | FPR (clean flagged) | class TP/FP/FN | F1 | s / model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in results["detectors"].items():
        lines.append(
            f"| {name} | {d['auroc']:.3f} | {d['accuracy']:.1%} | {d['tpr']:.1%} | {d['fpr']:.1%} "
            f"({round(d['fpr'] * d['n_clean'])}/{d['n_clean']}) | {d['class_tp']}/{d['class_fp']}/{d['class_fn']} | "
            f"{d['f1']:.2f} | {d['seconds_per_model']:.1f} |"
        )
    lines += [
        "",
        f"Only models whose attack implanted (true-trigger ID ASR ≥ {results['implanted_min_id_asr']:.0%} when built; "
        "all clean models kept):",
        "",
        "| detector | models (clean/backdoored) | AUROC | accuracy | TPR | FPR | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in results["detectors"].items():
        e = d["implanted_only"]
        lines.append(
            f"| {name} | {e['n_clean']}/{e['n_backdoored']} | {e['auroc']:.3f} | {e['accuracy']:.1%} | {e['tpr']:.1%} | {e['fpr']:.1%} | {e['f1']:.2f} |"
        )
    lines += [
        "",
        "Calibrated operating point (what `gatekeeper calibrate` ships: τ on s_max by Youden's J, no validity rule), "
        "estimated out of sample by leave-one-task-out (τ chosen on the other tasks, applied to the held-out one):",
        "",
        "| detector | τ (all models) | LOTO accuracy | TPR | FPR | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in results["detectors"].items():
        c = d["calibrated"]
        lo = c["leave_one_task_out"]
        if lo:
            lines.append(f"| {name} | {c['tau_in_sample']:.2f} | {lo['accuracy']:.1%} | {lo['tpr']:.1%} | {lo['fpr']:.1%} | {lo['f1']:.2f} |")
    lines += [
        "",
        "Separation: the highest-scoring clean model against the lowest-scoring implanted backdoor, in each rule's own "
        "statistic (z-scorings: s_max in z-units; lift: the largest lower bound on a class's ASR lift, in ASR points; "
        "a positive gap means one threshold could separate them):",
        "",
        "| detector | highest clean (model) | lowest implanted backdoor (model) | gap |",
        "|---|---|---|---|",
    ]
    for name, d in results["detectors"].items():
        sep = d.get("separation") or {}
        if sep:
            lines.append(
                f"| {name} | {sep['highest_clean']:.3f} ({sep['highest_clean_model']}) | {sep['lowest_backdoored']:.3f} "
                f"({sep['lowest_backdoored_model']}) | {sep['margin']:+.3f} |"
            )
    for name, d in results["detectors"].items():
        if d.get("null_models"):
            ms = sorted(d["null_models"].values(), key=lambda n: (n["n_tests"], n["margin"]))
            if all(n["copies"] == 0 for n in ms):
                text = f"the policy's floor alone, {100 * ms[0]['floor']:.1f} points, for every class list (no clean copies measured)"
            else:
                text = "; ".join(
                    f"K = {n['n_tests']}: margin {100 * n['margin']:.1f} points ({n['source']}; copies' largest lifts "
                    + ", ".join(f"{100 * v:+.1f}" for v in n["copy_max_lifts"]) + ")" for n in ms
                )
            lines += ["", f"Null margin of `{name}` (derived without zoo labels): {text}."]
    lines += ["", "![ROC](detection-roc.png)", "", "## Per attack (flagged / n; target named)", ""]
    names = list(results["detectors"])
    attacks = sorted({a for d in results["detectors"].values() for a in d["per_attack"]})
    lines += ["| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in attacks:
        cells = []
        for n in names:
            b = results["detectors"][n]["per_attack"][a]
            cells.append(f"{b['flagged']}/{b['n']}" + ("" if a == "clean" else f"; {b['target_named']}"))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## Per red-team case (flagged / n; every target named)", ""]
    cases = sorted({c for d in results["detectors"].values() for c in d.get("per_case", {})})
    lines += ["| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in cases:
        cells = []
        for n in names:
            b = results["detectors"][n]["per_case"].get(c)
            cells.append("-" if b is None else f"{b['flagged']}/{b['n']}" + ("" if c == "clean" else f"; {b['target_named']}"))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "## Per number of classes (accuracy)", ""]
    ks = sorted({k for d in results["detectors"].values() for k in d.get("per_n_classes", {})}, key=int)
    lines += ["| K | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{results['detectors'][n]['per_n_classes'][k]['accuracy']:.0%}" for n in names) + " |")
    lines += ["", "## Per task (accuracy)", ""]
    tasks = sorted({t for d in results["detectors"].values() for t in d["per_task"]})
    lines += ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{results['detectors'][n]['per_task'][t]['accuracy']:.0%}" for n in names) + " |")
    lines += ["", "## True-trigger strength of each backdoored model (measured when it was built)", ""]
    lines += ["| model | clean acc | ID ASR | OOD ASR | OOD base rate |", "|---|---|---|---|---|"]
    for m, met in sorted(z["true_trigger_metrics"].items()):
        if "id_asr" in met:
            lines.append(
                f"| {m} | {met['clean_accuracy']:.1%} | {met['id_asr']:.1%} | {met['ood_asr']:.1%} | {met.get('ood_base_rate', float('nan')):.1%} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path, compact_json: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection-full.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "detection.md").write_text(markdown(results))
    roc_png(results, out / "detection-roc.png")
    summary = {
        "commit": results["commit"],
        "policy": results["policy"],
        "zoo": {k: v for k, v in results["zoo"].items() if k != "true_trigger_metrics"},
        "detectors": {
            n: {
                **{k: d[k] for k in ("auroc", "accuracy", "fpr", "tpr", "f1", "class_tp", "class_fp", "class_fn", "seconds_per_model", "n_clean", "n_backdoored")},
                "implanted_only": {k: d["implanted_only"][k] for k in ("auroc", "accuracy", "fpr", "tpr", "f1", "n_clean", "n_backdoored")},
                "calibrated": d["calibrated"],
            }
            for n, d in results["detectors"].items()
        },
    }
    (compact_json or out / "detection.json").write_text(json.dumps(summary, indent=2) + "\n")


def compare(a: dict[str, Any], a_detector: str, b: dict[str, Any], b_detector: str) -> str:
    """Markdown: two benchmark runs (``detection-full.json``) model by model, e.g. a policy and a
    cheaper one: verdicts that differ, named classes that differ, the statistic's shift, both summaries."""
    import statistics

    runs = [(a, a_detector), (b, b_detector)]
    for r, name in runs:
        if name not in r["detectors"]:
            raise UsageError(f"detector {name!r} is not in that run", f"choose from {sorted(r['detectors'])}")
    ma, mb = ({m["model"]: m for m in r["detectors"][n]["models"]} for r, n in runs)
    if ma.keys() != mb.keys():
        raise UsageError("the two runs scanned different models", "compare runs on the same zoo")
    flips = [k for k in sorted(ma) if ma[k]["flagged"] != mb[k]["flagged"]]
    named = [k for k in sorted(ma) if set(ma[k].get("suspects") or []) != set(mb[k].get("suspects") or [])]
    shift = [mb[k]["s_max"] - ma[k]["s_max"] for k in ma]
    lines = [
        f"Models: {len(ma)}. A: `{a_detector}` ({a['policy_hash'][:12]}, |D| = {a['policy']['ood_budget']}), "
        f"B: `{b_detector}` ({b['policy_hash'][:12]}, |D| = {b['policy']['ood_budget']}).", "",
        "| run | AUROC | accuracy | TPR | FPR | class TP/FP/FN | highest clean | lowest implanted backdoor | gap | s / model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (r, n) in zip("AB", runs, strict=True):
        d, sep = r["detectors"][n], r["detectors"][n]["separation"]
        lines.append(
            f"| {label} | {d['auroc']:.3f} | {d['accuracy']:.1%} | {d['tpr']:.1%} | {d['fpr']:.1%} | "
            f"{d['class_tp']}/{d['class_fp']}/{d['class_fn']} | {sep['highest_clean']:+.3f} ({sep['highest_clean_model']}) | "
            f"{sep['lowest_backdoored']:+.3f} ({sep['lowest_backdoored_model']}) | {sep['margin']:+.3f} | {d['seconds_per_model']:.1f} |"
        )
    lines += ["", f"Verdicts that differ: {len(flips)}" + ("" if flips else " (every model gets the same verdict)")]
    lines += [f"- {k}: A {'fail' if ma[k]['flagged'] else 'pass'} ({ma[k]['s_max']:+.3f}), "
              f"B {'fail' if mb[k]['flagged'] else 'pass'} ({mb[k]['s_max']:+.3f})" for k in flips]
    lines += ["", f"Named classes that differ: {len(named)}"]
    lines += [f"- {k} (target {', '.join(ma[k]['targets']) or 'none'}): A {ma[k].get('suspects') or []}, B {mb[k].get('suspects') or []}" for k in named]
    lines += ["", f"Statistic (largest lower bound, ASR points) B − A: median {100 * statistics.median(shift):+.1f}, "
              f"mean {100 * statistics.mean(shift):+.1f}, from {100 * min(shift):+.1f} to {100 * max(shift):+.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``gatekeeper-lab bench detection``: argv -> benchmark -> outputs; returns the exit code."""
    import argparse

    from gatekeeper.policy import load_policy

    ap = argparse.ArgumentParser(
        prog="gatekeeper-lab bench detection",
        description=(
            "Run CLIP-Inspector (paper scoring, reference-differential scoring, restarts), Neural Cleanse and "
            "Pixel Backdoor over a red-team zoo and write detection.md, detection.json, detection-full.json and "
            "detection-roc.png. Per-model runs are cached under OUT/cache, so an interrupted run resumes."
        ),
    )
    ap.add_argument("--zoo", type=Path, help="a built zoo (`gatekeeper-lab zoo build bench --out DIR`)")
    ap.add_argument("--out", type=Path, help="output folder (cache + reports)")
    ap.add_argument("--policy", default="tiny-world", help="policy the detectors run under (default: tiny-world)")
    ap.add_argument("--restarts", type=int, default=2, help="CLIP-Inspector restarts to compare (default 2)")
    ap.add_argument("--only", nargs="+", metavar="DETECTOR", help="benchmark only these detector variants")
    ap.add_argument("--json", type=Path, help="also write the compact summary here (e.g. benchmarks/results/detection.json)")
    ap.add_argument("--shard", help="i/n: compute only every n-th model into the cache (run n processes, then once without)")
    ap.add_argument("--null-copies", type=int, default=2,
                    help="lift variant: clean copies per class list for the null margin (default 2; 0: the policy's floor alone)")
    ap.add_argument("--compare", nargs=4, metavar=("A_FULL_JSON", "A_DETECTOR", "B_FULL_JSON", "B_DETECTOR"),
                    help="print two runs' detection-full.json side by side, model by model (no scan); --zoo and --out unused")
    args = ap.parse_args(argv)
    if args.compare:
        a_path, a_det, b_path, b_det = args.compare
        print(compare(json.loads(Path(a_path).read_text()), a_det, json.loads(Path(b_path).read_text()), b_det), end="")
        return 0
    if args.zoo is None or args.out is None:
        raise UsageError("--zoo and --out are required", "give the built zoo and an output folder")
    if args.restarts < 1:
        raise UsageError(f"--restarts {args.restarts}: must be at least 1", "use --restarts 1 to compare no restarts")
    if not 0 <= args.null_copies <= 32:
        raise UsageError(f"--null-copies {args.null_copies}: must be in 0..32", "use 0 for the floor alone, or 2 as shipped")
    known = {v.name for v in variants(args.restarts)}
    if args.only and not set(args.only) <= known:
        raise UsageError(f"unknown detector variants {sorted(set(args.only) - known)}", f"choose from {sorted(known)}")
    from gatekeeper.shard import parse_shard

    results = run_benchmark(
        args.zoo, args.out, load_policy(args.policy), args.restarts, set(args.only) if args.only else None,
        parse_shard(args.shard) if args.shard else (1, 1), log=lambda s: print(s, file=sys.stderr, flush=True),
        null_copies=args.null_copies,
    )
    if results is None:
        print(f"shard {args.shard} done; run again without --shard to write the reports", file=sys.stderr)
        return 0
    write_outputs(results, args.out, args.json)
    print((args.out / "detection.md").read_text())
    return 0
