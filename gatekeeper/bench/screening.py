"""``gatekeeper-lab bench screening``: does the screening stage keep every true target?

For every backdoored model of a red-team zoo, the scan's screening (``gatekeeper.screen``) ranks
all of the model's classes, exactly as a scan of a model with more classes than ``screen_keep``
would; the benchmark records where each true target ranks. A screening that keeps ``m`` classes
keeps a target iff its rank is at most ``m``; recall at ``m`` is the fraction of all true targets
(every target of a multi-target model counts) ranked within the top ``m``.

Outputs: ``OUT/screening.md`` and ``OUT/screening.json`` (per model: classes, targets, ranks,
screening seconds). Per-model results are cached under ``OUT/cache`` so an interrupted run resumes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gatekeeper._io import atomic_write_text
from gatekeeper.bench.detection import TRUTH_SUFFIX, fresh_entry, git_commit, model_fingerprint
from gatekeeper.errors import UsageError
from gatekeeper.policy import Policy

KEEPS = (1, 2, 3)


def target_ranks(folder: Path, truth: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """Screen every class of one zoo model; the 1-based rank of each true target (best over budgets)."""
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.screen import rank_key, screen

    model = load_model(folder)
    k = len(model.classnames)
    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    t0 = time.perf_counter()
    s = screen(model, pool, replace(policy, screen_keep=k), list(range(k)))
    seconds = time.perf_counter() - t0
    targets = truth.get("target_classes") or [truth["target_class"]]
    ranks, above = {}, {}
    for name in targets:
        per_budget, others = [], []
        for eps in policy.budgets:
            order = [c.name for c in sorted((c for c in s.classes if c.epsilon == eps), key=rank_key)]
            per_budget.append(1 + order.index(name))
            others.append(sum(1 for n in order[: order.index(name)] if n not in targets))
        ranks[name] = min(per_budget)  # the screening keeps the union of each budget's top classes
        above[name] = min(others)
    return {"model": truth["model"], "task": truth["task"], "attack": truth["attack"], "classes": k,
            "ranks": ranks, "non_targets_above": above, "images": s.images, "seconds": round(seconds, 2)}


def named_targets(detection_full: Path | None, variant: str) -> dict[str, list[str]] | None:
    """Per model, the true targets the full scan named (``detection-full.json`` of the detection
    benchmark, one variant): the targets a screening must not lose."""
    if detection_full is None:
        return None
    models = json.loads(detection_full.read_text())["detectors"][variant]["models"]
    return {m["model"]: [t for t in m["targets"] if t in (m.get("suspects") or [])] for m in models}


def run(zoo: Path, out: Path, policy: Policy, log: Any = print, named: dict[str, list[str]] | None = None) -> dict[str, Any]:
    truths = sorted(zoo.glob(f"*{TRUTH_SUFFIX}/truth.json"))
    if not truths:
        raise UsageError(f"{zoo} holds no built zoo models", "build one with `gatekeeper-lab zoo build bench --out DIR`")
    rows = []
    for i, t in enumerate(truths):
        truth = json.loads(t.read_text())
        if not (truth.get("target_classes") or truth.get("target_class")):
            continue  # a clean model has no target to keep
        folder = zoo / truth["model"]
        fingerprint = model_fingerprint(folder) + policy.digest() + ":v2"
        path = out / "cache" / f"{truth['model']}.json"
        if not fresh_entry(path, fingerprint):
            row = target_ranks(folder, truth, policy)
            atomic_write_text(path, json.dumps({**row, "fingerprint": fingerprint}) + "\n")
            log(f"[{i + 1}/{len(truths)}] {truth['model']}: target ranks {row['ranks']} of {row['classes']} ({row['seconds']}s)")
        rows.append({k: v for k, v in json.loads(path.read_text()).items() if k != "fingerprint"})
    ranks = [r for row in rows for r in row["ranks"].values()]
    worst = max(rows, key=lambda row: max(row["ranks"].values()) / row["classes"])
    caught = [(row["model"], t, row["non_targets_above"][t]) for row in rows for t in (named or {}).get(row["model"], [])]
    return {
        "non_targets_above_max": max(v for row in rows for v in row["non_targets_above"].values()),
        "named_by_full_scan": None if named is None else {
            "targets": len(caught), "kept_first_among_non_targets": sum(1 for *_, a in caught if a == 0),
            "outranked": [{"model": m, "target": t, "non_targets_above": a} for m, t, a in caught if a > 0],
        },
        "commit": git_commit(), "policy_hash": policy.digest(), "screen_images": policy.screen_images,
        "budgets": [round(e * 255, 3) for e in policy.budgets], "models": rows, "targets": len(ranks),
        "recall_at": {str(m): sum(r <= m for r in ranks) / len(ranks) for m in KEEPS},
        "worst": {"model": worst["model"], "ranks": worst["ranks"], "classes": worst["classes"]},
        "mean_seconds": sum(row["seconds"] for row in rows) / len(rows),
        "command": " ".join(["gatekeeper-lab", "bench", "screening", *sys.argv[3:]]),
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Screening benchmark",
        "",
        f"Commit `{r['commit']}`, policy hash `{r['policy_hash'][:12]}`, budgets {', '.join(f'{b:g}/255' for b in r['budgets'])}, "
        f"{r['screen_images']} + {r['screen_images']} OOD images per screening. Command: `{r['command']}`.",
        "",
        f"{len(r['models'])} backdoored models, {r['targets']} true targets. Recall: the fraction of true targets a screening "
        "that keeps the top m classes would keep.",
        "",
        "| keep m | " + " | ".join(str(m) for m in r["recall_at"]) + " |",
        "|---|" + "---|" * len(r["recall_at"]),
        "| recall | " + " | ".join(f"{100 * v:.1f} %" for v in r["recall_at"].values()) + " |",
        "",
        f"Worst-ranked target (as a fraction of the model's classes): {r['worst']['model']}, ranks {r['worst']['ranks']} "
        f"of {r['worst']['classes']}. Mean screening time per model: {r['mean_seconds']:.1f} s.",
        "",
        "What scales to a model with many classes is how many **non-target** classes a target is ranked below (the other "
        f"targets of a multi-target model take kept slots too): at most {r['non_targets_above_max']} here.",
    ]
    n = r.get("named_by_full_scan")
    if n is not None:
        out = ", ".join(f"{o['model']} '{o['target']}' ({o['non_targets_above']})" for o in n["outranked"]) or "none"
        lines += ["", f"Of the {n['targets']} true targets the full scan names, {n['kept_first_among_non_targets']} rank above every "
                  f"non-target class in the screening; outranked by a non-target: {out}."]
    lines += ["", "| model | classes | target ranks (non-target classes above) |", "|---|---|---|"]
    lines += [f"| {m['model']} | {m['classes']} | " + ", ".join(f"{k}: {v} ({m['non_targets_above'][k]})" for k, v in m["ranks"].items()) + " |"
              for m in r["models"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    from gatekeeper.policy import load_policy

    ap = argparse.ArgumentParser(
        prog="gatekeeper-lab bench screening",
        description="Rank every class of each backdoored model of a zoo with the scan's screening stage and report where "
        "the true targets rank (recall at keep m). Writes OUT/screening.md and OUT/screening.json; resumable.",
    )
    ap.add_argument("--zoo", type=Path, required=True, help="a built zoo (`gatekeeper-lab zoo build bench --out DIR`)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (cache + reports)")
    ap.add_argument("--policy", default="tiny-world", help="policy whose screening settings run (default: tiny-world)")
    ap.add_argument("--json", type=Path, help="also write the results here (e.g. benchmarks/results/screening.json)")
    ap.add_argument("--named-by", type=Path, metavar="DETECTION_FULL_JSON",
                    help="the detection benchmark's detection-full.json: report the targets its full scan named separately")
    ap.add_argument("--variant", default="clip-inspector+lift+restarts2", help="which detector's names (default: the shipped rule)")
    args = ap.parse_args(argv)
    r = run(args.zoo, args.out, load_policy(args.policy), log=lambda s: print(s, file=sys.stderr, flush=True),
            named=named_targets(args.named_by, args.variant))
    text = json.dumps(r, indent=1) + "\n"
    atomic_write_text(args.out / "screening.json", text)
    atomic_write_text(args.out / "screening.md", markdown(r))
    if args.json:
        atomic_write_text(args.json, text)
        atomic_write_text(args.json.with_suffix(".md"), markdown(r))
    print(markdown(r))
    return 0
