"""The report stage: pure functions of an :class:`~gatekeeper.result.ScanResult`.

``write_reports`` writes the trigger PNGs, ``result.json``, ``report.md`` and ``job-summary.md``
(what the GitHub Action shows as the job summary: no image links, the top classes); every file is
written atomically (temp file + ``os.replace``). torch is imported lazily (only when images
are drawn), so ``gatekeeper.report.markdown`` can re-render a report from ``result.json`` fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatekeeper._io import atomic_write_text
from gatekeeper.errors import ResultError
from gatekeeper.report.images import TRIGGER_DIR
from gatekeeper.report.jsonout import dumps, result_to_dict, validate_result

if TYPE_CHECKING:
    import torch

    from gatekeeper.result import ScanResult

__all__ = ["Written", "clear_outputs", "fresh_dir", "write_reports"]

RESULT_JSON = "result.json"
REPORT_MD = "report.md"
SUMMARY_MD = "job-summary.md"  # the GitHub job summary (scripts/action-entry.sh); not the audit's summary.md
PARTIAL_JSON = "partial.json"  # a shard's output (gatekeeper.shard)
PARTIAL_TENSORS = "partial.safetensors"


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder tree; absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():  # a fifo, socket or device where a report goes
        path.unlink()


def clear_outputs(out_dir: Path, extra: Iterable[Path | None] = ()) -> None:
    """Remove every file a scan writes into ``out_dir`` (and the ``extra`` paths) before the scan starts.

    A scan that then fails, times out or is killed leaves no earlier ``result.json``, report,
    trigger image, partial or SARIF behind that could read as this model's verdict.

    Raises:
        ResultError: a path cannot be removed (permissions); nothing was scanned yet.
    """
    out_dir = Path(out_dir)
    names = (RESULT_JSON, REPORT_MD, SUMMARY_MD, TRIGGER_DIR, PARTIAL_JSON, PARTIAL_TENSORS)
    targets = [out_dir / n for n in names] + [Path(p) for p in extra if p is not None]
    targets += [t for n in names for t in out_dir.glob(f".{n}.*.tmp")]  # temp files of a killed write
    for path in targets:
        try:
            _remove(path)
        except OSError as exc:
            raise ResultError(
                f"cannot remove the earlier output {path} ({exc.strerror or exc})",
                "make the output folder writable or choose a new --out; an old verdict must not survive",
            ) from None


def fresh_dir(path: Path) -> Path:
    """Create ``path`` as a new, empty real folder: a symlink there is removed, never followed."""
    _remove(path)
    path.mkdir(parents=True)
    return path


def _epsilon(result: ScanResult) -> float:
    eps: Any = result.policy.get("epsilon") if isinstance(result.policy, dict) else None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ResultError(
            f"the result's policy has no usable epsilon ({eps!r}); cannot scale the trigger images",
            "the policy recorded in the result must contain epsilon > 0",
        )
    return float(eps)


@dataclasses.dataclass(frozen=True)
class Written:
    """What :func:`write_reports` wrote: the paths, and the result dict exactly as in ``result.json``
    (non-finite numbers as null), so nobody reads the file back."""

    paths: dict[str, Path]
    result: dict[str, Any]


def write_reports(
    result: ScanResult,
    triggers: dict[str, torch.Tensor],
    example: torch.Tensor | None,
    out_dir: Path,
    json_path: Path | None = None,
    grid_images: torch.Tensor | None = None,
) -> Written:
    """Write the trigger PNGs, the JSON result, the Markdown report and the job summary into ``out_dir``.

    Args:
        result: the audit result (its ``triggers`` field is filled here, via ``dataclasses.replace``).
        triggers: class name -> inverted trigger δ (3, H, W) in [-ε, ε]; ε is ``result.policy["epsilon"]``.
        example: one OOD image (3, H, W) in [0, 1]; may be None only when ``triggers`` is empty.
        out_dir: report folder, created if missing.
        json_path: an extra copy of the JSON result (``out_dir/result.json`` is always written).
        grid_images: the first hold-out images (N, 3, H, W), for each ``result.trigger_effects``
            entry's grid of triggered images (None: charts only).

    Returns:
        The paths (``{"json": ..., "markdown": ..., "summary": ..., "trigger:<class name>": ...}``,
        absolute or as given) and the result dict as written.

    Raises:
        ResultError: the result holds NaN/Infinity, does not match the schema, or cannot be drawn.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_JSON, REPORT_MD, SUMMARY_MD):  # replaced, never written through, if a symlink sits there
        if (out_dir / name).is_symlink():
            (out_dir / name).unlink()
    written: dict[str, Path] = {}

    trigger_paths: dict[str, str] = {}
    if triggers:
        if example is None:
            raise ResultError("trigger images need an example image; got None")
        from gatekeeper.report.images import save_trigger_images

        fresh_dir(out_dir / TRIGGER_DIR)  # no stale images, no symlink followed out of out_dir
        trigger_paths = save_trigger_images(
            triggers, _epsilon(result), example, out_dir,
            asr={c.name: c.asr for c in result.classes},
            epsilons={c.name: c.epsilon for c in result.classes if c.epsilon is not None},
        )
        for name, rel in trigger_paths.items():
            written[f"trigger:{name}"] = out_dir / rel

    effects = result.trigger_effects
    if effects:
        from gatekeeper.report.effects import save_effect_images

        if not triggers:
            fresh_dir(out_dir / TRIGGER_DIR)
        drawn = save_effect_images(effects, triggers, grid_images, out_dir)
        effects = tuple(dataclasses.replace(e, chart=drawn[e.class_name][0], grid=drawn[e.class_name][1]) for e in effects)
        for name, (chart, grid) in drawn.items():
            written[f"effect:{name}"] = out_dir / chart
            if grid:
                written[f"grid:{name}"] = out_dir / grid
    final = dataclasses.replace(result, triggers={**result.triggers, **trigger_paths}, trigger_effects=effects)
    result_dict = result_to_dict(final)
    # serialize, validate and render everything before the JSON and Markdown files are touched
    json_text = dumps(result_dict)
    validate_result(result_dict)
    from gatekeeper.report.markdown import render_markdown, render_summary

    md_text = render_markdown(result_dict)
    summary_text = render_summary(result_dict)

    json_file = out_dir / RESULT_JSON
    md_file = out_dir / REPORT_MD
    summary_file = out_dir / SUMMARY_MD
    # result.json last: the verdict record appears only once everything it points to exists
    atomic_write_text(md_file, md_text)
    atomic_write_text(summary_file, summary_text)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(json_path), json_text)
        written["json_copy"] = Path(json_path)
    atomic_write_text(json_file, json_text)
    written["json"] = json_file
    written["markdown"] = md_file
    written["summary"] = summary_file
    return Written(written, json.loads(json_text))
