"""OOD pools: ``dir:PATH`` (any image Pillow reads) or ``procedural[:SEED]`` (built in, no data needed).

The pool is split into the inversion set D and a disjoint hold-out T for ASR (docs/method.md,
"Trigger inversion").
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gatekeeper.errors import PoolError, UsageError
from gatekeeper.result import PoolInfo
from gatekeeper.untrusted import short

PROCEDURAL = "procedural"
DIR = "dir:"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class OODPool:
    inversion: torch.Tensor  # D: (N, 3, S, S) in [0, 1]
    holdout: torch.Tensor  # T: (M, 3, S, S), disjoint from D
    info: PoolInfo


def check_spec(spec: str) -> None:
    """Validate a pool spec's syntax (before any model is fetched).

    Raises:
        UsageError: not ``procedural[:SEED]`` (SEED a decimal integer below 2**31) or ``dir:PATH``
            naming an existing folder.
    """
    if spec == PROCEDURAL:
        return
    if spec.startswith(PROCEDURAL + ":"):
        seed = spec.split(":", 1)[1]
        if re.fullmatch(r"[0-9]{1,10}", seed) and int(seed) < 2**31:
            return
        raise UsageError(f"OOD seed in {short(spec)} is not an integer in [0, 2**31)", "write e.g. --ood procedural:7")
    if spec.startswith(DIR) and len(spec) > len(DIR):
        root = Path(spec[len(DIR) :]).expanduser()
        if root.is_dir():
            return
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(f"OOD folder {short(str(root))} {what}", "give dir:PATH to a folder of images")
    raise UsageError(
        f"OOD source {short(spec)} is not understood",
        "use --ood procedural (built in) , procedural:SEED, or dir:PATH to a folder of images",
    )


# ---------------------------------------------------------------------------- procedural


def dead_leaves(n: int, size: int, g: torch.Generator, n_discs: int = 48) -> torch.Tensor:
    """Dead-leaves images: occluding discs, power-law radii, random colours (natural-image-like)."""
    lin = (torch.arange(size) + 0.5) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    img = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size).clone()
    for _ in range(n_discs):
        cx, cy = torch.rand(n, 1, 1, generator=g), torch.rand(n, 1, 1, generator=g)
        # r ~ power law with exponent -3 between 0.02 and 0.5 (inverse-CDF sampling)
        u = torch.rand(n, 1, 1, generator=g)
        rmin, rmax = 0.02, 0.5
        r = 1 / torch.sqrt(u / rmax**2 + (1 - u) / rmin**2)
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2).unsqueeze(1).float()
        colour = torch.rand(n, 3, 1, 1, generator=g)
        img = img * (1 - mask) + colour * mask
    return img


def spectral_noise(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Coloured 1/f^alpha noise, alpha in [1, 2.5], with correlated channels."""
    f = torch.fft.fftfreq(size)
    fr = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).clamp(min=1.0 / size)
    alpha = 1.0 + 1.5 * torch.rand(n, 1, 1, 1, generator=g)
    amp = fr.view(1, 1, size, size) ** (-alpha)
    phase = torch.rand(n, 1, size, size, generator=g) * 2 * math.pi
    mix = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.4
    base = torch.fft.ifft2(amp * torch.exp(1j * phase)).real  # (n, 1, s, s)
    own = torch.fft.ifft2(amp * torch.exp(1j * torch.rand(n, 3, size, size, generator=g) * 2 * math.pi)).real
    x = mix * base + (1 - mix) * own
    x = x - x.mean(dim=(2, 3), keepdim=True)
    x = x / (x.std(dim=(2, 3), keepdim=True) + 1e-8)
    centre = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    return (centre + 0.18 * x).clamp(0, 1)


def procedural_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` images, half dead leaves and half spectral noise, interleaved; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    half = (n + 1) // 2
    leaves = dead_leaves(half, size, g)
    noise = spectral_noise(n - half, size, g)
    out = torch.empty(n, 3, size, size)
    out[0::2] = leaves
    out[1::2] = noise
    return out


# ---------------------------------------------------------------------------- folder


# (resize mode, interpolation) of open_clip's preprocess_cfg when the backbone states none
DEFAULT_RESIZE = ("shortest", "bicubic")


def _to_tensor(img: object, size: int, resize: tuple[str, str] = DEFAULT_RESIZE) -> torch.Tensor:
    """An RGB uint8 (3, size, size) image fitted as the backbone's preprocessing fits it: ``shortest``
    side to ``size`` then a center crop, ``longest`` side to ``size`` then centered on black, or
    ``squash`` to size x size."""
    import numpy as np
    from PIL import Image

    assert isinstance(img, Image.Image)
    mode, interpolation = resize
    resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
    img = img.convert("RGB")
    w, h = img.size
    if mode == "squash":
        img = img.resize((size, size), resample)
    elif mode == "longest":
        scale = size / max(w, h)
        img = img.resize((max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))), resample)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
        img = canvas
    else:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def folder_images(
    root: Path, size: int, limit: int, resize: tuple[str, str] = DEFAULT_RESIZE
) -> tuple[torch.Tensor, int, int]:
    """Read up to ``limit`` images under ``root`` (sorted, recursive); returns (uint8 images, found, skipped).

    Each is fitted to ``size`` by ``resize`` = (resize mode, interpolation) (:func:`_to_tensor`).
    Unreadable files are skipped and counted, not fatal.
    """
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise PoolError(f"OOD folder {root} does not exist", "give dir:PATH to an existing folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    images: list[torch.Tensor] = []
    skipped = 0
    for p in files:
        if len(images) >= limit:
            break
        try:
            with Image.open(p) as im:
                images.append(_to_tensor(im, size, resize))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            skipped += 1
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), 0, skipped
    return torch.stack(images), len(images), skipped


# ---------------------------------------------------------------------------- public


def load_pool(
    spec: str,
    image_size: int,
    n_inversion: int,
    n_holdout: int,
    seed: int,
    resize: tuple[str, str] = DEFAULT_RESIZE,
) -> OODPool:
    """Build the OOD pool from ``spec`` and split it into D (inversion) and T (hold-out).

    Args:
        spec: ``procedural``, ``procedural:SEED`` or ``dir:PATH``.
        image_size: the model's input size (folder images are fitted to it by ``resize``).
        resize: (resize mode, interpolation) of the backbone's preprocessing (``model.resize``),
            for ``dir:`` pools; procedural images are drawn at ``image_size``.
        n_inversion: |D| (the policy's ood_budget); n_holdout: |T|.
        seed: seeds the procedural generator (unless the spec names one) and the D/T split.

    Raises:
        PoolError: bad spec, empty folder, or fewer usable images than the policy needs.
    """
    check_spec(spec)
    need = n_inversion + n_holdout
    if spec.startswith(PROCEDURAL):
        pseed = int(spec.split(":", 1)[1]) if ":" in spec else seed
        images = procedural_images(need, image_size, pseed)
        found, skipped, source = need, 0, f"procedural:{pseed}"
        digest = hashlib.sha256((images * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
    else:
        root = Path(spec[len(DIR) :]).expanduser()
        raw, found, skipped = folder_images(root, image_size, need, resize)
        if found < need:
            raise PoolError(
                f"OOD folder {root} has {found} usable images ({skipped} unreadable skipped); "
                f"the policy needs {need} (ood_budget {n_inversion} + holdout {n_holdout})",
                "add images, or lower ood_budget/holdout in the policy",
            )
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        images = raw.float() / 255.0
        source = f"dir:{root}"
    order = torch.randperm(need, generator=torch.Generator().manual_seed(seed))
    images = images[order]
    info = PoolInfo(
        source=source,
        n_found=found,
        n_skipped=skipped,
        n_inversion=n_inversion,
        n_holdout=n_holdout,
        image_size=image_size,
        content_hash=digest,
    )
    return OODPool(inversion=images[:n_inversion].contiguous(), holdout=images[n_inversion:].contiguous(), info=info)

