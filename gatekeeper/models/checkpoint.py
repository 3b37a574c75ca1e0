"""Import of official CoOp / CoCoOp / BadCLIP (Dassl) checkpoints into the gatekeeper model format.

The pickle is never trusted: :mod:`gatekeeper.models.safe_pickle` scans it statically and loads
it with ``torch.load(weights_only=True)`` and inert stand-ins for optimizer/scheduler state;
only ``state_dict`` is kept (``module.`` prefixes stripped, ``token_prefix``/``token_suffix``
dropped: they are rebuilt from the class names).

Nothing from the provider is trusted to be small: a tensor is copied (to its dtype, contiguous)
only once its view is known to fit in the bytes it was loaded from (a stride-0 "expanded"
tensor of 1 stored element can claim billions), ``ctx`` and the meta-net have bounded shapes,
tensors that are dropped are never copied, and the sidecar (read with
:func:`gatekeeper.untrusted.load_yaml`) can only name a class-names file inside its own folder.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from pathlib import Path, PureWindowsPath
from typing import Any

import torch

from gatekeeper._io import atomic_folder
from gatekeeper.errors import ModelFormatError, UsageError
from gatekeeper.models.manifest import (
    MAX_CLASSES,
    MAX_CLASSNAME_CHARS,
    MAX_N_CTX,
    MAX_PROMPT_LEARNER_BYTES,
    WEIGHTS_NAME,
    BackboneRef,
    ClassTokenPosition,
    Manifest,
    ModelKind,
    Precision,
    option_problem,
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
from gatekeeper.untrusted import CONTROL, DocumentError, inert, load_yaml, short

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
_SIDECAR_KEYS = {
    "backbone",
    "class_token_position",
    "classnames",
    "classnames_file",
    "ctx_init",
    "image_size",
    "kind",
    "precision",
}
_MAX_DIM = 8192  # widths: ctx (text width, 512/768) and meta-net (image width, 512..1024, and its /16)
_MAX_META_NUMEL = 2**24  # elements of each meta-net tensor (ViT-L: 1024 x 64)
_MAX_CLASSNAMES_FILE = 2**20  # bytes
_MAX_NAME = 200  # characters of a backbone name or pretrained tag


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Scan then load; the state dict's tensors in their stored dtype, prefixes stripped, none copied."""
    _require_safe_torch()
    path = Path(path)
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: corrupt safetensors file ({inert(exc, 200)})") from None
    else:
        obj = read_torch_checkpoint(path)  # optimizer / scheduler entries: inert stand-ins, dropped here
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: no state dict in the checkpoint", "give a Dassl model.pth.tar-N file")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(key, str):
            raise ModelFormatError(f"{path}: the state dict has a non-string key {short(key)}")
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        if name not in ("token_prefix", "token_suffix"):
            if name in out:
                raise ModelFormatError(f"{path}: key {short(name)} appears twice once 'module.' is stripped")
            out[name] = value.detach()  # a view: nothing is copied here
    if "ctx" not in out:
        raise ModelFormatError(f"{path}: no 'ctx' tensor in the state dict", "is this a prompt_learner checkpoint?")
    return out


def _check_view(where: Path, name: str, t: torch.Tensor) -> None:
    """Refuse a tensor whose copy would be larger than the stored bytes it views.

    torch.load rebuilds a tensor as a view (size, stride, offset) of a storage: a stride of 0
    (an "expanded" tensor) or strides that overlap let a few stored bytes claim a huge shape,
    which ``.to(dtype).contiguous()`` would then allocate. A view is accepted only if its
    elements are distinct (sorted by stride, each stride is at least the span of the smaller
    dimensions) and inside its storage; it then copies to at most the bytes it was loaded from.
    """
    shape, strides = tuple(int(n) for n in t.shape), tuple(int(s) for s in t.stride())
    label = f"{where}: tensor {short(name)} of shape {short(list(shape))}"
    hint = "re-save the state_dict with plain tensors (tensor.clone() or .contiguous() before torch.save)"
    if t.layout != torch.strided:
        raise ModelFormatError(f"{label} has layout {t.layout}, not a dense tensor", hint)
    if 0 in shape:
        return
    span = 1  # elements spanned by the dimensions seen so far
    for stride, size in sorted((s, n) for s, n in zip(strides, shape, strict=True) if n > 1):
        if stride < span:
            raise ModelFormatError(
                f"{label} is an expanded or overlapping view (strides {short(list(strides))}): copying it would take "
                f"{math.prod(shape) * t.element_size()} bytes from {t.untyped_storage().nbytes()} stored",
                hint,
            )
        span += stride * (size - 1)
    if (t.storage_offset() + span) * t.element_size() > t.untyped_storage().nbytes():
        raise ModelFormatError(f"{label} reaches past the end of its storage", hint)


def _check_shapes(checkpoint: Path, state: dict[str, torch.Tensor], keep: list[str]) -> None:
    """Bound ``ctx`` and the meta-net (consistent with ctx's width), then check each kept view."""
    dim = int(state["ctx"].shape[-1])
    if len(keep) > 1:
        w1, b1, w2, b2 = (state[k] for k in _META)
        shapes = {k.removeprefix("meta_net."): tuple(state[k].shape) for k in _META}
        hidden = int(w1.shape[0]) if w1.dim() == 2 else -1
        visual = int(w1.shape[1]) if w1.dim() == 2 else -1
        if (
            not (1 <= hidden <= _MAX_DIM and 1 <= visual <= _MAX_DIM)
            or tuple(b1.shape) != (hidden,)
            or tuple(w2.shape) != (dim, hidden)
            or tuple(b2.shape) != (dim,)
            or any(math.prod(shape) > _MAX_META_NUMEL for shape in shapes.values())
        ):
            raise ModelFormatError(
                f"{checkpoint}: meta_net shapes {short(shapes, 240)} do not fit a CoCoOp meta-net for ctx width {dim} "
                f"(linear1 [h, v], linear2 [{dim}, h], h and v <= {_MAX_DIM})",
                "is this a CoCoOp prompt learner? else set kind: coop",
            )
    for key in keep:
        t = state[key]
        if not t.is_floating_point():
            raise ModelFormatError(f"{checkpoint}: {key} has dtype {t.dtype}, not a floating-point tensor")
        _check_view(checkpoint, key, t)


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
    state = _read_checkpoint(path)
    for key, value in state.items():  # each is copied by .float() (unless already float32)
        _check_view(Path(path), key, value)
    return {k: v.float() for k, v in state.items()}


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(path, "the sidecar")
    except DocumentError as exc:
        raise UsageError(
            f"{path}: {inert(exc, 300)}", "give a small YAML or JSON mapping (see docs/model-format.md)"
        ) from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the sidecar must be a mapping", "see docs/model-format.md")
    unknown = sorted(short(k, 40) for k in raw if k not in _SIDECAR_KEYS)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UsageError(f"{path}: unknown sidecar key(s) {shown}", f"allowed: {', '.join(sorted(_SIDECAR_KEYS))}")
    return raw


def _read_classnames_file(sidecar: Path, value: Any) -> str:
    """The text of ``classnames_file``: a regular file inside the sidecar's folder, at most 1 MiB of UTF-8."""
    hint = "give the path of a text file next to the sidecar, relative to its folder (e.g. classnames.txt)"
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{sidecar}: classnames_file must be a relative path, got {short(value)}", hint)
    rel = Path(value)
    if rel.is_absolute() or PureWindowsPath(value).drive or value.startswith(("/", "\\")) or ".." in rel.parts:
        raise UsageError(f"{sidecar}: classnames_file {short(value)} must stay inside the sidecar's folder", hint)
    base = sidecar.absolute().parent.resolve()
    try:
        target = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, or a symlink loop
        raise UsageError(f"{sidecar}: cannot read classnames_file {short(value)} ({inert(exc, 120)})", hint) from None
    if not target.is_relative_to(base):
        raise UsageError(f"{sidecar}: classnames_file {short(value)} resolves outside the sidecar's folder", hint)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)  # a FIFO must not block
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise UsageError(f"{sidecar}: cannot read classnames_file {short(value)} ({exc.strerror})", hint) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{sidecar}: classnames_file {short(value)} is not a regular file", hint)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_CLASSNAMES_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_CLASSNAMES_FILE:
        raise UsageError(f"{sidecar}: classnames_file {short(value)} is larger than 1 MiB", hint)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{sidecar}: classnames_file {short(value)} is not UTF-8 text", hint) from None


def _classnames(sidecar: Path, cfg: dict[str, Any]) -> list[str]:
    """The class names (from ``classnames`` or ``classnames_file``, one per line), stripped and checked."""
    if ("classnames" in cfg) == ("classnames_file" in cfg):
        raise UsageError(f"{sidecar}: give exactly one of classnames, classnames_file")
    if "classnames_file" in cfg:
        names = [n.strip() for n in _read_classnames_file(sidecar, cfg["classnames_file"]).split("\n")]
        names = [n for n in names if n]
    else:
        names = cfg["classnames"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{sidecar}: classnames must be a list of strings, got {short(names)}")
        names = [n.strip() for n in names]
    if len(names) > MAX_CLASSES:
        raise UsageError(f"{sidecar}: {len(names)} class names, more than {MAX_CLASSES}")
    for n in names:
        if len(n) > MAX_CLASSNAME_CHARS:
            raise UsageError(f"{sidecar}: class name {short(n)} is longer than {MAX_CLASSNAME_CHARS} characters")
        if CONTROL.search(n):
            raise UsageError(f"{sidecar}: class name {short(n)} holds a control character")
    if len(names) < 2 or not all(names):
        raise UsageError(f"{sidecar}: classnames must list at least 2 non-empty names")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UsageError(f"{sidecar}: classnames contains duplicates ({short(n)})")
        seen.add(n)
    return names


def _name_ok(value: Any, optional: bool = False) -> bool:
    if optional and value is None:
        return True
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME and not CONTROL.search(value)


def _class_token_position(sidecar: Path, cfg: dict[str, Any]) -> ClassTokenPosition:
    """CoOp's class token position (Dassl's TRAINER.COOP.CLASS_TOKEN_POSITION): the checkpoint
    cannot tell it, so the sidecar names it; ``end`` when it does not."""
    value = cfg.get("class_token_position", ClassTokenPosition.END.value)
    try:
        return ClassTokenPosition(value)
    except ValueError:
        allowed = ", ".join(p.value for p in ClassTokenPosition)
        raise UsageError(
            f"{sidecar}: class_token_position {short(value)} is not one of {allowed}",
            "give the CLASS_TOKEN_POSITION the model was trained with (CoOp's default is end)",
        ) from None


def convert_checkpoint(checkpoint: Path, sidecar: Path, out: Path) -> Manifest:
    """Convert a Dassl checkpoint plus a sidecar into a gatekeeper model folder, atomically.

    Args:
        checkpoint: the ``model.pth.tar-N`` file (see :func:`load_dassl_checkpoint`).
        sidecar: YAML/JSON with ``backbone`` ({name, pretrained}), ``classnames`` (a list) or
            ``classnames_file`` (a text file in the sidecar's folder, one name per line) and
            optional ``ctx_init``, ``image_size``, ``kind``, ``precision`` and
            ``class_token_position`` (CoOp's ``end``, ``middle`` or ``front``; default ``end``).
        out: the folder to create; must not exist or be empty.
    Returns:
        The manifest written to ``out/gatekeeper.json``.
    Raises:
        UsageError: non-empty ``out``; an unreadable, oversize or malformed sidecar (aliases
            expanding too far, a repeated key); a bad or unknown sidecar key; a
            ``classnames_file`` outside the sidecar's folder, not a regular file, over 1 MiB or
            not UTF-8; class names that are too many, too long or hold control characters; a
            ``class_token_position`` other than ``end`` for CoCoOp.
        UnsafeCheckpointError, ModelFormatError: see :func:`load_dassl_checkpoint`; also
            ``ctx`` or meta-net shapes out of bounds or inconsistent, class-specific (3-D)
            ``ctx`` on a CoCoOp model or for another number of classes than the sidecar lists,
            a prompt learner over :data:`MAX_PROMPT_LEARNER_BYTES`, a kept tensor that is an
            expanded or overlapping view, or tensors inconsistent with ``kind``.
    """
    checkpoint, sidecar, out = Path(checkpoint), Path(sidecar), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder", "choose a new output folder")
    cfg = _sidecar(sidecar)
    bb = cfg.get("backbone")
    if (
        not isinstance(bb, dict)
        or set(bb) - {"name", "pretrained"}
        or not _name_ok(bb.get("name"))
        or not _name_ok(bb.get("pretrained"), optional=True)
    ):
        raise UsageError(
            f"{sidecar}: backbone must be {{name: str, pretrained: str}}, got {short(bb)}",
            "e.g. {name: ViT-B-16, pretrained: openai}",
        )
    names = _classnames(sidecar, cfg)
    state = _read_checkpoint(checkpoint)
    ctx = state["ctx"]
    csc = ctx.dim() == 3  # CoOp's class-specific contexts: [classes, n_ctx, dim]
    if ctx.dim() not in (2, 3) or not (1 <= ctx.shape[-2] <= MAX_N_CTX and 1 <= ctx.shape[-1] <= _MAX_DIM):
        raise ModelFormatError(
            f"{checkpoint}: ctx must be [n_ctx, dim] (or [classes, n_ctx, dim] with class-specific contexts) "
            f"with n_ctx <= {MAX_N_CTX} and dim <= {_MAX_DIM}, got shape {short(tuple(ctx.shape))}",
            "give the prompt learner checkpoint of a CoOp/CoCoOp model",
        )
    if csc and ctx.shape[0] != len(names):
        raise ModelFormatError(
            f"{checkpoint}: ctx has shape {short(tuple(ctx.shape))}: class-specific contexts for {ctx.shape[0]} "
            f"classes, but the sidecar lists {len(names)} class names",
            "list the class names the model was trained on, in its label order",
        )
    has_meta = [k for k in _META if k in state]
    try:
        kind = ModelKind(cfg.get("kind", "cocoop" if has_meta else "coop"))
        precision = Precision(cfg.get("precision", "fp16" if ctx.dtype == torch.float16 else "fp32"))
    except ValueError:
        raise UsageError(
            f"{sidecar}: kind {short(cfg.get('kind'))} or precision {short(cfg.get('precision'))} is not valid",
            "kind: coop|cocoop, precision: fp32|fp16",
        ) from None
    image_size, ctx_init = cfg.get("image_size", 224), cfg.get("ctx_init")
    if kind == ModelKind.ZEROSHOT or not isinstance(ctx_init, (str, type(None))):
        raise UsageError(f"{sidecar}: kind must be coop or cocoop, ctx_init a string")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 1024:
        raise UsageError(f"{sidecar}: image_size must be an integer in [8, 1024], got {short(image_size)}")
    keep = ["ctx", *(_META if kind == ModelKind.COCOOP else ())]
    if kind == ModelKind.COCOOP and len(has_meta) != len(_META):
        raise ModelFormatError(f"{checkpoint}: CoCoOp needs {list(_META)}", "is this CoOp? set kind: coop")
    if kind == ModelKind.COOP and has_meta:
        raise ModelFormatError(f"{checkpoint}: holds meta_net tensors but kind is coop", "set kind: cocoop")
    position = _class_token_position(sidecar, cfg)
    problem = option_problem(kind, csc, position)
    if problem and csc:
        raise ModelFormatError(f"{checkpoint}: ctx has shape {short(tuple(ctx.shape))}: {problem}", "is this CoOp? set kind: coop")
    if problem:
        raise UsageError(f"{sidecar}: {problem}", "remove class_token_position (or set it to end) for a CoCoOp model")
    _check_shapes(checkpoint, state, keep)  # before anything is copied; dropped tensors are never copied
    size = sum(math.prod(state[k].shape) for k in keep) * (2 if precision == Precision.FP16 else 4)
    if size > MAX_PROMPT_LEARNER_BYTES:
        raise ModelFormatError(
            f"{checkpoint}: the prompt learner would take {size} bytes as {precision.value}, more than a model "
            f"folder holds ({MAX_PROMPT_LEARNER_BYTES >> 20} MiB)",
            "set precision: fp16" if precision == Precision.FP32 else "is this a prompt learner checkpoint?",
        )
    dropped = sorted(set(state) - set(keep))
    if dropped:
        log.warning("%s: ignoring tensors %s", checkpoint, inert(", ".join(dropped)))
    manifest = Manifest(
        kind=kind,
        classnames=tuple(names),
        backbone=BackboneRef(name=bb["name"], pretrained=bb.get("pretrained")),
        image_size=image_size,
        n_ctx=int(ctx.shape[-2]),
        ctx_init=ctx_init,
        precision=precision,
        csc=csc,
        class_token_position=position,
    )
    from safetensors.torch import save_file

    dtype = torch.float16 if precision == Precision.FP16 else torch.float32
    with atomic_folder(out) as tmp:  # out is absent or empty (checked above)
        save_file({k: state[k].to(dtype).contiguous() for k in keep}, str(tmp / WEIGHTS_NAME))
        write_manifest(tmp, manifest)
        read_manifest(tmp)  # the folder must read back as valid
    return manifest
