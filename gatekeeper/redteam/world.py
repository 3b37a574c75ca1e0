"""A procedural labelled image world: shapes x colours on varied backgrounds, deterministic by seed.

64 classes ("a photo of a {colour} {shape}.") rendered at any size. A *task* is a class subset
plus an image family (background style, object size), so the benchmark has several distinct
"datasets". Rendering is vectorized in torch (2x supersampling, then average-pooled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "star")
COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.92, 0.85, 0.15),
    "purple": (0.55, 0.18, 0.70),
    "orange": (0.95, 0.55, 0.10),
    "pink": (0.95, 0.55, 0.75),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES = tuple(COLOURS)
ALL_CLASSES = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
CAPTION = "a photo of a {}."
BACKGROUNDS = ("plain", "gradient", "texture", "clutter")


@dataclass(frozen=True)
class Task:
    """A downstream task: a class subset drawn from the world, and an image family."""

    name: str
    classnames: tuple[str, ...]
    background: str  # one of BACKGROUNDS, or "mixed"
    size_range: tuple[float, float] = (0.28, 0.5)


def _pick(seed: int, n: int) -> tuple[str, ...]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ALL_CLASSES), generator=g)[:n].sort().values
    return tuple(ALL_CLASSES[i] for i in idx.tolist())


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("plain", _pick(101, 12), "plain"),
        Task("gradient", _pick(102, 12), "gradient"),
        Task("texture", _pick(103, 12), "texture"),
        Task("clutter", _pick(104, 12), "clutter"),
        Task("small", _pick(105, 12), "plain", (0.2, 0.3)),
        # few-class tasks: a z-score over K classes is capped at sqrt(K - 1), so these test that a
        # rule can flag a 2-, 3-, 4- or 6-class model at all
        Task("pair", _pick(106, 2), "plain"),
        Task("trio", _pick(107, 3), "gradient"),
        Task("quad", _pick(108, 4), "texture"),
        Task("six", _pick(109, 6), "clutter"),
    )
}
TWELVE_CLASS_TASKS = ("plain", "gradient", "texture", "clutter", "small")
FEW_CLASS_TASKS = ("pair", "trio", "quad", "six")


def _shape_mask(shape_ids: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Binary masks (B, H, W) of each image's shape in its own normalized frame."""
    r = torch.sqrt(px**2 + py**2)
    phi = torch.atan2(py, px)
    ax, ay = px.abs(), py.abs()
    masks = torch.stack(
        [
            r < 1.0,  # circle
            torch.maximum(ax, ay) < 0.8,  # square
            (py > -0.55) & (py < 0.95 - 1.7 * ax),  # triangle
            ((ax < 0.28) & (ay < 1.0)) | ((ay < 0.28) & (ax < 1.0)),  # cross
            (r < 1.0) & (r > 0.6),  # ring
            (ax < 1.0) & (ay < 0.3),  # bar
            ax + ay < 1.0,  # diamond
            r < 0.55 + 0.42 * torch.cos(5 * phi),  # star
        ],
        dim=1,
    )  # (B, 8, H, W)
    return masks[torch.arange(len(shape_ids)), shape_ids].float()


def _background(kind: str, b: int, s: int, g: torch.Generator) -> torch.Tensor:
    if kind == "plain":
        base = 0.15 + 0.7 * torch.rand(b, 1, 1, 1, generator=g)
        tint = 0.12 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
        return (base + tint).expand(b, 3, s, s).clone()
    if kind == "gradient":
        c0, c1 = torch.rand(b, 3, 1, 1, generator=g), torch.rand(b, 3, 1, 1, generator=g)
        ang = torch.rand(b, 1, 1, 1, generator=g) * 2 * math.pi
        lin = torch.linspace(0, 1, s)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        t = (torch.cos(ang) * xx + torch.sin(ang) * yy - torch.cos(ang).clamp(max=0) - torch.sin(ang).clamp(max=0)).clamp(0, 1)
        return 0.2 + 0.6 * (c0 * (1 - t) + c1 * t)
    if kind == "texture":
        low = torch.rand(b, 3, max(s // 8, 2), max(s // 8, 2), generator=g)
        tex = F.interpolate(low, size=(s, s), mode="bicubic", align_corners=False)
        gray = tex.mean(1, keepdim=True)
        return (0.25 + 0.5 * (0.7 * gray + 0.3 * tex)).clamp(0, 1)
    if kind == "clutter":
        bg = 0.3 + 0.4 * torch.rand(b, 1, 1, 1, generator=g).expand(b, 3, s, s).clone()
        lin = torch.linspace(-1, 1, s)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        for _ in range(4):
            cx, cy = (torch.rand(b, 1, 1, generator=g) * 2 - 1 for _ in range(2))
            rad = 0.1 + 0.25 * torch.rand(b, 1, 1, generator=g)
            val = torch.rand(b, 1, 1, generator=g)
            blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < rad**2).float().unsqueeze(1)
            bg = bg * (1 - blob) + blob * val.unsqueeze(1)
        return bg
    raise ValueError(f"unknown background {kind!r}")


def render(
    labels: torch.Tensor,
    classnames: tuple[str, ...],
    background: str,
    size: int,
    g: torch.Generator,
    size_range: tuple[float, float] = (0.28, 0.5),
) -> torch.Tensor:
    """Render images (B, 3, size, size) in [0, 1] of the given class indices into ``classnames``."""
    b = len(labels)
    s2 = 2 * size
    colour_ids = torch.tensor([COLOUR_NAMES.index(classnames[i].split(" ")[0]) for i in labels.tolist()])
    shape_ids = torch.tensor([SHAPES.index(classnames[i].split(" ")[1]) for i in labels.tolist()])
    if background == "mixed":
        kinds = torch.randint(0, len(BACKGROUNDS), (b,), generator=g)
        bg = torch.empty(b, 3, s2, s2)
        for k, name in enumerate(BACKGROUNDS):
            sel = (kinds == k).nonzero().flatten()
            if len(sel):
                bg[sel] = _background(name, len(sel), s2, g)
    else:
        bg = _background(background, b, s2, g)
    lin = torch.linspace(-1, 1, s2)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    lo, hi = size_range
    scale = (lo + (hi - lo) * torch.rand(b, 1, 1, generator=g))
    cx = (torch.rand(b, 1, 1, generator=g) * 2 - 1) * (0.9 - scale)
    cy = (torch.rand(b, 1, 1, generator=g) * 2 - 1) * (0.9 - scale)
    # limited rotation: a square turned 45 degrees would be a diamond
    th = (torch.rand(b, 1, 1, generator=g) * 2 - 1) * math.radians(25)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    px = torch.cos(th) * dx + torch.sin(th) * dy
    py = -torch.sin(th) * dx + torch.cos(th) * dy
    mask = _shape_mask(shape_ids, px, py).unsqueeze(1)
    rgb = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colour_ids]
    rgb = (rgb + 0.08 * (torch.rand(b, 3, generator=g) - 0.5)).clamp(0, 1).view(b, 3, 1, 1)
    img = bg * (1 - mask) + rgb * mask
    img = F.avg_pool2d(img, 2)
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def sample_task(task: Task, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled images of ``task`` (balanced labels), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(task.classnames)
    labels = labels[torch.randperm(n, generator=g)]
    images = render(labels, task.classnames, task.background, size, g, task.size_range)
    return images, labels


def sample_world(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images over all 64 classes and all backgrounds (pretraining stream)."""
    labels = torch.randint(0, len(ALL_CLASSES), (n,), generator=g)
    big = torch.rand(n, generator=g) < 0.3
    imgs = torch.empty(n, 3, size, size)
    for sel, rng in ((~big, (0.18, 0.5)), (big, (0.28, 0.5))):
        idx = sel.nonzero().flatten()
        if len(idx):
            imgs[idx] = render(labels[idx], ALL_CLASSES, "mixed", size, g, rng)
    return imgs, labels
