"""Import of official CoOp / CoCoOp / MaPLe / BadCLIP (Dassl) checkpoints into the gatekeeper model format.

A MaPLe checkpoint is its whole CustomCLIP: the prompt learner under ``prompt_learner.`` (read as
the other trainers' bare names) and the frozen encoders, which must equal the backbone's
(:func:`_check_frozen`).

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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gatekeeper._io import atomic_folder
from gatekeeper.errors import ModelFormatError, UsageError
from gatekeeper.models.backbone import HF, LOCAL, load_backbone, local_backbone_dir
from gatekeeper.models.classtokens import recover_classnames, verify_classnames
from gatekeeper.models.manifest import (
    MAX_CLASSES,
    MAX_N_CTX,
    MAX_PROMPT_DEPTH,
    MAX_PROMPT_LEARNER_BYTES,
    WEIGHTS_NAME,
    BackboneRef,
    ClassTokenPosition,
    Manifest,
    ModelKind,
    Precision,
    option_problem,
    write_manifest,
)
from gatekeeper.models.maple import DEEP_PROJ, DEEP_TEXT, backbone_problem, maple_keys, maple_lead
from gatekeeper.models.safe_pickle import (
    ALLOWED_GLOBALS,
    OPAQUE_GLOBALS,
    OpaqueObject,
    _require_safe_torch,
    read_torch_checkpoint,
    scan_pickle,
    sniff_format,
)
from gatekeeper.models.sidecar import Sidecar, read_sidecar
from gatekeeper.untrusted import CONTROL, inert, short

__all__ = [
    "ALLOWED_GLOBALS",
    "Converted",
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
_TOKENS = ("token_prefix", "token_suffix")
_LEARNER = "prompt_learner."
_FROZEN = ("image_encoder.", "text_encoder.", "logit_scale")  # a whole CustomCLIP's frozen parts (MaPLe's checkpoints)
_MAPLE_MARKS = ("proj.weight", "proj.bias", f"{DEEP_TEXT}.", f"{DEEP_PROJ}.")
ATTACHED = "backbone"  # the model folder's subfolder an attached backbone is copied to
_BUILTIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_CONTEXT = 4096  # token positions of a text encoder (CLIP: 77)
_MAX_DIM = 8192  # widths: ctx (text width, 512/768) and meta-net (image width, 512..1024, and its /16)
_MAX_META_NUMEL = 2**24  # elements of each meta-net tensor (ViT-L: 1024 x 64)


def _read_checkpoint(path: Path, keep_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Scan then load; the state dict's tensors in their stored dtype, prefixes stripped, none copied.

    ``token_prefix``/``token_suffix`` are dropped unless ``keep_tokens`` (convert checks the class names on them).
    """
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
        # MaPLe registers its whole CustomCLIP with Dassl: the prompt learner's tensors are under
        # prompt_learner., the frozen encoders under image_encoder. / text_encoder. (_check_frozen)
        name = name.removeprefix(_LEARNER)
        if keep_tokens or name not in _TOKENS:
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
    if _META[0] in keep:
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


@dataclass(frozen=True)
class Converted:
    """A converted model folder: its manifest, and where its class names and backbone came from."""

    manifest: Manifest
    classnames_from: str
    backbone_from: str
    notes: tuple[str, ...] = ()


def _backbone_source(arg: str | Path | None, side: Sidecar) -> tuple[BackboneRef, Path | None, str]:
    """(reference to write, a folder to attach as ``local-dir:backbone`` or None, what it was).

    ``--backbone`` wins over the sidecar's; a folder is copied into the model folder, a built-in
    name (``NAME`` or ``NAME:TAG``) or ``hf-hub:org/repo`` is recorded and must load now.
    """
    hint = "give --backbone PATH (an open_clip folder: open_clip_config.json + open_clip_model.safetensors), hf-hub:org/repo or NAME:TAG"
    if arg is None:
        if side.backbone is None:
            raise UsageError(f"{side.path}: no backbone: the sidecar names none", "add backbone: to the sidecar, or " + hint)
        if side.backbone_dir is not None:
            return BackboneRef(name=f"{LOCAL}{ATTACHED}"), side.backbone_dir, f"attached from {side.backbone_dir}"
        return side.backbone, None, f"reference {side.backbone.describe()} (from the sidecar's {side.source('backbone')})"
    text = str(arg)
    if not text.strip() or len(text) > 4096 or CONTROL.search(text):
        raise UsageError(f"--backbone {short(text)} is not a folder or a backbone name", hint)
    if text.startswith(HF):
        return BackboneRef(name=text), None, f"reference {text} (--backbone)"
    if text.startswith(LOCAL):
        raise UsageError(
            f"--backbone {short(text)}: local-dir: names a folder inside a model folder, which convert creates",
            "give the backbone folder's path: convert copies it into the model folder",
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return BackboneRef(name=f"{LOCAL}{ATTACHED}"), path, f"attached from {path}"
    name, _, tag = text.partition(":")
    if "/" in text or os.sep in text or text.startswith((".", "~")) or path.exists() or not _BUILTIN.fullmatch(name):
        raise UsageError(f"--backbone {short(text)}: no such folder", hint)
    import open_clip

    if name not in open_clip.list_models():
        raise UsageError(f"--backbone {short(text)}: no such folder, and not an open_clip model name", hint)
    return BackboneRef(name=name, pretrained=tag or None), None, f"reference {text} (--backbone)"


def _attach(src: Path, dst: Path) -> None:
    """Copy a local open_clip backbone folder (checked as the loader checks it) to ``dst``."""
    checked = local_backbone_dir(src, BackboneRef(name=f"{LOCAL}."))  # only open_clip files and documents
    dst.mkdir()
    for entry in sorted(checked.iterdir()):
        shutil.copyfile(entry, dst / entry.name)  # follows links the check allowed (a Hub snapshot's blobs)


def _prompt_tokens(checkpoint: Path, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """token_prefix [K,1,d] and token_suffix [K,S,d], bounded and checked as views; None when absent."""
    if not any(k in state for k in _TOKENS):
        return None
    if not all(k in state for k in _TOKENS):
        raise ModelFormatError(f"{checkpoint}: holds one of token_prefix, token_suffix but not both")
    prefix, suffix = state["token_prefix"], state["token_suffix"]
    dim = int(state["ctx"].shape[-1])
    if (
        prefix.dim() != 3
        or suffix.dim() != 3
        or tuple(prefix.shape[1:]) != (1, dim)
        or suffix.shape[0] != prefix.shape[0]
        or suffix.shape[2] != dim
        or not 2 <= prefix.shape[0] <= MAX_CLASSES
        or not 1 <= suffix.shape[1] <= _MAX_CONTEXT
    ):
        raise ModelFormatError(
            f"{checkpoint}: token_prefix {short(tuple(prefix.shape))} and token_suffix {short(tuple(suffix.shape))} "
            f"are not [K, 1, {dim}] and [K, L, {dim}] with 2 <= K <= {MAX_CLASSES} (ctx is {dim} wide)",
            "give the prompt learner checkpoint of a CoOp/CoCoOp model",
        )
    for key, t in (("token_prefix", prefix), ("token_suffix", suffix)):
        if not t.is_floating_point():
            raise ModelFormatError(f"{checkpoint}: {key} has dtype {t.dtype}, not a floating-point tensor")
        _check_view(checkpoint, key, t)
    return prefix, suffix


def _kind_and_precision(checkpoint: Path, side: Sidecar, state: dict[str, torch.Tensor]) -> tuple[ModelKind, Precision]:
    ctx = state["ctx"]
    has_meta = [k for k in _META if k in state]
    has_maple = sorted(k for k in state if k.startswith(_MAPLE_MARKS))
    kind = side.kind or (ModelKind.MAPLE if has_maple else ModelKind.COCOOP if has_meta else ModelKind.COOP)
    precision = side.precision or (Precision.FP16 if ctx.dtype == torch.float16 else Precision.FP32)
    said = f"{side.source('kind')} in {side.path}" if side.kind else "kind"
    if kind == ModelKind.MAPLE and has_meta:
        raise ModelFormatError(f"{checkpoint}: holds CoCoOp's meta_net tensors but {said} is maple", "set kind: cocoop")
    if kind == ModelKind.MAPLE and not has_maple:
        raise ModelFormatError(
            f"{checkpoint}: {said} is maple but the checkpoint holds no MaPLe tensors (proj, {DEEP_TEXT}.i)",
            "is this CoOp or CoCoOp? set kind accordingly",
        )
    if kind != ModelKind.MAPLE and has_maple:
        raise ModelFormatError(f"{checkpoint}: holds MaPLe tensors {short(has_maple[:3])} but {said} says {kind.value}", "set kind: maple")
    if kind == ModelKind.MAPLE and side.precision != Precision.FP32 and any(
        state[k].dtype == torch.float32 for k in state if k.startswith(_MAPLE_MARKS) or k == "ctx"
    ):
        precision = Precision.FP32  # MaPLe's PREC fp16 leaves its deep prompts float32: keep them as they are
    if kind == ModelKind.COCOOP and len(has_meta) != len(_META):
        raise ModelFormatError(f"{checkpoint}: CoCoOp ({said}) needs {list(_META)}", "is this CoOp? set kind: coop")
    if kind == ModelKind.COOP and has_meta:
        raise ModelFormatError(f"{checkpoint}: holds meta_net tensors but {said} says coop", "set kind: cocoop")
    return kind, precision


def _maple_learner(checkpoint: Path, side: Sidecar, state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """(prompt depth, the tensors to keep) of a MaPLe prompt learner; every other learner tensor refused."""
    depth = 1 + sum(1 for k in state if k.startswith(f"{DEEP_TEXT}."))
    keys = maple_keys(min(depth, MAX_PROMPT_DEPTH))
    learner = {k for k in state if not k.startswith(_FROZEN) and k not in _TOKENS}
    unknown, missing = sorted(learner - set(keys)), [k for k in keys if k not in state]
    if depth > MAX_PROMPT_DEPTH or unknown or missing:
        raise ModelFormatError(
            f"{checkpoint}: not MaPLe's prompt learner of depth {depth} (at most {MAX_PROMPT_DEPTH}): "
            f"unknown tensor(s) {short(unknown[:5])}, missing {short(missing[:5])}",
            f"gatekeeper reads MaPLe's ctx, proj, {DEEP_TEXT}.i and {DEEP_PROJ}.i (docs/model-format.md)",
        )
    if side.prompt_depth is not None and side.prompt_depth != depth:
        raise ModelFormatError(
            f"{side.path}: {side.source('prompt_depth')} is {side.prompt_depth} but the checkpoint holds the prompts "
            f"of depth {depth} ({depth - 1} {DEEP_TEXT})",
            "fix PROMPT_DEPTH in the sidecar, or check that this is the checkpoint it describes",
        )
    ctx = state["ctx"]
    n_ctx, dim = int(ctx.shape[-2]), int(ctx.shape[-1])
    vis = int(state["proj.weight"].shape[0]) if state["proj.weight"].dim() == 2 else -1
    want = {"proj.weight": (vis, dim), "proj.bias": (vis,)}
    for i in range(depth - 1):
        want |= {f"{DEEP_TEXT}.{i}": (n_ctx, dim), f"{DEEP_PROJ}.{i}.weight": (vis, dim), f"{DEEP_PROJ}.{i}.bias": (vis,)}
    bad = {k: tuple(state[k].shape) for k, shape in want.items() if tuple(state[k].shape) != shape}
    if bad or not 1 <= vis <= _MAX_DIM:
        raise ModelFormatError(
            f"{checkpoint}: MaPLe tensors {short(bad or {'proj.weight': tuple(state['proj.weight'].shape)}, 240)} do not fit "
            f"ctx [{n_ctx}, {dim}] (proj [v, {dim}], {DEEP_TEXT}.i [{n_ctx}, {dim}], v <= {_MAX_DIM})",
            "give the checkpoint of a MaPLe prompt learner",
        )
    return depth, keys


def _check_frozen(checkpoint: Path, state: dict[str, torch.Tensor], clip: Any, desc: str) -> int:
    """A whole CustomCLIP's frozen encoders (MaPLe saves them) must be the backbone's own, at the
    checkpoint's precision: the scan runs the prompt learner on that backbone. Returns how many were checked."""
    ours = clip.state_dict()
    hint = (
        "the scan runs the prompt learner on the backbone you name: give the one the model was trained on "
        "(--backbone); a checkpoint whose encoders were changed is not a prompt-tuned model of that backbone"
    )
    keys = sorted(k for k in state if k.startswith(_FROZEN))
    for key in keys:
        name = "visual." + key[len("image_encoder.") :] if key.startswith("image_encoder.") else key.removeprefix("text_encoder.")
        t, ref = state[key], ours.get(name)
        if ref is None or tuple(ref.shape) != tuple(t.shape) or not t.is_floating_point():
            raise ModelFormatError(f"{checkpoint}: frozen tensor {short(key)} has no counterpart of its shape in backbone {desc}", hint)
        _check_view(checkpoint, key, t)
        expected = ref.detach().float().cpu()
        if not bool(((t.float() - expected).abs() <= 1e-3 * expected.abs() + 1e-5).all()):
            raise ModelFormatError(f"{checkpoint}: frozen tensor {short(key)} differs from backbone {desc}'s {name}", hint)
    return len(keys)


def _check_ctx(checkpoint: Path, side: Sidecar, ctx: torch.Tensor) -> None:
    """ctx is [n_ctx, dim], or [classes, n_ctx, dim] with CoOp's class-specific contexts (CSC)."""
    if ctx.dim() not in (2, 3) or not (1 <= ctx.shape[-2] <= MAX_N_CTX and 1 <= ctx.shape[-1] <= _MAX_DIM):
        raise ModelFormatError(
            f"{checkpoint}: ctx must be [n_ctx, dim] (or [classes, n_ctx, dim] with class-specific contexts) "
            f"with n_ctx <= {MAX_N_CTX} and dim <= {_MAX_DIM}, got shape {short(tuple(ctx.shape))}",
            "give the prompt learner checkpoint of a CoOp/CoCoOp model",
        )
    if side.csc is not None and side.csc != (ctx.dim() == 3):
        raise ModelFormatError(
            f"{side.path}: {side.source('csc')} is {side.csc} but ctx has shape {short(tuple(ctx.shape))} "
            f"({'class-specific' if ctx.dim() == 3 else 'one context for all classes'})",
            "fix csc in the sidecar, or check that this is the checkpoint it describes",
        )
    if side.n_ctx is not None and side.n_ctx != ctx.shape[-2]:
        raise ModelFormatError(
            f"{side.path}: {side.source('n_ctx')} is {side.n_ctx} but the checkpoint's ctx holds {ctx.shape[-2]} vectors",
            "fix n_ctx in the sidecar, or check that this is the checkpoint it describes",
        )


def _check_options(checkpoint: Path, side: Sidecar, ctx: torch.Tensor, kind: ModelKind) -> ClassTokenPosition:
    """CSC and the class token position are CoOp options; returns the position (the sidecar's, default end)."""
    csc = ctx.dim() == 3
    position = ClassTokenPosition(side.class_token_position or ClassTokenPosition.END.value)
    problem = option_problem(kind, csc, position)
    if problem and csc:
        raise ModelFormatError(f"{checkpoint}: ctx has shape {short(tuple(ctx.shape))}: {problem}", "is this CoOp? set kind: coop")
    if problem:
        raise UsageError(
            f"{side.path}: {problem}", f"remove {side.source('class_token_position')} (or set it to end) for a CoCoOp model"
        )
    return position


def _check_size(checkpoint: Path, state: dict[str, torch.Tensor], keep: list[str], precision: Precision) -> None:
    size = sum(math.prod(state[k].shape) for k in keep) * (2 if precision == Precision.FP16 else 4)
    if size > MAX_PROMPT_LEARNER_BYTES:
        raise ModelFormatError(
            f"{checkpoint}: the prompt learner would take {size} bytes as {precision.value}, more than a model "
            f"folder holds ({MAX_PROMPT_LEARNER_BYTES >> 20} MiB)",
            "set precision: fp16" if precision == Precision.FP32 else "is this a prompt learner checkpoint?",
        )


def _check_widths(checkpoint: Path, side: Sidecar, state: dict[str, torch.Tensor], kind: ModelKind, clip: Any, desc: str) -> int:
    """What the scan-time loader would refuse, refused now: widths and the input size. Returns the image size."""
    hint = "the checkpoint was trained on another backbone: give that one (--backbone)"
    text_width = int(clip.ln_final.weight.shape[0])
    if state["ctx"].shape[-1] != text_width:
        raise ModelFormatError(
            f"{checkpoint}: ctx is {state['ctx'].shape[-1]} wide but backbone {desc} has text width {text_width}", hint
        )
    if kind == ModelKind.MAPLE:
        problem = backbone_problem(clip)
        if problem:
            raise ModelFormatError(f"{checkpoint}: backbone {desc}: {problem}", "MaPLe runs on CLIP ViT backbones only (e.g. ViT-B-16)")
        vis, got = int(clip.visual.transformer.width), int(state["proj.weight"].shape[0])
        if got != vis:
            raise ModelFormatError(f"{checkpoint}: proj gives {got}-wide visual prompts but backbone {desc}'s ViT is {vis} wide", hint)
    if kind == ModelKind.COCOOP:
        vis = int(clip.visual.output_dim)
        got = int(state["meta_net.linear1.weight"].shape[1])
        if got != vis:
            raise ModelFormatError(
                f"{checkpoint}: meta_net.linear1 takes {got}-wide image features but backbone {desc} gives {vis}", hint
            )
    size = getattr(clip.visual, "image_size", None)
    size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else None
    if side.image_size is not None and size is not None and side.image_size != size:
        raise ModelFormatError(
            f"{side.path}: {side.source('image_size')} is {side.image_size} but backbone {desc} takes {size}x{size} images",
            "fix image_size in the sidecar, or give the backbone the model was trained on",
        )
    return side.image_size or size or 224


def _classnames_for(
    checkpoint: Path, side: Sidecar, tokens: tuple[torch.Tensor, torch.Tensor] | None, n_ctx: int, clip: Any, tokenizer: Any,
    lead: str | None = None,
) -> tuple[list[str], str, tuple[str, ...]]:
    """(names in logit order, where they came from, notes): checked against, or recovered from, the prompt tokens."""
    where = str(checkpoint)
    if tokens is None:
        if side.classnames is None:
            raise UsageError(
                f"{side.path}: no class names, and {checkpoint} stores no token_suffix to recover them from",
                "add classnames: or classnames_file: to the sidecar",
            )
        return list(side.classnames), "the sidecar (not checked: the checkpoint stores no token_prefix/token_suffix)", ()
    prefix, suffix = tokens
    if side.classnames is None:
        names = recover_classnames(where, prefix, suffix, n_ctx, clip, tokenizer, lead)
        return names, "the checkpoint's token_suffix (recovered: lower case, as the tokenizer reads them)", ()
    names, note = verify_classnames(where, list(side.classnames), prefix, suffix, n_ctx, clip, tokenizer, lead)
    return names, "the sidecar, checked against the checkpoint's prompt tokens", (note,) if note else ()


def convert_checkpoint(checkpoint: Path, sidecar: Path, out: Path, backbone: str | Path | None = None) -> Converted:
    """Convert a Dassl checkpoint plus a sidecar into a gatekeeper model folder, atomically.

    Everything the scan would refuse later is refused here: the backbone must load, its widths
    and input size must fit the checkpoint, and the class names must rebuild the checkpoint's
    prompt tokens (or are recovered from them when the sidecar gives none).

    Args:
        checkpoint: the ``model.pth.tar-N`` file (see :func:`load_dassl_checkpoint`).
        sidecar: YAML/JSON in gatekeeper's keys or Dassl's (:mod:`gatekeeper.models.sidecar`).
        out: the folder to create; must not exist or be empty.
        backbone: a local open_clip folder (copied into ``out/backbone``), ``hf-hub:org/repo`` or
            ``NAME[:TAG]``; replaces the sidecar's backbone.
    Returns:
        The manifest written to ``out/gatekeeper.json`` and where the names and backbone came from.
    Raises:
        UsageError: non-empty ``out``; a bad sidecar (see :func:`read_sidecar`); a ``--backbone``
            that is neither a folder nor a backbone name; no backbone or no class names at all.
        UnsafeCheckpointError, ModelFormatError: see :func:`load_dassl_checkpoint`; also ``ctx``,
            meta-net or prompt-token shapes out of bounds or inconsistent, an expanded view,
            tensors inconsistent with ``kind``, sidecar values the checkpoint contradicts, widths
            or an input size the backbone does not have, or class names that do not match.
        BackboneError: the backbone does not resolve or load, or brings files it must not.
    """
    checkpoint, sidecar, out = Path(checkpoint), Path(sidecar), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder", "choose a new output folder")
    side = read_sidecar(sidecar)
    ref, attach, backbone_from = _backbone_source(backbone, side)
    state = _read_checkpoint(checkpoint, keep_tokens=True)
    ctx = state["ctx"]
    _check_ctx(checkpoint, side, ctx)
    kind, precision = _kind_and_precision(checkpoint, side, state)
    position = _check_options(checkpoint, side, ctx, kind)
    keep = ["ctx", *(_META if kind == ModelKind.COCOOP else ())]
    depth = 0
    if kind == ModelKind.MAPLE:
        depth, keep = _maple_learner(checkpoint, side, state)
    _check_shapes(checkpoint, state, keep)  # before anything is copied; dropped tensors are never copied
    _check_size(checkpoint, state, keep, precision)
    tokens = _prompt_tokens(checkpoint, state)
    dropped = sorted(k for k in set(state) - set(keep) - set(_TOKENS) if not k.startswith(_FROZEN))
    if dropped:
        log.warning("%s: ignoring tensors %s", checkpoint, inert(", ".join(dropped)))
    n_ctx = int(ctx.shape[-2])
    from safetensors.torch import save_file

    from gatekeeper.models.loader import load_model

    dtype = torch.float16 if precision == Precision.FP16 else torch.float32
    with atomic_folder(out) as tmp:  # out is absent or empty (checked above)
        if attach is not None:
            _attach(attach, tmp / ATTACHED)
        clip, tokenizer = load_backbone(tmp, ref)
        desc = short(ref.describe(), 120)
        image_size = _check_widths(checkpoint, side, state, kind, clip, desc)
        frozen = _check_frozen(checkpoint, state, clip, desc)
        lead = maple_lead(side.ctx_init, n_ctx) if kind == ModelKind.MAPLE else None
        try:
            names, names_from, notes = _classnames_for(checkpoint, side, tokens, n_ctx, clip, tokenizer, lead)
        except ModelFormatError as exc:
            if kind != ModelKind.MAPLE:
                raise
            # MaPLe writes CTX_INIT into every prompt: the likeliest cause is a sidecar without it (or another one)
            raise ModelFormatError(
                exc.message,
                f"MaPLe prompts read '{{CTX_INIT}} {{class}}.': give TRAINER.MAPLE.CTX_INIT as trained "
                f"(now {short(side.ctx_init)}); else: {exc.hint}",
            ) from None
        if frozen:
            notes = (*notes, f"{frozen} frozen encoder tensors in the checkpoint checked equal to the backbone's")
        if ctx.dim() == 3 and ctx.shape[0] != len(names):
            raise ModelFormatError(
                f"{checkpoint}: ctx has shape {short(tuple(ctx.shape))}: class-specific contexts for {ctx.shape[0]} "
                f"classes, but the model has {len(names)} class names",
                "list the class names the model was trained on, in its label order",
            )
        manifest = Manifest(
            kind=kind,
            classnames=tuple(names),
            backbone=ref,
            image_size=image_size,
            n_ctx=n_ctx,
            ctx_init=side.ctx_init,
            precision=precision,
            csc=ctx.dim() == 3,
            class_token_position=position,
            prompt_depth=depth,
        )
        save_file({k: state[k].to(dtype).contiguous() for k in keep}, str(tmp / WEIGHTS_NAME))
        write_manifest(tmp, manifest)
        load_model(tmp, backbone=(clip, tokenizer))  # the folder must load as the scan will load it
    return Converted(manifest, names_from, backbone_from, notes)
