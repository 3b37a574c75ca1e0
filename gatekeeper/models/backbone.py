"""Load the frozen CLIP encoders named by a :class:`BackboneRef`, through open_clip's own APIs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gatekeeper.errors import BackboneError
from gatekeeper.models.manifest import BackboneRef

LOCAL = "local-dir:"
HF = "hf-hub:"
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


def local_backbone_dir(folder: Path, ref: BackboneRef) -> Path:
    """Resolve a ``local-dir:`` backbone inside the model folder and check it is safe to load.

    Raises:
        BackboneError: the path escapes the model folder, lacks the open_clip files, or holds
            pickle weights (open_clip would torch.load them; we accept safetensors only).
    """
    rel = ref.name[len(LOCAL) :]
    root = folder.resolve()
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise BackboneError(
            f"backbone path {rel!r} points outside the model folder {folder}",
            "a local backbone must be a subfolder of the model folder",
        )
    for needed in ("open_clip_config.json", "open_clip_model.safetensors"):
        if not (path / needed).is_file():
            raise BackboneError(
                f"local backbone {path} has no {needed}",
                "a local backbone folder holds open_clip_config.json + open_clip_model.safetensors",
            )
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise BackboneError(
            f"local backbone {path} contains pickle weight files {pickles}",
            "remove them: gatekeeper loads backbone weights from safetensors only",
        )
    return path


def open_clip_name(folder: Path, ref: BackboneRef) -> str:
    """The model name to pass to open_clip (absolute path for ``local-dir:``)."""
    if ref.name.startswith(LOCAL):
        return LOCAL + str(local_backbone_dir(folder, ref))
    return ref.name


def load_backbone(folder: Path, ref: BackboneRef) -> tuple[Any, Any]:
    """Create the open_clip model and its tokenizer, in eval mode, weights frozen.

    Returns:
        (model, tokenizer)

    Raises:
        BackboneError: the reference does not resolve (offline without a cache, unknown name,
            missing repo) or the weights do not load.
    """
    import open_clip

    name = open_clip_name(folder, ref)
    pretrained = None if name.startswith((LOCAL, HF)) else ref.pretrained
    if not name.startswith((LOCAL, HF)) and name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model name {ref.name!r}",
            "use a name from open_clip.list_models(), an hf-hub:org/repo, or local-dir:SUBFOLDER",
        )
    if pretrained and pretrained.endswith(_PICKLE_SUFFIXES):
        raise BackboneError(
            f"backbone 'pretrained' {pretrained!r} is a file path to pickle weights",
            "use an open_clip pretrained tag (e.g. openai) or a local-dir: safetensors backbone",
        )
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, load_weights=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/HF errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(
            f"backbone {ref.describe()!r} did not load: {first[:300]}",
            "check the name/tag, and when offline that the weights are in the Hub cache (HF_HUB_OFFLINE=1)",
        ) from exc
    if not hasattr(model, "token_embedding"):
        raise BackboneError(
            f"backbone {ref.describe()!r} has a custom text tower (no token_embedding)",
            "prompt-tuned models need an open_clip CLIP with the standard text transformer",
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
