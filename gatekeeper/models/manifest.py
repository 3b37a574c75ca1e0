"""The gatekeeper model folder: ``gatekeeper.json`` + ``prompt_learner.safetensors``.

Layout (documented in docs/model-format.md)::

    model/
      gatekeeper.json               manifest (this module)
      prompt_learner.safetensors    ctx [n_ctx, d] (+ meta_net.* for CoCoOp); absent for zeroshot
      backbone/                     optional: open_clip_config.json + open_clip_model.safetensors
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gatekeeper.errors import ModelFormatError

MANIFEST_NAME = "gatekeeper.json"
WEIGHTS_NAME = "prompt_learner.safetensors"
FORMAT_NAME = "gatekeeper-model"
FORMAT_VERSION = 1


class ModelKind(str, Enum):
    COOP = "coop"
    COCOOP = "cocoop"
    ZEROSHOT = "zeroshot"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"


@dataclass(frozen=True)
class BackboneRef:
    """An open_clip model: ``name`` is a built-in name, ``hf-hub:org/repo`` or ``local-dir:SUBFOLDER``.

    ``pretrained`` is the open_clip tag (e.g. ``openai``) for built-in names, else None.
    A ``local-dir:`` path is relative to the model folder and must stay inside it.
    """

    name: str
    pretrained: str | None = None

    def describe(self) -> str:
        return f"{self.name}/{self.pretrained}" if self.pretrained else self.name


@dataclass(frozen=True)
class Manifest:
    kind: ModelKind
    classnames: tuple[str, ...]
    backbone: BackboneRef
    image_size: int
    n_ctx: int = 0
    ctx_init: str | None = None
    precision: Precision = Precision.FP32
    template: str = "a photo of a {}."  # zeroshot prompts only

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": self.kind.value,
            "classnames": list(self.classnames),
            "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init,
            "image_size": self.image_size,
            "precision": self.precision.value,
            "backbone": asdict(self.backbone),
            "template": self.template,
        }


_REQUIRED = ("kind", "classnames", "backbone", "image_size")


def _bad(path: Path, what: str, hint: str = "see docs/model-format.md") -> ModelFormatError:
    return ModelFormatError(f"{path}: {what}", hint)


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/gatekeeper.json``.

    Raises:
        ModelFormatError: missing file, bad JSON, missing keys, or bad values.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise _bad(
            path,
            "no gatekeeper manifest",
            "point at a gatekeeper model folder, or convert a Dassl checkpoint with `gatekeeper convert`",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _bad(path, "the manifest must be a JSON object")
    if raw.get("format", FORMAT_NAME) != FORMAT_NAME or raw.get("format_version", 1) != FORMAT_VERSION:
        raise _bad(path, f"unsupported format {raw.get('format')!r} v{raw.get('format_version')!r}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _bad(path, f"missing key(s): {', '.join(missing)}")
    try:
        kind = ModelKind(raw["kind"])
    except ValueError:
        raise _bad(path, f"kind {raw['kind']!r} is not one of {[k.value for k in ModelKind]}") from None
    names = raw["classnames"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise _bad(path, "classnames must be a list of at least 2 non-empty strings")
    if len(set(names)) != len(names):
        raise _bad(path, "classnames contains duplicates")
    bb = raw["backbone"]
    if not isinstance(bb, dict) or not isinstance(bb.get("name"), str):
        raise _bad(path, "backbone must be an object with a string 'name' (and optional 'pretrained')")
    image_size = raw["image_size"]
    if not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise _bad(path, f"image_size must be an integer in [8, 1024], got {image_size!r}")
    n_ctx = raw.get("n_ctx", 0)
    if not isinstance(n_ctx, int) or n_ctx < 0 or (kind != ModelKind.ZEROSHOT and n_ctx < 1):
        raise _bad(path, f"n_ctx must be a positive integer for {kind.value}, got {n_ctx!r}")
    try:
        precision = Precision(raw.get("precision", "fp32"))
    except ValueError:
        raise _bad(path, f"precision {raw.get('precision')!r} is not one of fp32, fp16") from None
    template = raw.get("template", "a photo of a {}.")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise _bad(path, "template must be a string with exactly one {} placeholder")
    ctx_init = raw.get("ctx_init")
    if ctx_init is not None and not isinstance(ctx_init, str):
        raise _bad(path, "ctx_init must be a string or null")
    return Manifest(
        kind=kind,
        classnames=tuple(names),
        backbone=BackboneRef(name=bb["name"], pretrained=bb.get("pretrained")),
        image_size=image_size,
        n_ctx=n_ctx,
        ctx_init=ctx_init,
        precision=precision,
        template=template,
    )


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``gatekeeper.json`` atomically (temp file + rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
