"""``gatekeeper-lab bench repair``: repair with CLIP-Inspector's trigger vs three controls, on a red-team zoo.

For every backdoored model (its true trigger is known from the zoo's ground truth):
1. scan it (CLIP-Inspector, the policy's settings, paper scoring) and take the most anomalous
   class c^ and its trigger delta_c^ (as ``gatekeeper repair`` does, whether or not c^ is the target);
2. fine-tune a fresh copy of the prompt learner with ``repair.finetune`` on a small labelled set of
   the model's task (clean + triggered pairs) using, in turn:
   - ``ci``: delta_c^;
   - ``clean-only``: no trigger (clean pairs only);
   - ``random``: a uniform random delta in the same l-inf ball (seeded);
   - ``wrong-class``: the trigger of the runner-up class (the second most anomalous);
3. measure clean accuracy and the *true* trigger's ID ASR (``redteam.evaluate.measure``, 600 fresh
   task images) before and after.
Per-model results are cached under ``OUT/cache`` (resumable).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gatekeeper._io import atomic_write_text
from gatekeeper.bench.detection import fresh_entry, git_commit, zoo_model_identity
from gatekeeper.errors import UsageError
from gatekeeper.policy import Policy

TRUTH_SUFFIX = ".truth"
VARIANTS = ("ci", "clean-only", "random", "wrong-class")
N_LABELLED = 240  # 20 images per class of a 12-class task: "a small labelled set"
LABELLED_SEED = 555_000  # disjoint from training (10_000 + seed) and test (777_000) images


def _labelled(task: Any, size: int, seed: int) -> Any:
    from gatekeeper.redteam.world import sample_task
    from gatekeeper.repair import LabelledSet

    x, y = sample_task(task, N_LABELLED, size, seed=LABELLED_SEED + seed)
    return LabelledSet(x, y, x[:0], y[:0], tuple(task.classnames), ())


def repair_one(folder: Path, truth: dict[str, Any], truth_dir: Path, policy: Policy, epochs: int) -> dict[str, Any]:
    from gatekeeper.decide import anomaly_scores, candidate_classes
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.pipeline import invert_candidates
    from gatekeeper.redteam.evaluate import measure
    from gatekeeper.redteam.truth import true_attack
    from gatekeeper.redteam.world import TASKS
    from gatekeeper.repair import RepairSettings, finetune

    task = TASKS[truth["task"]]
    attack = true_attack(truth, truth_dir)
    model = load_model(folder)
    pool = load_pool("procedural", model.image_size, policy.ood_budget, policy.holdout, policy.seed)
    inv, _ = invert_candidates(model, pool, policy, candidate_classes(len(model.classnames), policy))
    ranked = sorted(anomaly_scores([i.metrics for i in inv], policy.min_trigger_asr), key=lambda c: -c.z)
    deltas = {i.metrics.index: i.trigger for i in inv}
    top, runner = ranked[0].index, ranked[1].index
    g = torch.Generator().manual_seed(policy.seed)
    triggers: dict[str, torch.Tensor | None] = {
        "ci": deltas[top],
        "clean-only": None,
        "random": (torch.rand(deltas[top].shape, generator=g) * 2 - 1) * policy.epsilon,
        "wrong-class": deltas[runner],
    }
    data = _labelled(task, model.image_size, int(truth.get("seed", 0)))
    before = measure(model, task, attack)
    out: dict[str, Any] = {
        "model": truth["model"], "task": truth["task"], "attack": truth["attack"], "target": truth["target_class"],
        "repaired_class": model.classnames[top], "runner_up": model.classnames[runner],
        "ci_found_target": model.classnames[top] == truth["target_class"], "before": before, "after": {},
    }
    for name, delta in triggers.items():
        fresh = load_model(folder)
        t0 = time.perf_counter()
        finetune(fresh, data, delta, RepairSettings(epochs=epochs))
        out["after"][name] = {**measure(fresh, task, attack), "seconds": round(time.perf_counter() - t0, 2)}
    return out


def run(zoo: Path, out: Path, policy: Policy, epochs: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    truths = sorted(zoo.glob(f"*{TRUTH_SUFFIX}/truth.json"))
    items = [(t, json.loads(t.read_text())) for t in truths]
    items = [(t, d) for t, d in items if d["attack"] != "clean"]
    if not items:
        raise UsageError(f"{zoo} holds no backdoored zoo models", "build one with `gatekeeper-lab zoo build bench --out DIR`")
    cache = out / "cache" / f"repair-{policy.digest()[:12]}-e{epochs}"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.time()
    for i, (tpath, truth) in enumerate(items):
        path = cache / f"{truth['model']}.json"
        fingerprint = "".join(zoo_model_identity(zoo / truth["model"]))
        if not fresh_entry(path, fingerprint):
            row = {**repair_one(zoo / truth["model"], truth, tpath.parent, policy, epochs), "fingerprint": fingerprint}
            atomic_write_text(path, json.dumps(row) + "\n")
            log(f"[{i + 1}/{len(items)}] {truth['model']}: true-trigger ASR {row['before']['id_asr']:.0%} -> "
                + ", ".join(f"{k} {v['id_asr']:.0%}" for k, v in row["after"].items()) + f" ({time.time() - t_start:.0f}s)")
        rows.append(json.loads(path.read_text()))
    from gatekeeper.repair import RepairSettings

    return {"commit": git_commit(), "policy": policy.to_dict(), "epochs": epochs, "lr": RepairSettings().lr, "n_labelled": N_LABELLED, "models": rows, "summary": summarize(rows)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Averages over all backdoored models, and per attack: true-trigger ID ASR and accuracy change."""
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {"n": len(rs), "before_id_asr": _mean([r["before"]["id_asr"] for r in rs]),
                             "before_accuracy": _mean([r["before"]["clean_accuracy"] for r in rs])}
        for v in VARIANTS:
            d[v] = {
                "id_asr": _mean([r["after"][v]["id_asr"] for r in rs]),
                "accuracy_change": _mean([r["after"][v]["clean_accuracy"] - r["before"]["clean_accuracy"] for r in rs]),
            }
        return d

    attacks = sorted({r["attack"] for r in rows})
    return {"all": block(rows), "ci_found_target": block([r for r in rows if r["ci_found_target"]]),
            "per_attack": {a: block([r for r in rows if r["attack"] == a]) for a in attacks}}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "# Repair benchmark",
        "",
        f"Commit `{res['commit']}`; scans with ε = {res['policy']['epsilon'] * 255:.0f}/255; fine-tuning {res['epochs']} epochs "
        f"on {res['n_labelled']} labelled task images (clean + triggered pairs), AdamW lr {res['lr']}. True-trigger ASR: share of "
        "600 fresh non-target task images sent to the target by the implanted trigger. Accuracy change in points.",
        "",
        "| models | n | ASR before | CI trigger | clean-only | random δ | wrong class's δ |",
        "|---|---:|---:|---|---|---|---|",
    ]

    def cell(b: dict[str, Any], v: str) -> str:
        return f"{b[v]['id_asr']:.1%} ({100 * b[v]['accuracy_change']:+.1f})"

    for label, b in [("all backdoored", s["all"]), ("c^ = true target", s["ci_found_target"])] + [(a, b) for a, b in s["per_attack"].items()]:
        if b["n"]:
            lines.append(f"| {label} | {b['n']} | {b['before_id_asr']:.1%} | " + " | ".join(cell(b, v) for v in VARIANTS) + " |")
    lines += ["", "Cells: true-trigger ID ASR after repair (clean-accuracy change).", "", "## Per model", "",
              "| model | c^ (target?) | ASR before | CI | clean-only | random | wrong class | acc before → after (CI) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in res["models"]:
        a = r["after"]
        lines.append(
            f"| {r['model']} | {r['repaired_class']} ({'yes' if r['ci_found_target'] else 'no'}) | {r['before']['id_asr']:.0%} | "
            + " | ".join(f"{a[v]['id_asr']:.0%}" for v in VARIANTS)
            + f" | {r['before']['clean_accuracy']:.1%} → {a['ci']['clean_accuracy']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    from gatekeeper.policy import load_policy

    ap = argparse.ArgumentParser(
        prog="gatekeeper-lab bench repair",
        description="Repair every backdoored model of a red-team zoo with CLIP-Inspector's trigger and with three "
        "controls (clean-only fine-tuning, a random trigger, the runner-up class's trigger); report the true "
        "trigger's ASR and clean accuracy before/after as repair.md + repair.json.",
    )
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output folder (cache + reports)")
    ap.add_argument("--policy", default="tiny-world")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    res = run(args.zoo, args.out, load_policy(args.policy), args.epochs, log=lambda s: print(s, file=sys.stderr, flush=True))
    (args.out / "repair.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "repair.md").write_text(markdown(res))
    print(markdown(res))
    return 0
