"""The scan as a library: ``run_scan(ScanRequest) -> ScanOutcome``.

source → load → inspect → decide → report, and the exit code. The CLI, the inventory re-audit,
``repair``'s re-scan and the demo all call this; the CLI only parses arguments, shows progress
and prints. Everything the request names is validated before any model is fetched (usage and
policy errors, exit 4), and the outputs of an earlier run are removed before the work starts, so
a scan that fails or is killed leaves no old verdict behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gatekeeper.errors import ExitCode, GatekeeperError, ResourceError, UsageError
from gatekeeper.policy import Policy, load_policy
from gatekeeper.tracking import ScanProgress, Tracker, no_ticks


@dataclass(frozen=True)
class ScanRequest:
    """One scan, as a user asks for it.

    Args:
        reference: a model folder, ``hf://org/name[@rev]`` or ``models:/name/version|@alias``.
        out: the report folder (``result.json``, ``report.md``, ``triggers/``).
        policy: a policy file or a shipped policy name.
        ood: ``procedural[:SEED]`` or ``dir:PATH``.
        json_path: an extra copy of ``result.json``.
        stale: more paths the scan owns (e.g. ``--sarif``), removed before it starts.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        revision: a Hub revision (or the MLflow version/alias repeated).
        command: the command line recorded in the result.
        shard: ``i/n``: invert the i-th of n shares of the classes and write a partial result.
    """

    reference: str
    out: Path
    policy: str = "default"
    ood: str = "procedural"
    json_path: Path | None = None
    stale: tuple[Path, ...] = ()
    device: str = "auto"
    revision: str | None = None
    command: str = ""
    shard: str | None = None


@dataclass(frozen=True)
class ScanOutcome:
    """What a scan produced: the exit code, the result as written (non-finite numbers are null)
    and the files written (``json``, ``markdown``, ``trigger:<class>``; ``partial`` for a shard)."""

    exit_code: ExitCode
    result: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return str(self.result.get("verdict", "error"))


def error_result(reference: str, exc: BaseException) -> dict[str, Any]:
    """A minimal result dict for a scan that raised: SARIF and the JSON line still say 'error'."""
    reason = exc.one_line() if isinstance(exc, GatekeeperError) else f"internal error ({type(exc).__name__})"
    return {
        "verdict": "error",
        "reason": reason,
        "s_max": None,
        "threshold": None,
        "suspect_class": None,
        "provenance": {"reference": reference},
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else the CPU.

    Raises:
        UsageError: not a device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available", "use --device cpu or auto")
    return dev


def prepare_out(out: Path) -> None:
    """Create the output folder.

    Raises:
        UsageError: it exists as a file, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder", "give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror}", "choose a writable path") from None


def run_scan(request: ScanRequest, progress: ScanProgress = no_ticks) -> ScanOutcome:
    """Scan one model to a verdict (or, with ``shard``, to a partial result).

    Raises:
        UsageError, PolicyError: bad request or policy (exit 4), before anything is fetched.
        SourceError, ModelFormatError, BackboneError, PoolError, ResourceError: the model could
            not be checked (exit 2); no result file is left in ``out``.
    """
    from gatekeeper.ood import check_spec
    from gatekeeper.report import clear_outputs
    from gatekeeper.shard import parse_shard
    from gatekeeper.sources import parse_reference

    policy = load_policy(request.policy)
    shard = parse_shard(request.shard) if request.shard else None
    check_spec(request.ood)
    device = resolve_device(request.device)
    scheme, target, _ = parse_reference(request.reference)
    if scheme == "local":  # a mistyped path is the user's error: exit 4, before any work
        folder = Path(target).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "not found"
            raise UsageError(
                f"model folder {what}: {folder}",
                "give the folder holding gatekeeper.json, or hf://org/name[@revision] or models:/name/version",
            )
    prepare_out(request.out)
    clear_outputs(request.out, (request.json_path, *request.stale))

    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from gatekeeper.parallel import cpu_workers, workers
    from gatekeeper.pipeline import scan_model
    from gatekeeper.sources import resolve

    resolved = resolve(request.reference, revision=request.revision)
    with _memory_errors(device), workers(cpu_workers(device)):
        model = load_model(resolved.path, device)
        pool = load_pool(request.ood, model.image_size, policy.ood_budget, policy.holdout, policy.seed, model.resize)
        if shard is not None:
            return _run_shard(model, pool, policy, resolved.provenance, shard, request.out, progress)
        output = scan_model(model, pool, policy, provenance=resolved.provenance, command=request.command, progress=progress)
    return finish(output, policy, request.out, request.json_path)


@contextlib.contextmanager
def _memory_errors(device: torch.device) -> Iterator[None]:
    """Turn the allocators' out-of-memory errors into a :class:`ResourceError` with what to do."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise ResourceError(
            f"out of device memory on {device}: {str(exc).splitlines()[0][:200]}",
            "lower batch_size in the policy, or use a larger device / --device cpu",
        ) from None
    except ResourceError:
        raise
    except MemoryError:
        raise ResourceError("out of host memory", "lower ood_budget/batch_size or use a larger machine") from None
    except RuntimeError as exc:  # the CPU allocator reports exhaustion as a RuntimeError
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise ResourceError(
            f"the scan does not fit in memory on {device}: {str(exc).splitlines()[0][:200]}",
            "lower batch_size in the policy, or use a machine with more memory",
        ) from None


def _run_shard(
    model: Any, pool: Any, policy: Policy, provenance: Any, shard: tuple[int, int], out: Path, progress: ScanProgress
) -> ScanOutcome:
    from gatekeeper.decide import candidate_classes, rule_for
    from gatekeeper.pipeline import context_of, inspect_candidates, plan_inspection
    from gatekeeper.shard import shard_candidates, write_partial

    candidates = candidate_classes(len(model.classnames), policy)
    if rule_for(policy).standardised:
        policy.threshold(len(candidates), pool.info.content_hash)
    mine = shard_candidates(candidates, *shard)
    track = Tracker(plan_inspection(model, policy, len(mine)), progress)
    inspection = inspect_candidates(model, pool, policy, mine, track)
    track.finish()
    context = context_of(model, pool, provenance)
    path = write_partial(out, shard=shard, candidates=candidates, inspection=inspection, context=context, policy=policy)
    info = {"shard": f"{shard[0]}/{shard[1]}", "classes": len(mine), "partial": str(path)}
    return ScanOutcome(ExitCode.PASS, info, {"partial": path})


def finish(output: Any, policy: Policy, out: Path, json_path: Path | None) -> ScanOutcome:
    """report → exit code (shared by a scan and a merge)."""
    from gatekeeper.report import write_reports

    written = write_reports(output.result, output.triggers, output.example, out, json_path, output.grid_images)
    code = output.result.decision.verdict.exit_code(policy.on_inconclusive)
    return ScanOutcome(code, written.result, written.paths)


def merge_scan(partials: list[Path], out: Path, json_path: Path | None, command: str) -> ScanOutcome:
    """Combine the partial results of ``scan --shard i/n`` into the verdict and report of one scan.

    Raises:
        ResultError: shards missing, repeated, or from different models, policies or pools.
    """
    from gatekeeper.pipeline import ScanOutput, conclude, control_not_run
    from gatekeeper.report import clear_outputs
    from gatekeeper.shard import merge

    inspection, context, policy = merge(partials)
    prepare_out(out)
    clear_outputs(out, (json_path,))
    result = control_not_run(conclude(inspection, replace(context, command=command), policy), policy)
    return finish(ScanOutput(result, inspection.triggers, inspection.example), policy, out, json_path)


DEMO_EXPECTED = {"clean": ExitCode.PASS, "backdoored": ExitCode.BACKDOOR}


def run_demo(out: Path, device: str, progress_for: Any) -> Iterator[tuple[str, ScanOutcome, ExitCode]]:
    """Scan the bundled demo zoo (one clean, one backdoored model) with the tiny-world policy, the
    two side by side on the CPU (they share the public backbone's run and the null model, computed
    once); yields (name, outcome, the expected exit code) per model."""
    import shlex

    from gatekeeper.parallel import cpu_workers, run_all, workers
    from gatekeeper.resources import data_path

    zoo = data_path("zoo") / "demo"

    def scan(name: str) -> Callable[[], ScanOutcome]:
        ref = str(zoo / name)
        command = shlex.join(["gatekeeper", "scan", ref, "--policy", "tiny-world", "--out", str(out / name)])
        request = ScanRequest(ref, out / name, policy="tiny-world", device=device, command=command)
        return lambda: run_scan(request, progress_for(f"demo/{name}"))

    with workers(cpu_workers(resolve_device(device))):
        outcomes = run_all([scan(name) for name in DEMO_EXPECTED])
    for (name, expected), outcome in zip(DEMO_EXPECTED.items(), outcomes, strict=True):
        yield name, outcome, expected
