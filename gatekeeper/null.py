"""What clean looks like on this backbone: the public backbone's inversion and the null margin.

Both depend only on the backbone's weights, the class names, the policy's inversion settings and
the OOD pool, never on the delivered prompt learner, so they are cached on disk under that key
and reused by every later scan of a model on the same backbone with the same classes.

- ``reference_inversions``: the scan's inversion run on the un-tuned backbone used zero-shot
  ("a photo of a {}.") with the delivered class names: the ASR a trigger of the same budget
  reaches without any prompt tuning.
- ``measure_null``: the lift scoring's null margin. ``policy.null_copies`` clean prompt learners
  of the delivered model's shape are tuned from scratch on the user's backbone (OOD images
  labelled by the zero-shot backbone: no zoo, no labels, no data from the provider) and scanned
  the same way; the largest lift any of their classes shows is how far clean prompt tuning moved
  a class here. The margin is that, or the policy's ``lift_margin`` floor if larger.

Cache: ``$GATEKEEPER_CACHE`` (default ``~/.cache/gatekeeper``; ``off`` disables it). An entry
holds its own key and is used only when every input matches; a corrupt entry is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gatekeeper import __version__
from gatekeeper.decide import floor_null
from gatekeeper.evidence import bonferroni_z
from gatekeeper.inversion.base import ClassInversion
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.ood import OODPool
from gatekeeper.policy import Policy, PositiveControl
from gatekeeper.result import ClassMetrics, NullModel
from gatekeeper.tracking import Tracker, pass_labels, training_label

NULL_TRAIN_EPOCHS = 12  # as the positive control's plant
NULL_SEED_OFFSET = 100  # copy i is tuned from seed policy.seed + 100 + i (calibrate --backbone uses the same)


def cache_root() -> Path | None:
    value = os.environ.get("GATEKEEPER_CACHE", "")
    if value.lower() == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "gatekeeper"


def backbone_digest(model: PromptTunedCLIP) -> str:
    """sha256 over the frozen backbone's tensors (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.clip.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _inversion_settings(policy: Policy) -> dict[str, Any]:
    keys = ("detector", "epsilon", "batch_size", "epochs", "lr", "ood_budget", "holdout", "restarts", "implementation", "seed")
    d = policy.to_dict()
    return {k: d[k] for k in keys}


def _key(kind: str, model: PromptTunedCLIP, names: list[str], policy: Policy, pool: OODPool, extra: dict[str, Any]) -> str:
    blob = {
        "kind": kind, "gatekeeper": __version__, "backbone": _digest_cached(model), "template": model.manifest.template,
        "image_size": model.image_size, "classnames": names, "inversion": _inversion_settings(policy),
        "pool": pool.info.content_hash, **extra,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


_DIGESTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _digest_cached(model: PromptTunedCLIP) -> str:
    """The backbone digest, computed once per backbone object in this process (frozen: never trained)."""
    if model.clip not in _DIGESTS:
        _DIGESTS[model.clip] = backbone_digest(model)
    return _DIGESTS[model.clip]


def _read(kind: str, key: str) -> dict[str, Any] | None:
    root = cache_root()
    path = root / kind / f"{key}.json" if root else None
    if path is None or not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("key") == key else None


def _write(kind: str, key: str, payload: dict[str, Any]) -> None:
    from gatekeeper._io import atomic_write_text

    root = cache_root()
    if root is None:
        return
    try:
        (root / kind).mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / kind / f"{key}.json", json.dumps({"key": key, **payload}) + "\n")
    except OSError:
        pass  # a read-only home is not an error; the next scan recomputes


_ENTRIES: dict[str, threading.Lock] = {}
_ENTRIES_GUARD = threading.Lock()


@contextlib.contextmanager
def _one_at_a_time(key: str) -> Iterator[None]:
    """One computation per cache entry in this process: a scan that needs an entry another scan
    is computing (the demo's two models share their backbone and class names) waits, then reads it."""
    with _ENTRIES_GUARD:
        lock = _ENTRIES.setdefault(key, threading.Lock())
    with lock:
        yield


def copy_label(i: int, copies: int) -> str:
    """Clean copy ``i``'s name in a scan's progress: ``clean copy 1/2``."""
    return f"clean copy {i + 1}/{copies}"


def reference_inversions(
    model: PromptTunedCLIP, pool: OODPool, policy: Policy, candidates: list[int], track: Tracker | None = None
) -> list[ClassMetrics]:
    """The policy's inversion on the un-tuned backbone with the model's class names (cached)."""
    from gatekeeper.pipeline import REFERENCE, best_of_restarts, make_inverter, reference_model

    track = track or Tracker()

    names = [model.classnames[i] for i in candidates]
    key = _key("reference", model, names, policy, pool, {"candidates": candidates})
    with _one_at_a_time(key):
        hit = _read("reference", key)
        if hit is not None:
            try:
                metrics = [ClassMetrics(**m) for m in hit["classes"]]
                track.cached(pass_labels(REFERENCE, policy.epsilon, policy.restarts))
                return metrics
            except (KeyError, TypeError):
                pass
        runs = best_of_restarts(make_inverter(policy), reference_model(model), pool, policy, candidates, track, REFERENCE)
        metrics = [i.metrics for i in runs]
        _write("reference", key, {"classes": [asdict(m) for m in metrics]})
        return metrics


def copy_lifts(inversions: list[ClassInversion], reference_asr: list[float]) -> list[float]:
    return [i.metrics.asr - r for i, r in zip(inversions, reference_asr, strict=True)]


def measure_null(
    model: PromptTunedCLIP,
    pool: OODPool,
    policy: Policy,
    candidates: list[int],
    reference_asr: list[float],
    track: Tracker | None = None,
) -> NullModel:
    """The lift scoring's null margin for this backbone, class list, policy and pool (cached)."""
    from gatekeeper.control import train_copy
    from gatekeeper.parallel import run_all
    from gatekeeper.pipeline import best_of_restarts, make_inverter, reference_model

    if policy.null_copies == 0 or model.ctx is None:
        return floor_null(policy, len(candidates))
    names = [model.classnames[i] for i in candidates]
    shape = {"model_kind": model.kind.value, "ctx": list(model.ctx.shape),
             "meta": [list(p.shape) for p in model.meta_net.parameters()] if model.meta_net is not None else None,
             **({"prompt_depth": model.manifest.prompt_depth} if model.manifest.prompt_depth else {})}
    key = _key("null", model, names, policy, pool, {"candidates": candidates, "copies": policy.null_copies,
                                                      "epochs": NULL_TRAIN_EPOCHS, **shape})
    track = track or Tracker()
    with _one_at_a_time(key):
        hit = _read("null", key)
        t0 = time.perf_counter()
        if hit is not None and isinstance(hit.get("copy_lifts"), list) and len(hit["copy_lifts"]) == policy.null_copies:
            lifts = [[float(v) for v in row] for row in hit["copy_lifts"]]
            cached, seconds = True, float(hit.get("seconds", 0.0))
            for i in range(policy.null_copies):
                who = copy_label(i, policy.null_copies)
                track.cached([training_label(who, policy.epsilon), *pass_labels(who, policy.epsilon, policy.restarts)])
        else:
            labeller = reference_model(model)
            plain = replace(policy, positive_control=PositiveControl.OFF)

            def clean_copy(i: int) -> Callable[[], list[float]]:
                def run() -> list[float]:
                    who = copy_label(i, policy.null_copies)
                    copy, _ = train_copy(model, labeller, None, policy.epsilon, seed=policy.seed + NULL_SEED_OFFSET + i,
                                         epochs=NULL_TRAIN_EPOCHS, fresh=True, log=track.training(training_label(who, policy.epsilon), NULL_TRAIN_EPOCHS))
                    copy.freeze_text()
                    return copy_lifts(best_of_restarts(make_inverter(plain), copy, pool, plain, candidates, track, who), reference_asr)

                return run

            lifts = run_all([clean_copy(i) for i in range(policy.null_copies)])  # side by side where the scan has workers
            cached, seconds = False, round(time.perf_counter() - t0, 2)
            _write("null", key, {"copy_lifts": lifts, "seconds": seconds})
    return null_from_maxima(policy, len(candidates), tuple(max(row) for row in lifts), seconds, cached)


def null_from_maxima(policy: Policy, n_tests: int, maxima: tuple[float, ...], seconds: float = 0.0, cached: bool = False) -> NullModel:
    """The null margin from each clean copy's largest class lift (none: the policy's floor)."""
    observed = max(maxima, default=float("-inf"))
    source = "clean copies" if observed > policy.lift_margin else "floor"
    return NullModel(
        margin=max(policy.lift_margin, observed), floor=policy.lift_margin, source=source, copies=len(maxima),
        copy_max_lifts=maxima, alpha=policy.alpha, critical_z=bonferroni_z(policy.alpha, n_tests), n_tests=n_tests,
        n_holdout=policy.holdout, seconds=seconds, cached=cached,
    )


def combine_nulls(policy: Policy, n_tests: int, parts: list[NullModel]) -> NullModel:
    """The null of a whole scan from its shards' (each over its own classes, same copies by seed)."""
    copies = {p.copies for p in parts}
    if len(copies) != 1:
        raise ValueError(f"shards measured different numbers of clean copies: {sorted(copies)}")
    maxima = tuple(max(vals) for vals in zip(*(p.copy_max_lifts for p in parts), strict=True))
    return null_from_maxima(policy, n_tests, maxima, sum(p.seconds for p in parts), all(p.cached for p in parts))
