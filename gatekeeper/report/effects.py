"""Pictures of what a flagged class's trigger does, drawn from the result's ``trigger_effects``:

- ``triggers/<class>-effect.png``: the class's ASR against the trigger's scale (0 to 1 times δ)
  on the scanned model and, with the same trigger, on the public backbone. A backdoor shows as a
  model curve that climbs where the backbone's stays flat.
- ``triggers/<class>-grid.png``: the first hold-out images with δ applied, each under the scanned
  model's prediction.

Drawn with Pillow (a runtime dependency; matplotlib is not), ASCII labels, the same inputs give the
same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatekeeper._io import atomic_write_bytes
from gatekeeper.report.images import (
    GAP,
    LINE_HEIGHT,
    TRIGGER_DIR,
    _as_chw,
    _ascii,
    _clip,
    _font,
    _png_bytes,
    fraction,
    safe_name,
    upscale_factor,
)
from gatekeeper.result import TriggerEffect

if TYPE_CHECKING:
    import torch

WIDTH, HEIGHT = 420, 260
LEFT, RIGHT, TOP, BOTTOM = 46, 14, 30, 44  # plot margins in pixels
MODEL_COLOUR = (200, 30, 30)
BACKBONE_COLOUR = (30, 80, 200)
GRID_COLUMNS = 4


def effect_chart(effect: TriggerEffect) -> Any:
    """The PIL image of ``effect``'s two ASR curves against the trigger's scale."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP  # y0: the plot's bottom edge
    top_scale = max(effect.scales) or 1.0

    def at(scale: float, asr: float) -> tuple[float, float]:
        value = asr if math.isfinite(asr) else 0.0
        return x0 + (x1 - x0) * scale / top_scale, y0 - (y0 - y1) * min(max(value, 0.0), 1.0)

    title = f"'{_clip(_ascii(effect.class_name), 28)}': ASR against trigger scale (eps {fraction(effect.epsilon)})"
    draw.text((4, 6), title, fill=(0, 0, 0), font=font)
    for frac in (0.0, 0.5, 1.0):
        _, y = at(0.0, frac)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((4, y - LINE_HEIGHT // 2), f"{100 * frac:.0f}%", fill=(0, 0, 0), font=font)
    for s in effect.scales:
        x, _ = at(s, 0.0)
        draw.line([(x, y0), (x, y0 + 4)], fill=(0, 0, 0))
        draw.text((x - 8, y0 + 6), f"{s:g}", fill=(0, 0, 0), font=font)
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=(0, 0, 0))
    draw.text((x0, y0 + 6 + LINE_HEIGHT), "scale of the inverted trigger (x delta)", fill=(0, 0, 0), font=font)
    for values, colour in ((effect.backbone_asr, BACKBONE_COLOUR), (effect.model_asr, MODEL_COLOUR)):
        points = [at(s, v) for s, v in zip(effect.scales, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.rectangle([(x - 2, y - 2), (x + 2, y + 2)], fill=colour)
    legend_x = x0 + 8
    for i, (label, colour) in enumerate((("scanned model", MODEL_COLOUR), ("public backbone, same trigger", BACKBONE_COLOUR))):
        y = y1 + 4 + i * LINE_HEIGHT
        draw.rectangle([(legend_x, y + 3), (legend_x + 10, y + 8)], fill=colour)
        draw.text((legend_x + 14, y), label, fill=(0, 0, 0), font=font)
    return img


def effect_grid(effect: TriggerEffect, delta: torch.Tensor, images: torch.Tensor) -> Any:
    """The PIL image of the first ``len(effect.predictions)`` of ``images`` with ``delta`` applied,
    each under the scanned model's prediction."""
    import torch
    from PIL import Image, ImageDraw

    d = _as_chw(delta, "trigger")
    shown = [_as_chw(images[i], "hold-out image") for i in range(min(len(effect.predictions), len(images)))]
    s = upscale_factor(int(d.shape[1]))
    side_w, side_h = int(d.shape[2]) * s, int(d.shape[1]) * s
    cols = max(1, min(GRID_COLUMNS, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    cell_h = side_h + 2 * LINE_HEIGHT
    img = Image.new("RGB", (cols * side_w + (cols - 1) * GAP, LINE_HEIGHT + 6 + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((2, 2), _clip(f"with the trigger for '{_ascii(effect.class_name)}' the model predicts:", 80), fill=(0, 0, 0), font=font)
    for i, x in enumerate(shown):
        applied = (torch.nan_to_num(x, nan=0.0) + torch.nan_to_num(d, nan=0.0)).clamp(0.0, 1.0)
        big = applied.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        pixels = (big * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        left, top = (i % cols) * (side_w + GAP), LINE_HEIGHT + 6 + (i // cols) * cell_h
        name = effect.predictions[i]
        hit = name == effect.class_name
        draw.text((left + 1, top), _clip(_ascii(name), max(4, side_w // 6)), fill=MODEL_COLOUR if hit else (0, 0, 0), font=font)
        img.paste(Image.fromarray(pixels), (left, top + LINE_HEIGHT + 2))
    return img


def save_effect_images(
    effects: tuple[TriggerEffect, ...], triggers: dict[str, torch.Tensor], images: torch.Tensor | None, out_dir: Path
) -> dict[str, tuple[str, str]]:
    """Write each effect's chart (and, with ``images`` and its trigger, its grid) under
    ``out_dir/triggers`` (the folder :func:`gatekeeper.report.images.save_trigger_images` made safe).

    Returns:
        class name -> (chart path, grid path or ""), POSIX and relative to ``out_dir``.
    """
    trig_dir = (Path(out_dir) / TRIGGER_DIR).resolve()
    trig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[str, str]] = {}
    for effect in effects:
        stem = safe_name(effect.class_name)
        chart = f"{TRIGGER_DIR}/{stem}-effect.png"
        atomic_write_bytes(trig_dir / f"{stem}-effect.png", _png_bytes(effect_chart(effect)))
        grid = ""
        delta = triggers.get(effect.class_name)
        if images is not None and delta is not None and effect.predictions:
            grid = f"{TRIGGER_DIR}/{stem}-grid.png"
            atomic_write_bytes(trig_dir / f"{stem}-grid.png", _png_bytes(effect_grid(effect, delta, images)))
        written[effect.class_name] = (chart, grid)
    return written
