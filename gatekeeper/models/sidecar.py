"""The sidecar `gatekeeper convert` reads next to a Dassl checkpoint: what the checkpoint does not store.

A sidecar may use gatekeeper's own keys or the names of the CoOp / Dassl config the provider
trained with: lower-case aliases (``trainer``, ``prec``), nested Dassl sections
(``TRAINER: {NAME: CoOp, COOP: {N_CTX: 16}}``, a trainer config YAML as CoOp ships them) or dotted
keys (``TRAINER.COOP.N_CTX: 16``, as given on Dassl's command line). Each alias maps to one own key
(:data:`ALIASES`, the table in docs/model-format.md); an own key and an alias that disagree are an
error naming both. Dassl settings gatekeeper does not need (``OPTIM``, ``DATALOADER``, ...) are
ignored; any other key is refused with the list of accepted ones.

The sidecar is untrusted text: it is read with :func:`gatekeeper.untrusted.load_yaml`, and the
files it names (``classnames_file``, a ``local-dir:`` backbone) must stay inside its folder.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from gatekeeper.errors import UsageError
from gatekeeper.models.manifest import (
    MAX_CLASSES,
    MAX_CLASSNAME_CHARS,
    MAX_N_CTX,
    MAX_PROMPT_DEPTH,
    MAX_TEXT_CHARS,
    BackboneRef,
    ModelKind,
    Precision,
)
from gatekeeper.untrusted import CONTROL, DocumentError, inert, is_int, load_yaml, short

LOCAL = "local-dir:"
OWN_KEYS = (
    "backbone",
    "class_token_position",
    "classnames",
    "classnames_file",
    "csc",
    "ctx_init",
    "image_size",
    "kind",
    "n_ctx",
    "precision",
    "prompt_depth",
)
# alias -> own key. ``TRAINER.<T>.*`` is read from the trainer's own section only (see _trainer_section)
ALIASES = {
    "trainer": "kind",
    "prec": "precision",
    "TRAINER.NAME": "kind",
    "TRAINER.<T>.PREC": "precision",
    "TRAINER.<T>.N_CTX": "n_ctx",
    "TRAINER.<T>.CTX_INIT": "ctx_init",
    "TRAINER.<T>.CSC": "csc",
    "TRAINER.<T>.CLASS_TOKEN_POSITION": "class_token_position",
    "TRAINER.<T>.PROMPT_DEPTH": "prompt_depth",
    "INPUT.SIZE": "image_size",
    "MODEL.BACKBONE.NAME": "backbone",
}
# Dassl's top-level config sections (dassl/config/defaults.py); what they hold beyond ALIASES is
# training detail gatekeeper does not need, and is ignored
DASSL_SECTIONS = frozenset(
    {"OUTPUT_DIR", "RESUME", "SEED", "USE_CUDA", "VERBOSE", "INPUT", "DATASET", "DATALOADER", "MODEL", "OPTIM",
     "TRAIN", "TEST", "TRAINER", "LOSS"}
)  # LOSS: the distillation loss settings KgCoOp's and ProGrad's train.py add
# trainer name -> kind. KgCoOp and ProGrad train CoOp's own prompt learner (ctx, token_prefix,
# token_suffix) under another loss, so their checkpoints are CoOp checkpoints
TRAINERS = {
    "coop": ModelKind.COOP,
    "cocoop": ModelKind.COCOOP,
    "kgcoop": ModelKind.COOP,
    "prograd": ModelKind.COOP,
    "maple": ModelKind.MAPLE,
}
# trainer name -> the TRAINER.<T> sections its options may sit in, in the order they are looked for:
# the official KgCoOp and ProGrad repos keep CoOp's TRAINER.COOP, other code bases give them their own
_SECTIONS = {
    "coop": ("COOP",),
    "cocoop": ("COCOOP",),
    "kgcoop": ("KGCOOP", "COOP"),
    "prograd": ("PROGRAD", "COOP"),
    "maple": ("MAPLE",),
}
_CTX_KEYS = ("N_CTX", "CSC", "CTX_INIT", "PREC", "CLASS_TOKEN_POSITION")
_SECTION_KEYS = {  # what each trainer's train.py adds to Dassl's config; keys beyond _CTX_KEYS are loss weights
    "COOP": (*_CTX_KEYS, "ALPHA", "W"),  # ALPHA, W: KgCoOp's and ProGrad's additions to TRAINER.COOP
    "COCOOP": ("N_CTX", "CTX_INIT", "PREC"),
    "KGCOOP": (*_CTX_KEYS, "W"),
    "PROGRAD": (*_CTX_KEYS, "LAMBDA", "T", "LOSS_NAME"),
    "MAPLE": ("N_CTX", "CTX_INIT", "PREC", "PROMPT_DEPTH"),  # what MaPLe's train.py adds
}
PRECISIONS = {"fp16": Precision.FP16, "fp32": Precision.FP32, "amp": Precision.FP32}  # amp keeps fp32 weights
POSITIONS = ("end", "middle", "front")
_MAX_CLASSNAMES_FILE = 2**20  # bytes
_MAX_NAME = 200  # characters of a backbone name or pretrained tag
_MAX_DEPTH = 6


@dataclass(frozen=True)
class Sidecar:
    """What a sidecar declares, validated; None where it says nothing (the checkpoint decides)."""

    path: Path
    backbone: BackboneRef | None = None
    backbone_dir: Path | None = None  # a ``local-dir:`` backbone: the folder next to the sidecar to attach
    classnames: tuple[str, ...] | None = None  # None: recover them from the checkpoint
    kind: ModelKind | None = None
    precision: Precision | None = None
    n_ctx: int | None = None
    ctx_init: str | None = None
    image_size: int | None = None
    csc: bool | None = None
    class_token_position: str | None = None
    prompt_depth: int | None = None  # MaPLe's PROMPT_DEPTH
    sources: tuple[tuple[str, str], ...] = ()  # (own key, the sidecar key it was read from)

    def source(self, key: str) -> str:
        """The sidecar key a value came from (an alias, or the own key)."""
        return dict(self.sources).get(key, key)


def _bad(path: Path, what: str, hint: str = "see docs/model-format.md (the sidecar)") -> UsageError:
    return UsageError(f"{path}: {what}", hint)


def _flatten(path: Path, prefix: str, value: Any, out: dict[str, Any], depth: int = 0) -> None:
    """Nested upper-case Dassl sections as dotted keys (``TRAINER.COOP.N_CTX``)."""
    if isinstance(value, dict) and depth < _MAX_DEPTH:
        for k, v in value.items():
            if not isinstance(k, str):
                raise _bad(path, f"key {short(k)} under {prefix} is not a string")
            _flatten(path, f"{prefix}.{k}", v, out, depth + 1)
        return
    if prefix in out and out[prefix] != value:
        raise _bad(path, f"{prefix} is given twice with different values ({short(out[prefix])}, {short(value)})")
    out[prefix] = value


def _split(path: Path, raw: dict[Any, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(own and lower-case alias keys, Dassl dotted keys); unknown keys refused."""
    own: dict[str, Any] = {}
    dassl: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if not isinstance(key, str):
            unknown.append(short(key, 40))
        elif key in OWN_KEYS or key in ("trainer", "prec"):
            own[key] = value
        elif key.split(".", 1)[0] in DASSL_SECTIONS:
            _flatten(path, key, value, dassl)
        else:
            unknown.append(short(key, 40))
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        accepted = ", ".join([*OWN_KEYS, "trainer", "prec"])
        raise _bad(
            path,
            f"unknown sidecar key(s) {shown}",
            f"accepted: {accepted}, and Dassl config sections ({', '.join(sorted(DASSL_SECTIONS))}, nested or "
            "dotted as TRAINER.COOP.N_CTX); see docs/model-format.md",
        )
    return own, dassl


def _trainer_section(path: Path, own: dict[str, Any], dassl: dict[str, Any]) -> str | None:
    """The ``TRAINER.<T>`` section to read: the named trainer's (a Dassl config carries both defaults)."""
    named = [own[k] for k in ("kind", "trainer") if k in own] + ([dassl["TRAINER.NAME"]] if "TRAINER.NAME" in dassl else [])
    for value in named:
        if isinstance(value, str) and value.lower() in TRAINERS:
            sections = _SECTIONS[value.lower()]
            given = [s for s in sections if any(k.startswith(f"TRAINER.{s}.") for k in dassl)]
            return (given or sections)[0]
    present = sorted({k.split(".")[1] for k in dassl if k.count(".") >= 2 and k.split(".")[1] in _SECTION_KEYS
                      and k.startswith("TRAINER.")})
    if len(present) > 1:
        both = "both" if len(present) == 2 else "all"
        raise _bad(path, f"{' and '.join(f'TRAINER.{p}' for p in present)} are {both} given and no trainer is named",
                   "add TRAINER.NAME (CoOp, CoCoOp, KgCoOp, ProGrad or MaPLe), trainer:, or kind:")
    return present[0] if present else None


def _gather(path: Path, own: dict[str, Any], dassl: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """Every (sidecar key, value) given for each own key."""
    section = _trainer_section(path, own, dassl)
    given: dict[str, list[tuple[str, Any]]] = {}
    for key, value in own.items():
        given.setdefault({"trainer": "kind", "prec": "precision"}.get(key, key), []).append((key, value))
    for key in dassl:
        parts = key.split(".")
        known = _SECTION_KEYS.get(parts[1], ()) if len(parts) >= 3 and parts[0] == "TRAINER" else None
        if known and ".".join(parts[2:]) not in known:
            raise _bad(path, f"unknown sidecar key {short(key, 60)}", f"TRAINER.{parts[1]} holds {', '.join(known)}")
    for alias, target in ALIASES.items():
        if "." not in alias:
            continue
        key = alias.replace("<T>", section) if section else alias
        if key in dassl and "<T>" not in key:
            given.setdefault(target, []).append((key, dassl[key]))
    return given


def _kind(path: Path, key: str, value: Any) -> ModelKind:
    if isinstance(value, str) and value.lower() in TRAINERS:
        return TRAINERS[value.lower()]
    raise _bad(
        path,
        f"{key} {short(value)} is not a trainer gatekeeper reads",
        "kind: coop|cocoop|maple (trainer: CoOp|CoCoOp|KgCoOp|ProGrad|MaPLe)",
    )


def _precision(path: Path, key: str, value: Any) -> Precision:
    if isinstance(value, str) and value.lower() in PRECISIONS:
        return PRECISIONS[value.lower()]
    raise _bad(path, f"{key} {short(value)} is not a precision", "precision: fp32|fp16 (prec: fp16|fp32|amp)")


def _bool(path: Path, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):  # yacs command-line values
        return value.lower() == "true"
    raise _bad(path, f"{key} must be true or false, got {short(value)}")


def _int(path: Path, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,6}", value.strip()):
        value = int(value)
    if not is_int(value) or not lo <= value <= hi:
        raise _bad(path, f"{key} must be an integer in [{lo}, {hi}], got {short(value)}")
    return int(value)


def _image_size(path: Path, key: str, value: Any) -> int:
    """``224``, or Dassl's ``INPUT.SIZE`` ``(224, 224)`` (a list, or the tuple's text): square only."""
    if isinstance(value, str) and (m := re.fullmatch(r"\s*[(\[]\s*([0-9]{1,5})\s*,\s*([0-9]{1,5})\s*[)\]]\s*", value)):
        value = [int(m.group(1)), int(m.group(2))]
    if isinstance(value, list) and len(value) == 2 and all(is_int(v) for v in value):
        if value[0] != value[1]:
            raise _bad(path, f"{key} {short(value)} is not square", "gatekeeper models take square inputs")
        value = value[0]
    return _int(path, key, value, 8, 1024)


def _ctx_init(path: Path, key: str, value: Any) -> str | None:
    # Dassl's CTX_INIT "" means a random init; KgCoOp's and ProGrad's configs write a bool (True: their
    # code picks the words), which names no words to record
    if value is None or value == "" or isinstance(value, bool):
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS or CONTROL.search(value):
        raise _bad(path, f"{key} must be a string of at most {MAX_TEXT_CHARS} printable characters, got {short(value)}")
    return value


def _position(path: Path, key: str, value: Any) -> str:
    if isinstance(value, str) and value.lower() in POSITIONS:
        return value.lower()
    raise _bad(path, f"{key} {short(value)} is not a class token position", f"one of {', '.join(POSITIONS)}")


def _name_ok(value: Any, optional: bool = False) -> bool:
    if optional and value is None:
        return True
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME and not CONTROL.search(value)


def openai_clip_name(name: str) -> str:
    """open_clip's name for an OpenAI CLIP name as CoOp writes it (``ViT-B/16`` -> ``ViT-B-16``)."""
    return name.replace("@336px", "-336").replace("/", "-")


def _backbone(path: Path, key: str, value: Any) -> BackboneRef:
    if key == "MODEL.BACKBONE.NAME":  # CoOp loads OpenAI's CLIP weights by their name
        if not _name_ok(value):
            raise _bad(path, f"{key} must be a CLIP name such as ViT-B/16, got {short(value)}")
        return BackboneRef(name=openai_clip_name(value), pretrained="openai")
    if (
        not isinstance(value, dict)
        or set(value) - {"name", "pretrained"}
        or not _name_ok(value.get("name"))
        or not _name_ok(value.get("pretrained"), optional=True)
    ):
        raise _bad(
            path,
            f"backbone must be {{name: str, pretrained: str}}, got {short(value)}",
            "e.g. {name: ViT-B-16, pretrained: openai}, or {name: local-dir:FOLDER} next to the sidecar",
        )
    return BackboneRef(name=value["name"], pretrained=value.get("pretrained"))


def _same_backbone(a: BackboneRef, b: BackboneRef) -> bool:
    """Built-in names compare without open_clip's ``-quickgelu`` variant suffix (OpenAI weights use QuickGELU)."""
    if a.name.startswith(("local-dir:", "hf-hub:")) or b.name.startswith(("local-dir:", "hf-hub:")):
        return True  # a folder or a Hub repo cannot be compared with a name: the convert checks widths and tokens
    return (a.name.removesuffix("-quickgelu"), a.pretrained) == (b.name.removesuffix("-quickgelu"), b.pretrained)


_PARSERS: dict[str, Any] = {
    "kind": _kind,
    "precision": _precision,
    "csc": _bool,
    "n_ctx": lambda p, k, v: _int(p, k, v, 1, MAX_N_CTX),
    "ctx_init": _ctx_init,
    "class_token_position": _position,
    "image_size": _image_size,
    "backbone": _backbone,
    "prompt_depth": lambda p, k, v: _int(p, k, v, 1, MAX_PROMPT_DEPTH),
}


def inside(base: Path, value: Any, sidecar: Path, key: str) -> Path:
    """``value`` as a path inside ``base`` (no absolute path, drive, ``..`` or symlink out); must exist."""
    hint = f"give a path relative to the sidecar's folder for {key}"
    if not isinstance(value, str) or not value.strip():
        raise _bad(sidecar, f"{key} must be a relative path, got {short(value)}", hint)
    rel = Path(value)
    if rel.is_absolute() or PureWindowsPath(value).drive or value.startswith(("/", "\\")) or ".." in rel.parts:
        raise _bad(sidecar, f"{key} {short(value)} must stay inside the sidecar's folder", hint)
    base = base.absolute().resolve()
    try:
        target = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, or a symlink loop
        raise _bad(sidecar, f"cannot read {key} {short(value)} ({inert(exc, 120)})", hint) from None
    if not target.is_relative_to(base):
        raise _bad(sidecar, f"{key} {short(value)} resolves outside the sidecar's folder", hint)
    return target


def _read_classnames_file(sidecar: Path, value: Any) -> str:
    """The text of ``classnames_file``: a regular file inside the sidecar's folder, at most 1 MiB of UTF-8."""
    hint = "give the path of a text file next to the sidecar, relative to its folder (e.g. classnames.txt)"
    target = inside(sidecar.absolute().parent, value, sidecar, "classnames_file")
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


def _classnames(sidecar: Path, cfg: dict[str, Any]) -> tuple[str, ...] | None:
    """The class names (from ``classnames`` or ``classnames_file``, one per line), stripped and checked."""
    if "classnames" in cfg and "classnames_file" in cfg:
        raise UsageError(f"{sidecar}: give one of classnames, classnames_file (or neither, to recover them)")
    if "classnames_file" in cfg:
        names = [n.strip() for n in _read_classnames_file(sidecar, cfg["classnames_file"]).split("\n")]
        names = [n for n in names if n]
    elif "classnames" in cfg:
        names = cfg["classnames"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{sidecar}: classnames must be a list of strings, got {short(names)}")
        names = [n.strip() for n in names]
    else:
        return None
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
    return tuple(names)


def read_sidecar(path: Path) -> Sidecar:
    """Read and validate a sidecar (own keys, Dassl aliases, nested or dotted Dassl config).

    Raises:
        UsageError: unreadable, oversize or malformed YAML; not a mapping; an unknown key (the
            message lists the accepted ones); a bad value; an own key and an alias (or two
            aliases) that disagree; a ``classnames_file`` or ``local-dir:`` backbone outside the
            sidecar's folder or missing.
    """
    path = Path(path)
    try:
        raw = load_yaml(path, "the sidecar")
    except DocumentError as exc:
        raise _bad(path, inert(exc, 300), "give a small YAML or JSON mapping (see docs/model-format.md)") from None
    if not isinstance(raw, dict):
        raise _bad(path, "the sidecar must be a mapping")
    own, dassl = _split(path, raw)
    values: dict[str, Any] = {}
    sources: list[tuple[str, str]] = []
    for target, pairs in _gather(path, own, dassl).items():
        if target not in _PARSERS:
            continue
        parsed = [(key, _PARSERS[target](path, key, value)) for key, value in pairs]
        (first_key, first), *rest = parsed
        for key, value in rest:
            same = _same_backbone(first, value) if target == "backbone" else value == first
            if not same:
                raise _bad(
                    path,
                    f"{first_key} {short(_shown(first))} conflicts with {key} {short(_shown(value))} "
                    f"(both set {target})",
                    f"keep one of {first_key}, {key}, or make them agree",
                )
        own_first = next(((k, v) for k, v in parsed if k == target), parsed[0])  # the own key wins a compatible pair
        values[target] = own_first[1]
        sources.append((target, own_first[0]))
    backbone_dir = None
    bb = values.get("backbone")
    if isinstance(bb, BackboneRef) and bb.name.startswith(LOCAL):
        backbone_dir = inside(path.absolute().parent, bb.name[len(LOCAL) :], path, "backbone local-dir:")
        if not backbone_dir.is_dir():
            raise _bad(path, f"backbone {short(bb.name)} is not a folder", "name the open_clip backbone folder next to the sidecar")
    return Sidecar(
        path=path,
        backbone=bb,
        backbone_dir=backbone_dir,
        classnames=_classnames(path, own),
        kind=values.get("kind"),
        precision=values.get("precision"),
        n_ctx=values.get("n_ctx"),
        ctx_init=values.get("ctx_init"),
        image_size=values.get("image_size"),
        csc=values.get("csc"),
        class_token_position=values.get("class_token_position"),
        prompt_depth=values.get("prompt_depth"),
        sources=tuple(sources),
    )


def _shown(value: Any) -> Any:
    if isinstance(value, BackboneRef):
        return value.describe()
    return value.value if isinstance(value, (ModelKind, Precision)) else value
