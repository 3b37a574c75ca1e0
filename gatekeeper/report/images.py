"""Trigger images: δ made visible, the OOD example, and the example with the trigger applied.

torch and PIL are imported inside the functions so that importing :mod:`gatekeeper.report`
(e.g. to re-render a Markdown report from ``result.json``) stays fast.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from gatekeeper._io import atomic_write_bytes
from gatekeeper.errors import ResultError

if TYPE_CHECKING:
    import torch

TRIGGER_DIR = "triggers"
MIN_HEIGHT = 128  # upscale small images (32 px) to at least this many pixels tall
GAP = 4  # white pixels between the three panels (after upscaling)
_SLUG_MAX = 48
_UNSAFE = re.compile(r"[^a-z0-9]+")


def safe_name(name: str) -> str:
    """A file-system-safe, unique stem for a class name.

    ASCII letters/digits and ``-`` only (no dots, no separators, so no path traversal and
    no hidden files), plus 8 hex digits of sha256(name) so that distinct names never
    collide (``"a b"`` vs ``"a-b"``) and reserved names (``con``, ``nul``) cannot occur.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii").lower()
    slug = _UNSAFE.sub("-", text).strip("-")[:_SLUG_MAX].strip("-") or "class"
    digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}"


def upscale_factor(height: int, upscale: int | None = None) -> int:
    """The integer nearest-neighbour factor: ``upscale`` if given, else ceil(MIN_HEIGHT / height)."""
    if upscale is not None:
        if upscale < 1:
            raise ResultError(f"upscale must be >= 1, got {upscale}")
        return int(upscale)
    return max(1, math.ceil(MIN_HEIGHT / max(1, height)))


def _as_chw(t: torch.Tensor, what: str) -> torch.Tensor:
    x = t.detach().to("cpu").float()
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ResultError(f"{what} must have shape (3, H, W), got {tuple(t.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x


def trigger_panel(
    delta: torch.Tensor, epsilon: float, example: torch.Tensor, upscale: int | None = None
) -> torch.Tensor:
    """The (H*s, 3*W*s + 2*GAP, 3) uint8 image: [δ/(2ε)+0.5 | x | clamp(x+δ, 0, 1)]."""
    import torch

    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ResultError(f"epsilon must be a positive finite number, got {epsilon}")
    d = _as_chw(delta, "trigger")
    x = _as_chw(example, "example image")
    if d.shape != x.shape:
        raise ResultError(f"trigger shape {tuple(d.shape)} does not match example image shape {tuple(x.shape)}")
    d = torch.nan_to_num(d, nan=0.0, posinf=epsilon, neginf=-epsilon)
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)
    visible = (d / (2.0 * epsilon) + 0.5).clamp(0.0, 1.0)
    applied = (x + d).clamp(0.0, 1.0)

    s = upscale_factor(int(d.shape[1]), upscale)
    panels = []
    for i, img in enumerate((visible, x, applied)):
        big = img.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        if i:
            panels.append(torch.ones(3, big.shape[1], GAP))
        panels.append(big)
    full = torch.cat(panels, dim=2)
    return (full * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def _png_bytes(hwc_uint8: torch.Tensor) -> bytes:
    from PIL import Image

    img = Image.fromarray(hwc_uint8.numpy())  # (H, W, 3) uint8 -> RGB
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_trigger_images(
    triggers: dict[str, torch.Tensor],
    epsilon: float,
    example: torch.Tensor,
    out_dir: Path,
    upscale: int | None = None,
) -> dict[str, str]:
    """Write ``<out_dir>/triggers/<safe-name>.png`` for every class; each file atomically.

    Args:
        triggers: class name -> δ of shape (3, H, W), values in [-ε, ε].
        epsilon: the ℓ∞ budget ε used for the inversion (scales δ to be visible).
        example: one OOD image (3, H, W) in [0, 1] shown without and with the trigger.
        out_dir: the report folder; nothing is written outside ``out_dir/triggers``.
        upscale: nearest-neighbour factor; default: enough for >= 128 px tall.

    Returns:
        class name -> POSIX path of its PNG relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    if (out_dir / TRIGGER_DIR).is_symlink():
        raise ResultError(
            f"{out_dir / TRIGGER_DIR} is a symlink; refusing to write trigger images through it",
            "remove it (gatekeeper scan recreates the folder itself)",
        )
    trig_dir = (out_dir / TRIGGER_DIR).resolve()
    trig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    used: set[str] = set()
    for name, delta in triggers.items():
        stem = safe_name(name)
        n = 2
        base = stem
        while stem in used:  # only on a sha256 prefix collision
            stem = f"{base}-{n}"
            n += 1
        used.add(stem)
        target = (trig_dir / f"{stem}.png").resolve()
        if target.parent != trig_dir:  # defence in depth; safe_name cannot produce this
            raise ResultError(f"refusing to write trigger image for {name!r} outside {trig_dir}")
        atomic_write_bytes(target, _png_bytes(trigger_panel(delta, epsilon, example, upscale)))
        written[name] = f"{TRIGGER_DIR}/{stem}.png"
    return written
