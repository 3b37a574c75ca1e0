"""Measure a red-team model: clean accuracy, and the true trigger's ID and OOD attack success rate."""

from __future__ import annotations

from typing import Any

import torch

from gatekeeper.models.prompt_tuned import accuracy, predict
from gatekeeper.ood import procedural_images
from gatekeeper.redteam.world import Task, sample_task

TEST_SEED = 777_000  # world test images: disjoint seed range from training (10_000 + seed)
OOD_EVAL_SEED = 424_242  # the OOD family for ASR: procedural pool with a seed the gate never uses by default


def hit_rate(model: Any, x: torch.Tensor, target: int, batch: int = 256) -> float:
    return float((predict(model, x, batch=batch) == target).float().mean()) if len(x) else 0.0


def measure(model: Any, task: Task, attack: Any | None, n_test: int = 600, n_ood: int = 500) -> dict[str, Any]:
    """Clean accuracy on fresh task images; for an attack also ID ASR (non-target images) and OOD ASR."""
    x, y = sample_task(task, n_test, model.image_size, seed=TEST_SEED)
    out: dict[str, Any] = {"clean_accuracy": round(accuracy(model, x, y), 4)}
    if attack is not None and len(getattr(attack, "targets", ())) > 1:
        return {**out, **_measure_targets(model, x, y, attack, n_ood)}
    if attack is not None:
        keep = y != attack.target
        out["id_asr"] = round(hit_rate(model, attack.apply(x[keep]), attack.target), 4)
        ood = procedural_images(n_ood, model.image_size, OOD_EVAL_SEED)
        out["ood_asr"] = round(hit_rate(model, attack.apply(ood), attack.target), 4)
        out["ood_base_rate"] = round(hit_rate(model, ood, attack.target), 4)
    return out


def _measure_targets(model: Any, x: torch.Tensor, y: torch.Tensor, attack: Any, n_ood: int) -> dict[str, Any]:
    """A several-target attack: ID/OOD ASR per target trigger; the headline numbers are the weakest target's."""
    ood = procedural_images(n_ood, model.image_size, OOD_EVAL_SEED)
    rows = []
    for i, t in enumerate(attack.targets):
        keep = y != t
        rows.append({
            "target_index": t,
            "id_asr": round(hit_rate(model, attack.apply_target(x[keep], i), t), 4),
            "ood_asr": round(hit_rate(model, attack.apply_target(ood, i), t), 4),
            "ood_base_rate": round(hit_rate(model, ood, t), 4),
        })
    weakest = min(rows, key=lambda r: r["id_asr"])
    return {"id_asr": weakest["id_asr"], "ood_asr": weakest["ood_asr"], "ood_base_rate": weakest["ood_base_rate"], "per_target": rows}


def trigger_separability(model: Any, task: Task, attack: Any, n: int = 1200, seed: int = TEST_SEED + 1) -> float:
    """How well the *frozen* image encoder sees the trigger: held-out accuracy of a linear probe
    (logistic regression) telling triggered from clean task images by their image features.

    A prompt learner only sees an image through these features, so a trigger the probe cannot
    find (about 0.5) cannot be implanted by prompt tuning, whatever the recipe; BadCLIP's trigger,
    optimised against the encoder, is found almost always.
    """
    from sklearn.linear_model import LogisticRegression

    x, _ = sample_task(task, n, model.image_size, seed=seed)
    with torch.no_grad():
        feats = torch.cat([model.image_features(x), model.image_features(attack.apply(x))]).float().numpy()
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).numpy()
    order = torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed)).numpy()
    train, test = order[: 2 * n * 3 // 4], order[2 * n * 3 // 4 :]
    probe = LogisticRegression(max_iter=3000).fit(feats[train], labels[train])
    return round(float(probe.score(feats[test], labels[test])), 4)
