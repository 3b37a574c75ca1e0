"""Sharded scans: ``scan --shard i/n`` inverts a share of the candidates; ``merge`` decides.

Per-class inversions are independent (each class has its own seeded trigger), so a scan splits
over a job matrix, a Kubernetes job array or Slurm, and ``merge`` recomputes exactly the
scores and verdict of an unsharded run from the raw per-class metrics.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gatekeeper.decide import rule_for
from gatekeeper.errors import ResultError, UsageError
from gatekeeper.pipeline import Inspection, ScanContext
from gatekeeper.policy import Policy, policy_from_mapping
from gatekeeper.report import PARTIAL_JSON, PARTIAL_TENSORS
from gatekeeper.result import ClassMetrics, ModelInfo, NullModel, PoolInfo, Provenance

FORMAT = "gatekeeper-partial"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 1 <= i <= n -> (i, n).

    Raises:
        UsageError: anything else.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(
            f"--shard {text!r} is not i/n with 1 <= i <= n", "e.g. --shard 2/4 for the second of four shards"
        )
    return int(m.group(1)), int(m.group(2))


def shard_candidates(candidates: list[int], i: int, n: int) -> list[int]:
    """The i-th of n interleaved shares of the candidate list (1-based)."""
    return candidates[i - 1 :: n]


def write_partial(
    out: Path, *, shard: tuple[int, int], candidates: list[int], inspection: Inspection, context: ScanContext, policy: Policy
) -> Path:
    """Write ``partial.json`` + ``partial.safetensors`` (triggers and one OOD example) into ``out``."""
    from safetensors.torch import save

    from gatekeeper._io import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    null = inspection.null
    record = {
        "format": FORMAT,
        "format_version": 1,
        "shard": f"{shard[0]}/{shard[1]}",
        "candidates": candidates,
        "metrics": [asdict(m) for m in inspection.metrics],
        "policy": policy.to_dict(),
        "policy_hash": policy.digest(),
        "provenance": asdict(context.provenance),
        "pool": asdict(context.pool),
        "model": asdict(context.model),
        "seconds": inspection.seconds,
        "environment": context.environment,
        "null_model": asdict(null) if null is not None else None,
    }
    tensors = {f"trigger.{m.index}": inspection.triggers[m.name].contiguous() for m in inspection.metrics}
    tensors["example"] = inspection.example.contiguous()
    atomic_write_bytes(out / PARTIAL_TENSORS, save(tensors))
    atomic_write_text(out / PARTIAL_JSON, json.dumps(record, indent=2) + "\n")
    return out / PARTIAL_JSON


def _read(path: Path) -> tuple[dict[str, Any], Path]:
    path = path / PARTIAL_JSON if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultError(
            f"cannot read partial result {path}: {exc}", "give the folders written by `scan --shard`"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ResultError(f"{path} is not a gatekeeper partial result", "give the folders written by `scan --shard`")
    return record, path


def _same(records: list[tuple[dict[str, Any], Path]], key: str, what: str) -> None:
    values = {json.dumps(r[key], sort_keys=True) for r, _ in records}
    if len(values) > 1:
        raise ResultError(
            f"the partial results mix different {what}: " + ", ".join(f"{p}" for _, p in records),
            "merge only the shards of one scan (same model, policy and pool)",
        )


def merge(paths: list[Path]) -> tuple[Inspection, ScanContext, Policy]:
    """Check that ``paths`` are the complete shard set of one scan and combine them.

    Returns:
        The combined inspection (metrics in candidate order), its context (no command) and the policy.

    Raises:
        ResultError: unreadable files, mixed scans/policies, missing or duplicate shards or classes.
    """
    from safetensors.torch import load_file

    if not paths:
        raise UsageError("merge needs at least one partial result", "gatekeeper merge out/shard-*/ --out merged/")
    records = [_read(p) for p in paths]
    _same(records, "policy_hash", "policies")
    _same(records, "provenance", "models (provenance)")
    _same(records, "pool", "OOD pools")
    _same(records, "candidates", "candidate sets")
    shards = [parse_shard(r["shard"]) for r, _ in records]
    n = shards[0][1]
    seen = sorted(i for i, _ in shards)
    if any(m != n for _, m in shards) or seen != list(range(1, n + 1)):
        raise ResultError(
            f"shards {sorted(r['shard'] for r, _ in records)} are not exactly 1/{n} .. {n}/{n}",
            "merge every shard of the scan once (a missing shard means classes were not checked)",
        )
    by_index: dict[int, ClassMetrics] = {}
    triggers: dict[str, torch.Tensor] = {}
    example: torch.Tensor | None = None
    for record, path in records:
        tensors = load_file(str(path.parent / PARTIAL_TENSORS))
        example = tensors["example"]
        for m in record["metrics"]:
            metric = ClassMetrics(**m)
            if metric.index in by_index:
                raise ResultError(f"class {metric.name!r} appears in two shards", "merge each shard once")
            by_index[metric.index] = metric
            triggers[metric.name] = tensors[f"trigger.{metric.index}"]
    candidates = records[0][0]["candidates"]
    missing = sorted(set(candidates) - set(by_index))
    if missing:
        raise ResultError(f"classes {missing} were not inverted by any shard", "re-run the missing shards")
    policy = policy_from_mapping(records[0][0]["policy"])
    if policy.digest() != records[0][0]["policy_hash"]:
        raise ResultError("the partial results' policy does not match its recorded hash", "re-run the shards")
    first = records[0][0]
    null = None
    if rule_for(policy).uses_null:
        from gatekeeper.null import combine_nulls

        try:
            parts = [
                NullModel(**{**r["null_model"], "copy_max_lifts": tuple(r["null_model"]["copy_max_lifts"])})
                for r, _ in records
            ]
        except (KeyError, TypeError):
            raise ResultError(
                "a partial result has no null model for the lift scoring", "re-run the shards with this gatekeeper"
            ) from None
        null = combine_nulls(policy, policy.n_tests(len(candidates)), parts)
    context = ScanContext(
        Provenance(**first["provenance"]), PoolInfo(**first["pool"]), ModelInfo(**first["model"]), first["environment"]
    )
    assert example is not None
    seconds = sum(r["seconds"] for r, _ in records)
    return Inspection(tuple(by_index[c] for c in candidates), triggers, example, seconds, null), context, policy
