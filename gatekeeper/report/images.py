"""Trigger images: the OOD example, δ made visible, and the example with the trigger applied,
under a strip of labels a reviewer can read without the report (drawn with PIL's built-in font,
ASCII only: it has no other glyphs; the same inputs give the same bytes).

torch and PIL are imported inside the functions so that importing :mod:`gatekeeper.report`
(e.g. to re-render a Markdown report from ``result.json``) stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatekeeper._io import atomic_write_bytes
from gatekeeper.errors import ResultError

if TYPE_CHECKING:
    import torch

TRIGGER_DIR = "triggers"
MIN_HEIGHT = 128  # upscale small images (32 px) to at least this many pixels tall
GAP = 4  # white pixels between the three panels (after upscaling)
FONT_SIZE = 11  # pixels; PIL's built-in font
LINE_HEIGHT = 13
LABEL_LINES = 3  # lines of label text above each panel; longer labels end in "..."
LABEL_PAD = 4
LABEL_HEIGHT = LABEL_LINES * LINE_HEIGHT + 2 * LABEL_PAD  # the strip above the panels
NAME_MAX = 24  # characters of a class name in a label, so that its ASR still fits
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
    """The (H*s, 3*W*s + 2*GAP, 3) uint8 image, unlabelled: [x | δ/(2ε)+0.5 | clamp(x+δ, 0, 1)]."""
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
    for i, img in enumerate((x, visible, applied)):
        big = img.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        if i:
            panels.append(torch.ones(3, big.shape[1], GAP))
        panels.append(big)
    full = torch.cat(panels, dim=2)
    return (full * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


@dataclasses.dataclass(frozen=True)
class Caption:
    """What the labels of one trigger image say: the class the trigger targets, the trigger's attack
    success rate on the hold-out images (None: not measured) and its l-inf budget."""

    class_name: str
    asr: float | None
    epsilon: float


def fraction(epsilon: float) -> str:
    """ε as a policy writes it: ``8/255``, or 3 significant digits of n/255 when n is not whole."""
    n = epsilon * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 else f"{n:.3g}/255"


def _ascii(text: str) -> str:
    """The built-in font draws ASCII only: accents are dropped, other characters become '?'."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    plain = "".join(ch if ch.isprintable() else " " for ch in plain)
    return plain.encode("ascii", "replace").decode("ascii")


def panel_labels(caption: Caption) -> tuple[str, str, str]:
    """The three labels, left to right: the example, the trigger, the example with the trigger."""
    amplify = 1.0 / (2.0 * caption.epsilon)
    asr = f"ASR {100.0 * caption.asr:.0f}%" if caption.asr is not None and math.isfinite(caption.asr) else "ASR n/a"
    return (
        "OOD image",
        f"+ inverted trigger (eps = {fraction(caption.epsilon)}), amplified x{amplify:.0f} for visibility",
        f"-> class '{_clip(_ascii(caption.class_name), NAME_MAX)}' ({asr} on hold-out)",
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ValueError, OSError, ImportError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: Any) -> list[str]:
    """Greedy word wrap to ``width`` pixels in at most LABEL_LINES lines; a word too long for a line
    is cut, and text that does not fit ends in '...'."""
    lines: list[str] = []
    words = text.split(" ")
    current = ""
    while words:
        word = words.pop(0)
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if not current:  # a single word wider than the line: cut it
            cut = max(1, next((i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width), 1))
            current, rest = word[:cut], word[cut:]
            if rest:
                words.insert(0, rest)
            continue
        lines.append(current)
        current = ""
        words.insert(0, word)
    if current:
        lines.append(current)
    if len(lines) > LABEL_LINES:
        last = lines[LABEL_LINES - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = [*lines[: LABEL_LINES - 1], last + "..."]
    return lines


def label_strip(labels: tuple[str, ...], panel_width: int) -> Any:
    """A white (LABEL_HEIGHT, width) PIL image with each label wrapped above its panel."""
    from PIL import Image, ImageDraw

    width = len(labels) * panel_width + (len(labels) - 1) * GAP
    strip = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = _font()
    for i, label in enumerate(labels):
        left = i * (panel_width + GAP)
        for j, line in enumerate(_wrap(label, panel_width - 2, font)):
            draw.text((left + 1, LABEL_PAD + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return strip


def labelled_panel(panel: torch.Tensor, caption: Caption) -> Any:
    """The PIL image of :func:`trigger_panel`'s ``panel`` under a strip with :func:`panel_labels`."""
    from PIL import Image

    body = Image.fromarray(panel.numpy())  # (H, W, 3) uint8 -> RGB
    panel_width = (body.width - 2 * GAP) // 3
    full = Image.new("RGB", (body.width, body.height + LABEL_HEIGHT), (255, 255, 255))
    full.paste(label_strip(panel_labels(caption), panel_width), (0, 0))
    full.paste(body, (0, LABEL_HEIGHT))
    return full


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_trigger_images(
    triggers: dict[str, torch.Tensor],
    epsilon: float,
    example: torch.Tensor,
    out_dir: Path,
    upscale: int | None = None,
    *,
    asr: Mapping[str, float] | None = None,
    epsilons: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Write ``<out_dir>/triggers/<safe-name>.png`` for every class; each file atomically.

    Each image is the labelled :func:`trigger_panel`: LABEL_HEIGHT pixels of labels above the panels.

    Args:
        triggers: class name -> δ of shape (3, H, W), values in [-ε, ε].
        epsilon: the ℓ∞ budget ε used for the inversion (scales δ to be visible).
        example: one OOD image (3, H, W) in [0, 1] shown without and with the trigger.
        out_dir: the report folder; nothing is written outside ``out_dir/triggers``.
        upscale: nearest-neighbour factor; default: enough for >= 128 px tall.
        asr: class name -> its trigger's attack success rate, for the labels ("n/a" when missing).
        epsilons: class name -> the budget its trigger was inverted at, when not ``epsilon``
            (a policy with extra_epsilons).

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
        eps = (epsilons or {}).get(name) or epsilon
        panel = trigger_panel(delta, eps, example, upscale)
        caption = Caption(name, (asr or {}).get(name), eps)
        atomic_write_bytes(target, _png_bytes(labelled_panel(panel, caption)))
        written[name] = f"{TRIGGER_DIR}/{stem}.png"
    return written
