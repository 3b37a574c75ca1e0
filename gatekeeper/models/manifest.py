"""The gatekeeper model folder: ``gatekeeper.json`` + ``prompt_learner.safetensors``.

Layout (documented in docs/model-format.md)::

    model/
      gatekeeper.json               manifest (this module)
      prompt_learner.safetensors    ctx [n_ctx, d] ([K, n_ctx, d] with csc) (+ meta_net.* for CoCoOp,
                                    + proj.*, compound_prompts_text.*, compound_prompt_projections.* for MaPLe);
                                    absent for zeroshot
      backbone/                     optional: open_clip_config.json + open_clip_model.safetensors
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gatekeeper.errors import ModelFormatError
from gatekeeper.untrusted import CONTROL, DocumentError, inert, is_int, load_json, short

MANIFEST_NAME = "gatekeeper.json"
WEIGHTS_NAME = "prompt_learner.safetensors"
FORMAT_NAME = "gatekeeper-model"
FORMAT_VERSION = 1


class ModelKind(str, Enum):
    COOP = "coop"
    COCOOP = "cocoop"
    ZEROSHOT = "zeroshot"
    MAPLE = "maple"  # MaPLe: multi-modal (text and vision) deep prompts, ViT backbones only


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class ClassTokenPosition(str, Enum):
    """Where CoOp puts the class-name tokens among the context vectors (CoOp's CLASS_TOKEN_POSITION)."""

    END = "end"  # [SOS][ctx][class][.][EOT]
    MIDDLE = "middle"  # [SOS][first n_ctx//2 ctx][class][other ctx][.][EOT]
    FRONT = "front"  # [SOS][class][ctx][.][EOT]


def option_problem(kind: ModelKind, csc: bool, position: ClassTokenPosition) -> str | None:
    """Why a prompt-learner option does not apply to ``kind``, or None when the combination is valid.

    CoOp takes class-specific contexts and any class token position; CoCoOp (one context shifted
    per image, built with the class token at the end) and zero-shot prompts take neither.
    """
    if kind == ModelKind.COOP:
        return None
    if csc:
        return f"class-specific contexts (CSC) are a CoOp option; a {kind.value} model has one context for all classes"
    if position != ClassTokenPosition.END:
        return (
            f"class_token_position {position.value!r} is a CoOp option; {kind.value} prompts put the class "
            "token at the end"
        )
    return None


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
    csc: bool = False  # CoOp class-specific contexts: ctx is [K, n_ctx, d]
    class_token_position: ClassTokenPosition = ClassTokenPosition.END  # CoOp only
    prompt_depth: int = 0  # MaPLe only: layers 0..prompt_depth-1 of both encoders take learned prompts

    def to_dict(self) -> dict[str, Any]:
        # prompt_depth is written for MaPLe only, so CoOp/CoCoOp manifests stay as they were
        depth = {"prompt_depth": self.prompt_depth} if self.kind == ModelKind.MAPLE else {}
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
            "csc": self.csc,
            "class_token_position": self.class_token_position.value,
            **depth,
        }


_REQUIRED = ("kind", "classnames", "backbone", "image_size")
MAX_MANIFEST_BYTES = 4 << 20  # 4 MiB: 10,000 class names of 200 characters fit
MAX_CLASSES = 10_000
MAX_CLASSNAME_CHARS = 200
MAX_N_CTX = 64
MAX_PROMPT_DEPTH = 48  # MaPLe's deep prompts: at most one per layer of the shallower encoder (ViT-L text: 12)
# prompt_learner.safetensors: a ViT-L CoCoOp prompt learner is under 1 MiB, CoOp with class-specific
# contexts for 1000 classes (16 x 768 each) 25 MiB in fp16
MAX_PROMPT_LEARNER_BYTES = 64 << 20
MAX_TEXT_CHARS = 1000  # template, ctx_init
MAX_BACKBONE_CHARS = 300
# characters that would break a log line or hide text: C0/C1 controls, line/paragraph separators,
# zero-width and bidirectional controls


def _bad(path: Path, what: str, hint: str = "see docs/model-format.md") -> ModelFormatError:
    return ModelFormatError(f"{inert(path)}: {what}", hint)


def _load_json(path: Path) -> Any:
    """The parsed manifest: at most :data:`MAX_MANIFEST_BYTES`, UTF-8, strict JSON, bounded nesting."""
    try:
        return load_json(path, "the manifest", MAX_MANIFEST_BYTES)
    except DocumentError as exc:
        raise _bad(path, str(exc), "a manifest is a few KiB of plain JSON: rebuild it") from None


def _check_template(path: Path, template: Any) -> str:
    """A zero-shot template: a string with exactly one bare ``{}`` (no name, conversion or spec)."""
    want = "template must be a string with exactly one {} placeholder (no name, index, !conversion or :spec)"
    if not isinstance(template, str) or len(template) > MAX_TEXT_CHARS or CONTROL.search(template):
        raise _bad(
            path, f"{want}, at most {MAX_TEXT_CHARS} characters without control characters; got {short(template)}"
        )
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a lone "{" or "}"
        raise _bad(path, f"{want}; got {short(template)} (write {{{{ and }}}} for literal braces)") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise _bad(path, f"{want}; got {short(template)}")
    return template


def _check_classnames(path: Path, names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES:
        raise _bad(path, f"classnames must be a list of at least 2 (at most {MAX_CLASSES}) non-empty strings")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise _bad(path, f"classnames must be a list of at least 2 non-empty strings; item {i} is {short(name)}")
        if len(name) > MAX_CLASSNAME_CHARS or CONTROL.search(name):
            raise _bad(
                path,
                f"classnames[{i}] {short(name)} is longer than {MAX_CLASSNAME_CHARS} characters or holds control characters",
                "class names are short printable labels",
            )
    if len(set(names)) != len(names):
        raise _bad(path, "classnames contains duplicates")
    return tuple(names)


def _check_backbone(path: Path, bb: Any) -> BackboneRef:
    want = "backbone must be an object with a string 'name' (and optional string 'pretrained')"
    if not isinstance(bb, dict) or not isinstance(bb.get("name"), str):
        raise _bad(path, want)
    extra = sorted(k for k in bb if k not in ("name", "pretrained"))
    if extra:
        raise _bad(path, f"{want}; unknown key(s) {short(extra)}")
    name, pretrained = bb["name"], bb.get("pretrained")
    if not name.strip() or len(name) > MAX_BACKBONE_CHARS or CONTROL.search(name):
        raise _bad(path, f"backbone name {short(name)} must be 1 to {MAX_BACKBONE_CHARS} printable characters")
    if pretrained is not None and (
        not isinstance(pretrained, str) or len(pretrained) > MAX_BACKBONE_CHARS or CONTROL.search(pretrained)
    ):
        raise _bad(
            path,
            f"backbone pretrained must be an open_clip tag (a string) or null, got {short(pretrained)}",
            'e.g. "pretrained": "openai" for a built-in name; null for hf-hub: and local-dir: backbones',
        )
    return BackboneRef(name=name, pretrained=pretrained)


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/gatekeeper.json``.

    Raises:
        ModelFormatError: missing file, oversized or bad JSON, missing keys, or bad values (wrong
            types, booleans where integers go, out of bounds, a template with other fields).
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise _bad(
            path,
            "no gatekeeper manifest",
            "point at a gatekeeper model folder, or convert a Dassl checkpoint with `gatekeeper convert`",
        )
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise _bad(path, "the manifest must be a JSON object")
    fmt, version = raw.get("format", FORMAT_NAME), raw.get("format_version", FORMAT_VERSION)
    if fmt != FORMAT_NAME or not is_int(version) or version != FORMAT_VERSION:
        raise _bad(
            path, f"unsupported format {short(fmt)} v{short(version)}", f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _bad(path, f"missing key(s): {', '.join(missing)}")
    kinds = [k.value for k in ModelKind]
    if raw["kind"] not in kinds:
        raise _bad(path, f"kind {short(raw['kind'])} is not one of {kinds}")
    kind = ModelKind(raw["kind"])
    names = _check_classnames(path, raw["classnames"])
    backbone = _check_backbone(path, raw["backbone"])
    image_size = raw["image_size"]
    if not is_int(image_size) or not 8 <= image_size <= 1024:
        raise _bad(path, f"image_size must be an integer in [8, 1024], got {short(image_size)}")
    n_ctx = raw.get("n_ctx", 0)
    low = 0 if kind == ModelKind.ZEROSHOT else 1
    if not is_int(n_ctx) or not low <= n_ctx <= MAX_N_CTX:
        raise _bad(path, f"n_ctx must be an integer in [{low}, {MAX_N_CTX}] for {kind.value}, got {short(n_ctx)}")
    precision_value = raw.get("precision", "fp32")
    if precision_value not in [p.value for p in Precision]:
        raise _bad(path, f"precision {short(precision_value)} is not one of fp32, fp16")
    template = _check_template(path, raw.get("template", "a photo of a {}."))
    ctx_init = raw.get("ctx_init")
    if ctx_init is not None and (
        not isinstance(ctx_init, str) or len(ctx_init) > MAX_TEXT_CHARS or CONTROL.search(ctx_init)
    ):
        raise _bad(
            path,
            f"ctx_init must be a string (at most {MAX_TEXT_CHARS} printable characters) or null, got {short(ctx_init)}",
        )
    csc = raw.get("csc", False)
    if not isinstance(csc, bool):
        raise _bad(path, f"csc must be true or false, got {short(csc)}")
    positions = [p.value for p in ClassTokenPosition]
    position = raw.get("class_token_position", ClassTokenPosition.END.value)
    if position not in positions:
        raise _bad(path, f"class_token_position {short(position)} is not one of {', '.join(positions)}")
    problem = option_problem(kind, csc, ClassTokenPosition(position))
    if problem:
        raise _bad(path, problem, "set csc: false and class_token_position: end, or kind: coop if this is a CoOp model")
    depth = _check_prompt_depth(path, kind, raw)
    return Manifest(
        kind=kind,
        classnames=names,
        backbone=backbone,
        image_size=image_size,
        n_ctx=n_ctx,
        ctx_init=ctx_init,
        precision=Precision(precision_value),
        template=template,
        csc=csc,
        class_token_position=ClassTokenPosition(position),
        prompt_depth=depth,
    )


def _check_prompt_depth(path: Path, kind: ModelKind, raw: dict[str, Any]) -> int:
    """MaPLe's prompt depth: required for maple, in [1, MAX_PROMPT_DEPTH]; absent for other kinds."""
    if kind != ModelKind.MAPLE:
        if "prompt_depth" in raw:
            raise _bad(path, f"prompt_depth is a MaPLe setting; a {kind.value} model has none", "remove prompt_depth")
        return 0
    depth: Any = raw.get("prompt_depth")
    if not is_int(depth) or not 1 <= depth <= MAX_PROMPT_DEPTH:
        raise _bad(
            path,
            f"prompt_depth must be an integer in [1, {MAX_PROMPT_DEPTH}] for maple, got {short(depth)}",
            "MaPLe's TRAINER.MAPLE.PROMPT_DEPTH (9 in the paper)",
        )
    return int(depth)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``gatekeeper.json`` atomically (temp file + rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    from gatekeeper._io import atomic_write_text

    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path
