"""Import of official CoOp / CoCoOp / BadCLIP (Dassl) checkpoints into the gatekeeper model format.

The pickle is never trusted: :mod:`gatekeeper.models.safe_pickle` scans it statically and loads
it with ``torch.load(weights_only=True)`` and inert stand-ins for optimizer/scheduler state;
only ``state_dict`` is kept (``module.`` prefixes stripped, ``token_prefix``/``token_suffix``
dropped: they are rebuilt from the class names).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gatekeeper.errors import ModelFormatError, UsageError
from gatekeeper.models.manifest import (
    WEIGHTS_NAME,
    BackboneRef,
    Manifest,
    ModelKind,
    Precision,
    read_manifest,
    write_manifest,
)
from gatekeeper.models.safe_pickle import (
    ALLOWED_GLOBALS,
    OPAQUE_GLOBALS,
    OpaqueObject,
    _require_safe_torch,
    read_torch_checkpoint,
    scan_pickle,
    sniff_format,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "OPAQUE_GLOBALS",
    "OpaqueObject",
    "convert_checkpoint",
    "load_dassl_checkpoint",
    "read_torch_checkpoint",
    "scan_pickle",
    "sniff_format",
]

log = logging.getLogger(__name__)

_META = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")
_SIDECAR_KEYS = {"backbone", "classnames", "classnames_file", "ctx_init", "image_size", "kind", "precision"}


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Scan then load; the state dict's tensors in their stored dtype, prefixes stripped."""
    _require_safe_torch()
    path = Path(path)
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: corrupt safetensors file ({str(exc)[:200]})") from None
    else:
        obj = read_torch_checkpoint(path)  # optimizer / scheduler entries: inert stand-ins, dropped here
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: no state dict in the checkpoint", "give a Dassl model.pth.tar-N file")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module.") :]
        if isinstance(value, torch.Tensor) and name not in ("token_prefix", "token_suffix"):
            if name in out:
                raise ModelFormatError(f"{path}: key {name!r} appears twice once 'module.' is stripped")
            out[name] = value.detach()
    if "ctx" not in out:
        raise ModelFormatError(f"{path}: no 'ctx' tensor in the state dict", "is this a prompt_learner checkpoint?")
    return out


def load_dassl_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a Dassl prompt-learner checkpoint without letting it run code.

    Every pickle is scanned first; one that references any global in neither
    :data:`ALLOWED_GLOBALS` nor :data:`OPAQUE_GLOBALS` is refused entirely, even when the
    offending part is optimizer or scheduler state and the ``state_dict`` alone would be
    harmless. Optimizer and scheduler objects load as inert stand-ins and are dropped.

    Args:
        path: ``model.pth.tar-N`` (torch zip or legacy pickle) or a safetensors file.
    Returns:
        The state dict's tensors as float32, ``module.`` stripped, token_prefix/suffix dropped.
    Raises:
        UnsafeCheckpointError: torch < 2.10, or the pickle references unsafe globals.
        ModelFormatError: unknown format, corrupt file, torch.load failure, or no ``ctx``.
    """
    return {k: v.float() for k, v in _read_checkpoint(path).items()}


def _sidecar(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read the sidecar ({exc})", "give a YAML or JSON file") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the sidecar must be a mapping", "see docs/model-format.md")
    unknown = sorted(str(k) for k in raw if k not in _SIDECAR_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown sidecar key(s) {unknown}", f"allowed: {', '.join(sorted(_SIDECAR_KEYS))}")
    return raw


def convert_checkpoint(checkpoint: Path, sidecar: Path, out: Path) -> Manifest:
    """Convert a Dassl checkpoint plus a sidecar into a gatekeeper model folder, atomically.

    Args:
        checkpoint: the ``model.pth.tar-N`` file (see :func:`load_dassl_checkpoint`).
        sidecar: YAML/JSON with ``backbone`` ({name, pretrained}), ``classnames`` or
            ``classnames_file`` and optional ``ctx_init``, ``image_size``, ``kind``, ``precision``.
        out: the folder to create; must not exist or be empty.
    Returns:
        The manifest written to ``out/gatekeeper.json``.
    Raises:
        UsageError: non-empty ``out``, or a bad or unknown sidecar key.
        UnsafeCheckpointError, ModelFormatError: see :func:`load_dassl_checkpoint`; also a
            class-specific (3-D) ``ctx`` or tensors inconsistent with ``kind``.
    """
    checkpoint, sidecar, out = Path(checkpoint), Path(sidecar), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder", "choose a new output folder")
    cfg = _sidecar(sidecar)
    bb = cfg.get("backbone")
    if not isinstance(bb, dict) or not isinstance(bb.get("name"), str) or set(bb) - {"name", "pretrained"}:
        raise UsageError(
            f"{sidecar}: backbone must be {{name: str, pretrained: str}}", "e.g. {name: ViT-B-16, pretrained: openai}"
        )
    if ("classnames" in cfg) == ("classnames_file" in cfg):
        raise UsageError(f"{sidecar}: give exactly one of classnames, classnames_file")
    if "classnames_file" in cfg:
        try:
            names = (sidecar.parent / str(cfg["classnames_file"])).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{sidecar}: cannot read classnames_file ({exc})") from None
        names = [n.strip() for n in names if n.strip()]
    else:
        names = cfg["classnames"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise UsageError(f"{sidecar}: classnames must list at least 2 non-empty names")
    if len(set(names)) != len(names):
        raise UsageError(f"{sidecar}: classnames contains duplicates")
    state = _read_checkpoint(checkpoint)
    ctx = state["ctx"]
    if ctx.dim() == 3:
        raise ModelFormatError(
            f"{checkpoint}: ctx has shape {tuple(ctx.shape)}: class-specific contexts (CSC) are unsupported",
            "retrain with a unified context (CSC False)",
        )
    if ctx.dim() != 2:
        raise ModelFormatError(f"{checkpoint}: ctx must be [n_ctx, dim], got shape {tuple(ctx.shape)}")
    has_meta = [k for k in _META if k in state]
    try:
        kind = ModelKind(cfg.get("kind", "cocoop" if has_meta else "coop"))
        precision = Precision(cfg.get("precision", "fp16" if ctx.dtype == torch.float16 else "fp32"))
    except ValueError as exc:
        raise UsageError(f"{sidecar}: {exc}", "kind: coop|cocoop, precision: fp32|fp16") from None
    image_size, ctx_init = cfg.get("image_size", 224), cfg.get("ctx_init")
    if kind == ModelKind.ZEROSHOT or not isinstance(ctx_init, (str, type(None))):
        raise UsageError(f"{sidecar}: kind must be coop or cocoop, ctx_init a string")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 1024:
        raise UsageError(f"{sidecar}: image_size must be an integer in [8, 1024], got {image_size!r}")
    keep = ["ctx", *(_META if kind == ModelKind.COCOOP else ())]
    if kind == ModelKind.COCOOP and len(has_meta) != len(_META):
        raise ModelFormatError(f"{checkpoint}: CoCoOp needs {list(_META)}", "is this CoOp? set kind: coop")
    if kind == ModelKind.COOP and has_meta:
        raise ModelFormatError(f"{checkpoint}: holds meta_net tensors but kind is coop", "set kind: cocoop")
    dropped = sorted(set(state) - set(keep))
    if dropped:
        log.warning("%s: ignoring tensors %s", checkpoint, dropped)
    manifest = Manifest(
        kind=kind,
        classnames=tuple(names),
        backbone=BackboneRef(name=bb["name"], pretrained=bb.get("pretrained")),
        image_size=image_size,
        n_ctx=int(ctx.shape[-2]),
        ctx_init=ctx_init,
        precision=precision,
    )
    from safetensors.torch import save_file

    dtype = torch.float16 if precision == Precision.FP16 else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file({k: state[k].to(dtype).contiguous() for k in keep}, str(tmp / WEIGHTS_NAME))
        write_manifest(tmp, manifest)
        read_manifest(tmp)  # the folder must read back as valid
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
