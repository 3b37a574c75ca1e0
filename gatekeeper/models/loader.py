"""Turn a gatekeeper model folder into a :class:`PromptTunedCLIP` (and write one back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gatekeeper.errors import ModelFormatError
from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.manifest import (
    MAX_PROMPT_LEARNER_BYTES,
    WEIGHTS_NAME,
    Manifest,
    ModelKind,
    Precision,
    read_manifest,
    write_manifest,
)
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net, meta_net_hidden
from gatekeeper.untrusted import inert, short

_META_KEYS = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")


def read_prompt_learner(path: Path) -> dict[str, torch.Tensor]:
    """Load prompt_learner.safetensors (tensors only; no code can run).

    Raises:
        ModelFormatError: missing or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFormatError(f"{path}: missing", "the model folder needs prompt_learner.safetensors")
    if path.stat().st_size > MAX_PROMPT_LEARNER_BYTES:  # bounded before anything is read into memory
        raise ModelFormatError(
            f"{path}: {path.stat().st_size} bytes, more than a prompt learner can be ({MAX_PROMPT_LEARNER_BYTES >> 20} MiB)",
            "the file should hold ctx (and a CoCoOp meta-net) only",
        )
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(
            f"{path}: corrupt or not a safetensors file ({inert(exc, 200)})",
            "re-export the prompt learner, or convert the original checkpoint with `gatekeeper convert`",
        ) from None


def _check_shape(path: Path, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ModelFormatError(
            f"{path}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {shape} from the manifest and backbone",
            "check n_ctx, csc (ctx [K, n_ctx, d]) and the backbone named in gatekeeper.json",
        )


def load_model(folder: str | Path, device: str | torch.device = "cpu", backbone: tuple[Any, Any] | None = None) -> PromptTunedCLIP:
    """Load a gatekeeper model folder onto ``device`` in eval mode, encoders frozen.

    ``backbone``: the ``(clip, tokenizer)`` that ``load_backbone(folder, manifest.backbone)`` already
    returned, when the caller holds it (it is used as is, not loaded again).

    Raises:
        ModelFormatError: manifest/weights missing, corrupt or inconsistent.
        BackboneError: the backbone reference does not resolve.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a folder", "give the path of a gatekeeper model folder")
    manifest = read_manifest(folder)
    clip, tokenizer = backbone if backbone is not None else load_backbone(folder, manifest.backbone)
    visual_size = getattr(clip.visual, "image_size", None)
    size = visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size
    if size is not None and int(size) != manifest.image_size:
        raise ModelFormatError(
            f"{folder}: manifest image_size={manifest.image_size} but the backbone expects {size}",
            "fix image_size in gatekeeper.json",
        )
    ctx = meta_net = None
    model: PromptTunedCLIP
    if manifest.kind == ModelKind.MAPLE:
        from gatekeeper.models.maple import maple_from_state

        model = maple_from_state(clip, tokenizer, manifest, read_prompt_learner(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
        return _frozen(model, device)
    if manifest.kind != ModelKind.ZEROSHOT:
        wpath = folder / WEIGHTS_NAME
        state = read_prompt_learner(wpath)
        ctx_dim = int(clip.ln_final.weight.shape[0])
        if "ctx" not in state:
            raise ModelFormatError(f"{wpath}: no 'ctx' tensor", "the prompt learner must hold the learned context")
        ctx = state["ctx"]
        # class-specific contexts (CoOp's CSC) hold one context per class, in class order
        per_class = (len(manifest.classnames),) if manifest.csc else ()
        _check_shape(wpath, "ctx", ctx, (*per_class, manifest.n_ctx, ctx_dim))
        if manifest.kind == ModelKind.COCOOP:
            missing = [k for k in _META_KEYS if k not in state]
            if missing:
                raise ModelFormatError(f"{wpath}: CoCoOp model lacks {missing}", "is this a CoOp model? set kind: coop")
            vis_dim = int(clip.visual.output_dim)
            # the hidden width is CoCoOp's vis_dim // 16 by default, but any width is a valid
            # meta-net: read it from the weights, then check every shape against it
            w1 = state["meta_net.linear1.weight"]
            hidden = int(w1.shape[0]) if w1.dim() == 2 and w1.shape[0] > 0 else meta_net_hidden(vis_dim)
            meta_net = build_meta_net(vis_dim, ctx_dim, hidden)
            _check_shape(wpath, "meta_net.linear1.weight", state["meta_net.linear1.weight"], (hidden, vis_dim))
            _check_shape(wpath, "meta_net.linear1.bias", state["meta_net.linear1.bias"], (hidden,))
            _check_shape(wpath, "meta_net.linear2.weight", state["meta_net.linear2.weight"], (ctx_dim, hidden))
            _check_shape(wpath, "meta_net.linear2.bias", state["meta_net.linear2.bias"], (ctx_dim,))
            meta_net.load_state_dict({k[len("meta_net.") :]: state[k] for k in _META_KEYS})
        allowed = {"ctx", *(_META_KEYS if manifest.kind == ModelKind.COCOOP else ())}
        extra = sorted(set(state) - allowed)
        if extra:
            raise ModelFormatError(
                f"{wpath}: unexpected tensors {short(extra[:5])} for a {manifest.kind.value} model",
                "check 'kind' in gatekeeper.json (meta_net.* means cocoop)",
            )
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=ctx, meta_net=meta_net)
    return _frozen(model, device)


def _frozen(model: PromptTunedCLIP, device: str | torch.device) -> PromptTunedCLIP:
    """``model`` on ``device`` in eval mode, every parameter frozen (a scan optimises only its trigger)."""
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model(model: PromptTunedCLIP, folder: Path, manifest: Manifest | None = None) -> None:
    """Write the manifest and prompt_learner.safetensors (not the backbone) into ``folder``."""
    from safetensors.torch import save

    from gatekeeper._io import atomic_write_bytes

    manifest = manifest or model.manifest
    folder.mkdir(parents=True, exist_ok=True)
    if manifest.kind != ModelKind.ZEROSHOT:
        state = model.prompt_learner_state()
        if manifest.precision == Precision.FP16:
            state = {k: v.half() for k, v in state.items()}
        atomic_write_bytes(folder / WEIGHTS_NAME, save({k: v.cpu().contiguous() for k, v in state.items()}))
    write_manifest(folder, manifest)
