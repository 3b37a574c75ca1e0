"""Load the frozen CLIP encoders named by a :class:`BackboneRef`, through open_clip's own APIs.

A backbone comes from the untrusted provider, and its ``open_clip_config.json`` decides what
open_clip runs: ``text_cfg.hf_tokenizer_name`` with ``tokenizer_kwargs: {trust_remote_code: true}``
makes open_clip hand the folder to ``transformers``, which imports Python shipped with the model;
``hf_model_name`` builds a transformers text tower; ``timm_model_name: "hf-hub:..."`` makes timm
fetch from the Hub. So a backbone may bring a closed list of things only:

- a ``local-dir:`` folder holds ``open_clip_config.json``, ``open_clip_model.safetensors`` and inert
  documents (:data:`LOCAL_FILES`, :data:`DOC_FILES`); anything else (code, tokenizer files,
  pickles) is refused;
- an ``hf-hub:org/repo`` backbone is fetched as exactly those two files with ``hf_hub_download``
  (honouring ``HF_HUB_OFFLINE`` and the cache); open_clip never resolves the Hub itself;
- the config is read here (bounded) and checked against an allow-list of open_clip's config keys
  and value types (:func:`validate_config`) before open_clip sees anything; open_clip then gets a
  private staging folder holding the validated config and a link to the safetensors weights, so it
  reads exactly what was checked and can find no other checkpoint;
- a built-in name must be one open_clip lists, its ``pretrained`` a tag open_clip lists for it, and
  its config must use open_clip's own tokenizer and towers (no transformers, no Hub names).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatekeeper.errors import BackboneError
from gatekeeper.models.manifest import BackboneRef
from gatekeeper.untrusted import DocumentError, inert, is_int, load_json, short

LOCAL = "local-dir:"
HF = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a real open_clip config is under 2 KiB
# what a local backbone folder may hold: the two files open_clip reads, the pretraining record
# gatekeeper's own tiny-world writes, and documents nothing loads
LOCAL_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, "pretrain_stats.json"})
DOC_FILES = frozenset(
    {"README.md", "README", "README.txt", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", ".gitattributes"}
)
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_WORD = re.compile(r"[A-Za-z0-9_]{0,32}")
_TIMM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ALLOWED_HINT = "a local backbone folder may hold only open_clip_config.json, open_clip_model.safetensors and README.md / LICENSE / .gitattributes"
_TOKENIZER_HINT = "gatekeeper loads backbones with open_clip's own CLIP tokenizer and towers: remove the key from open_clip_config.json"


# --------------------------------------------------------------------------- config allow-list


@dataclass(frozen=True)
class _Field:
    """One config value: ``check`` says whether it is acceptable, ``want`` says what it must be."""

    check: Callable[[Any], bool]
    want: str


_Schema = dict[str, Any]  # key -> _Field, or key -> a nested _Schema (an object)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int, hi: int) -> _Field:
    return _Field(lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _num(lo: float, hi: float) -> _Field:
    return _Field(lambda v: _is_num(v) and lo <= v <= hi, f"a finite number in [{lo}, {hi}]")


def _ints(count: int, lo: int, hi: int) -> _Field:
    """An integer, or a list of ``count`` integers, each in [lo, hi]."""
    return _Field(
        lambda v: (
            (is_int(v) and lo <= v <= hi)
            or (isinstance(v, list) and len(v) == count and all(is_int(x) and lo <= x <= hi for x in v))
        ),
        f"an integer in [{lo}, {hi}] or a list of {count} of them",
    )


def _opt(field: _Field) -> _Field:
    return _Field(lambda v: v is None or field.check(v), f"null or {field.want}")


def _kwargs(fields: dict[str, _Field]) -> _Field:
    keys = ", ".join(sorted(fields))
    return _Field(
        lambda v: v is None or (isinstance(v, dict) and all(k in fields and fields[k].check(x) for k, x in v.items())),
        f"null or an object with only the keys {keys}",
    )


def _three(positive: bool) -> _Field:
    return _Field(
        lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) and (x > 0 or not positive) for x in v),
        "a list of 3 finite numbers" + (" > 0" if positive else ""),
    )


_BOOL = _Field(lambda v: isinstance(v, bool), "true or false")
_FALSE = _Field(lambda v: v is False, "false (gatekeeper needs pooled features)")
_WORD_FIELD = _Field(
    lambda v: isinstance(v, str) and _WORD.fullmatch(v) is not None, "a short name of letters, digits or _"
)
_DIM = _int(1, 16384)
_LAYERS = _int(1, 128)
_NORM_KWARGS = _kwargs({"eps": _num(1e-12, 1.0)})
_ACT_KWARGS = _kwargs({"approximate": _Field(lambda v: v in ("none", "tanh"), "'none' or 'tanh'")})
_BLOCK = {  # attention-block switches shared by open_clip's vision and text towers
    "mlp_ratio": _num(0.0625, 64.0),
    "ls_init_value": _opt(_num(-1e3, 1e3)),
    "final_ln_after_pool": _BOOL,
    "pool_type": _WORD_FIELD,
    "output_tokens": _FALSE,
    "act_kwargs": _ACT_KWARGS,
    "norm_kwargs": _NORM_KWARGS,
    "block_type": _opt(_WORD_FIELD),
    "qk_norm": _BOOL,
    "scaled_cosine_attn": _BOOL,
    "scale_heads": _BOOL,
    "scale_attn_inner": _BOOL,
    "scale_attn": _BOOL,
    "scale_fc": _BOOL,
}
# open_clip's CLIPVisionCfg (model.py); timm names may not name a Hub repo or path, timm weights are off
VISION_FIELDS: _Schema = {
    **_BLOCK,
    "layers": _ints(4, 1, 128),
    "width": _DIM,
    "head_width": _DIM,
    "patch_size": _opt(_int(1, 1024)),
    "image_size": _ints(2, 1, 4096),
    "patch_dropout": _num(0.0, 0.99),
    "attentional_pool": _Field(lambda v: isinstance(v, bool) or _WORD_FIELD.check(v), "true, false or a short name"),
    "attn_pooler_queries": _int(1, 4096),
    "attn_pooler_heads": _int(1, 256),
    "no_ln_pre": _BOOL,
    "pos_embed_type": _WORD_FIELD,
    "timm_model_name": _opt(
        _Field(lambda v: isinstance(v, str) and _TIMM_NAME.fullmatch(v) is not None, "a plain timm architecture name")
    ),
    "timm_model_pretrained": _Field(lambda v: v is False, "false (timm must not download weights)"),
    "timm_pool": _WORD_FIELD,
    "timm_proj": _opt(_WORD_FIELD),
    "timm_proj_bias": _BOOL,
    "timm_drop": _num(0.0, 1.0),
    "timm_drop_path": _opt(_num(0.0, 1.0)),
}
# open_clip's CLIPTextCfg (model.py) without the Hugging Face tokenizer and text-tower keys
TEXT_FIELDS: _Schema = {
    **_BLOCK,
    "context_length": _int(1, 1024),
    "vocab_size": _int(1, 1_000_000),
    "width": _DIM,
    "heads": _int(1, 256),
    "layers": _LAYERS,
    "embed_cls": _BOOL,
    "pad_id": _int(0, 1_000_000),
    "eos_id": _int(0, 1_000_000),
    "no_causal_mask": _BOOL,
    "proj_bias": _BOOL,
    "proj_type": _WORD_FIELD,
}
# the keyword arguments of open_clip's CLIP / CustomTextCLIP that a config may set (no CoCa
# multimodal_cfg, no cast_dtype/output_dict: create_model sets those itself)
MODEL_FIELDS: _Schema = {
    "embed_dim": _DIM,
    "vision_cfg": VISION_FIELDS,
    "text_cfg": TEXT_FIELDS,
    "quick_gelu": _BOOL,
    "init_logit_scale": _num(-100.0, 100.0),
    "init_logit_bias": _opt(_num(-1e4, 1e4)),
    "nonscalar_logit_scale": _BOOL,
    "custom_text": _BOOL,
}
# open_clip's PreprocessCfg (transform.py)
PREPROCESS_FIELDS: _Schema = {
    "size": _ints(2, 1, 4096),
    "mode": _Field(lambda v: v == "RGB", "'RGB'"),
    "mean": _three(positive=False),
    "std": _three(positive=True),
    "interpolation": _Field(lambda v: v in ("bicubic", "bilinear", "random"), "'bicubic', 'bilinear' or 'random'"),
    "resize_mode": _Field(lambda v: v in ("shortest", "longest", "squash"), "'shortest', 'longest' or 'squash'"),
    "fill_color": _int(0, 255),
}
# keys that make open_clip import transformers (and, with trust_remote_code, the model's own code)
_HF_TEXT_KEYS = {
    "hf_tokenizer_name": "names a Hugging Face tokenizer (open_clip would load it through transformers)",
    "tokenizer_kwargs": "passes arguments to the tokenizer (trust_remote_code, file paths)",
    "tokenizer_mode": "selects a Hugging Face tokenizer mode",
    "hf_model_name": "names a Hugging Face text tower (open_clip would build it through transformers)",
    "hf_model_pretrained": "asks for Hugging Face text-tower weights",
    "hf_proj_type": "configures a Hugging Face text tower",
    "hf_pooler_type": "configures a Hugging Face text tower",
}


def _refuse(where: str, what: str, hint: str = _TOKENIZER_HINT) -> BackboneError:
    return BackboneError(f"backbone {where}: {what}", hint)


def _find_key(value: Any, key: str) -> str | None:
    """The dotted path of the first mapping key equal to ``key`` (case-insensitive), walked iteratively.

    Paths are cut to 200 characters as they grow, so a deep, wide document costs bounded memory.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                here = (f"{path}.{k}" if path else str(k))[:200]
                if isinstance(k, str) and k.lower() == key:
                    return here
                stack.append((here, v))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]"[:200], v) for i, v in enumerate(node))
    return None


def _check_section(where: str, section: str, value: Any, fields: _Schema) -> None:
    if not isinstance(value, dict):
        raise _refuse(where, f"{section} must be an object, got {short(value)}", "fix open_clip_config.json")
    for key, v in value.items():
        if key not in fields:
            raise _refuse(
                where,
                f"{section} has an unknown key {short(key)}",
                f"remove it: {section} may hold only {', '.join(sorted(fields))}",
            )
        field = fields[key]
        if isinstance(field, dict):
            _check_section(where, f"{section}.{key}", v, field)
        elif not field.check(v):
            raise _refuse(where, f"{section}.{key} must be {field.want}, got {short(v)}", "fix open_clip_config.json")


def _check_towers(where: str, model_cfg: dict[str, Any]) -> None:
    """Refuse what makes open_clip reach transformers or the network, in any config (built-in too)."""
    text = model_cfg.get("text_cfg")
    if isinstance(text, dict):
        for key, why in _HF_TEXT_KEYS.items():
            if key in text:
                raise _refuse(where, f"model_cfg.text_cfg.{key} {why}; gatekeeper never loads transformers for a model")
    vision = model_cfg.get("vision_cfg")
    if isinstance(vision, dict):
        timm = vision.get("timm_model_name")
        if isinstance(timm, str) and (":" in timm or "/" in timm):
            raise _refuse(
                where,
                f"model_cfg.vision_cfg.timm_model_name {short(timm)} names a Hub repo or a path (timm would fetch it)",
                "use a plain timm architecture name; the weights come from open_clip_model.safetensors",
            )
        if vision.get("timm_model_pretrained") not in (None, False):
            raise _refuse(
                where,
                "model_cfg.vision_cfg.timm_model_pretrained asks timm to download weights",
                "set it to false; the weights come from open_clip_model.safetensors",
            )


def validate_config(raw: Any, where: str) -> dict[str, Any]:
    """Check a provider's ``open_clip_config.json`` against the allow-list; return it unchanged.

    Args:
        raw: the parsed JSON.
        where: how to name the backbone in errors (already inert).

    Raises:
        BackboneError: not an object, an unknown key, a value of the wrong type or out of bounds,
            ``trust_remote_code`` anywhere, a Hugging Face tokenizer or text tower, a timm Hub name
            or timm pretrained weights.
    """
    found = _find_key(raw, "trust_remote_code")
    if found is not None:
        raise _refuse(where, f"{CONFIG_NAME} sets {inert(found, 120)}: it asks to run code shipped with the model")
    if not isinstance(raw, dict) or "model_cfg" not in raw:
        raise _refuse(
            where,
            f"{CONFIG_NAME} must be an object with 'model_cfg' (and optional 'preprocess_cfg')",
            "see docs/model-format.md",
        )
    extra = sorted(k for k in raw if k not in ("model_cfg", "preprocess_cfg"))
    if extra:
        raise _refuse(
            where,
            f"{CONFIG_NAME} has unknown top-level key(s) {short(extra)}",
            "it may hold only model_cfg and preprocess_cfg",
        )
    model_cfg = raw["model_cfg"]
    if not isinstance(model_cfg, dict):
        raise _refuse(where, f"model_cfg must be an object, got {short(model_cfg)}", "fix open_clip_config.json")
    _check_towers(where, model_cfg)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise _refuse(where, f"model_cfg lacks {', '.join(missing)}", "fix open_clip_config.json")
    _check_section(where, "model_cfg", model_cfg, MODEL_FIELDS)
    if "preprocess_cfg" in raw:
        _check_section(where, "preprocess_cfg", raw["preprocess_cfg"], PREPROCESS_FIELDS)
    return raw


def read_config(path: Path, where: str) -> dict[str, Any]:
    """Read and validate ``open_clip_config.json`` (at most :data:`MAX_CONFIG_BYTES`, strict JSON).

    Raises:
        BackboneError: unreadable, too large, not UTF-8, not JSON (NaN, duplicate keys and
            runaway nesting included), or refused by :func:`validate_config`.
    """
    try:
        raw = load_json(path, CONFIG_NAME, MAX_CONFIG_BYTES)
    except DocumentError as exc:
        raise _refuse(where, str(exc), "the backbone needs a valid open_clip_config.json") from None
    return validate_config(raw, where)


# --------------------------------------------------------------------------- where a backbone comes from


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _link_roots(root: Path) -> tuple[Path, ...]:
    """Where a backbone file may point: the model folder, and for a Hub snapshot its repo's blobs."""
    if root.parent.name == "snapshots":  # .../models--org--name/snapshots/<sha>: files link into ../../blobs
        return (root, root.parent.parent / "blobs")
    return (root,)


def local_backbone_dir(folder: Path, ref: BackboneRef) -> Path:
    """Resolve a ``local-dir:`` backbone inside the model folder and check what it holds.

    Raises:
        BackboneError: no folder named, a path that cannot be resolved (symlink loop), escapes the
            model folder or lacks the open_clip files, or a folder holding anything outside
            :data:`LOCAL_FILES` and :data:`DOC_FILES` (code, tokenizer files, pickles, subfolders).
    """
    rel = ref.name[len(LOCAL) :]
    shown = short(rel, 120)
    if not rel.strip():
        raise BackboneError(
            "backbone 'local-dir:' names no folder", "write local-dir:SUBFOLDER, e.g. local-dir:backbone"
        )
    try:
        root = Path(folder).resolve(strict=True)
        path = (root / rel).resolve()
        is_dir = path.is_dir()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte, an unreadable folder
        raise BackboneError(
            f"local backbone {shown} cannot be resolved ({type(exc).__name__}: a symlink loop or an unusable path)",
            "make the backbone a plain subfolder of the model folder, not a symlink",
        ) from None
    if not _inside(path, (root,)):
        raise BackboneError(
            f"backbone path {shown} points outside the model folder {inert(folder)}",
            "a local backbone must be a subfolder of the model folder",
        )
    if not is_dir:
        raise BackboneError(
            f"local backbone {shown} has no {CONFIG_NAME} (no such folder)",
            "a local backbone folder holds open_clip_config.json + open_clip_model.safetensors",
        )
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise BackboneError(
            f"cannot list local backbone {shown} ({inert(exc.strerror or exc, 80)})", "check permissions"
        ) from None
    names = {e.name for e in entries}
    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if needed not in names:
            raise BackboneError(
                f"local backbone {shown} has no {needed}",
                "a local backbone folder holds open_clip_config.json + open_clip_model.safetensors",
            )
    unexpected = [e.name for e in entries if e.name not in LOCAL_FILES | DOC_FILES]
    if unexpected:
        pickles = [n for n in unexpected if n.lower().endswith(_PICKLE_SUFFIXES)]
        what = (
            "pickle weight files" if pickles else "files gatekeeper does not load (code, tokenizer files or other data)"
        )
        listed = ", ".join(short(n, 60) for n in unexpected[:10]) + (
            f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        )
        raise BackboneError(f"local backbone {shown} contains {what}: {listed}", f"remove {listed}: {_ALLOWED_HINT}")
    roots = _link_roots(root)
    for entry in entries:
        try:
            target = entry.resolve(strict=True)
            regular = stat.S_ISREG(os.stat(target).st_mode)
        except (OSError, RuntimeError):
            regular, target = False, entry
        if not regular or not _inside(target, roots):
            raise BackboneError(
                f"local backbone {shown}: {short(entry.name, 60)} is not a regular file inside the model folder",
                "replace links and folders with the file itself",
            )
    return path


def _hub_repo(ref: BackboneRef) -> str:
    repo = ref.name[len(HF) :]
    if not _REPO_ID.fullmatch(repo) or ".." in repo or "--" in repo:
        raise BackboneError(
            f"backbone {short(ref.name, 120)} is not a valid hf-hub:org/repo name",
            "use hf-hub:org/repo with letters, digits, '.', '_' or '-' (no '..' or '--')",
        )
    return repo


def _hub_file(repo: str, filename: str, where: str) -> Path:
    """``filename`` of ``repo`` from the Hub or the Hub cache (``HF_HUB_OFFLINE`` honoured)."""
    from huggingface_hub import hf_hub_download

    from gatekeeper.sources._redact import redact

    try:
        path = Path(hf_hub_download(repo_id=repo, filename=filename)).resolve(strict=True)
    except Exception as exc:  # offline and not cached, no such repo or file, HTTP errors: fail closed
        first = _first_line(exc)
        raise BackboneError(
            f"backbone {where} did not load: {filename}: {inert(redact(first), 300)}",
            "the repo must hold open_clip_config.json and open_clip_model.safetensors; when offline, they must be "
            "in the Hub cache (HF_HUB_OFFLINE=1)",
        ) from None  # no chained error: it may carry the token
    if not path.is_file():
        raise BackboneError(
            f"backbone {where}: {filename} in the Hub cache is not a regular file", "clear the Hub cache entry"
        )
    return path


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        text = ""
    return text.splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def _staging(config: dict[str, Any], weights: Path) -> Iterator[Path]:
    """A private folder holding the validated config and a link to the weights, removed afterwards."""
    stage = Path(tempfile.mkdtemp(prefix="gatekeeper-backbone-"))
    try:
        (stage / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
        try:
            os.symlink(weights, stage / WEIGHTS_NAME)
        except OSError:  # no symlinks on this file system
            shutil.copyfile(weights, stage / WEIGHTS_NAME)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_builtin(name: str, pretrained: Any) -> None:
    """A built-in name open_clip lists, a tag open_clip lists for it, open_clip's own tokenizer."""
    import open_clip

    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model name {short(name, 120)}",
            "use a name from open_clip.list_models(), an hf-hub:org/repo, or local-dir:SUBFOLDER",
        )
    if pretrained is not None:
        tags = list(open_clip.list_pretrained_tags_by_model(name))
        if not isinstance(pretrained, str) or pretrained.lower().replace("-", "_") not in tags:
            raise BackboneError(
                f"backbone 'pretrained' {short(pretrained, 120)} is not an open_clip pretrained tag for {name}",
                (
                    f"use one of {', '.join(tags[:8])}" + (", ..." if len(tags) > 8 else "")
                    if tags
                    else f"{name} has no pretrained tags"
                )
                + " (never a path or URL), or a local-dir: safetensors backbone",
            )
    where = short(name, 120)
    _check_towers(where, open_clip.get_model_config(name) or {})
    if "siglip" in name.lower():  # open_clip picks a Hugging Face tokenizer for these by name
        raise _refuse(
            where, "SigLIP models use a Hugging Face tokenizer; gatekeeper never loads transformers for a model"
        )


@contextmanager
def _open_clip_source(folder: Path, ref: BackboneRef) -> Iterator[tuple[str, str | None, str]]:
    """(name for open_clip, pretrained tag, staging path to hide in messages), after every check."""
    if ref.name.startswith(LOCAL):
        path = local_backbone_dir(folder, ref)
        config = read_config(path / CONFIG_NAME, short(ref.name, 120))
        with _staging(config, (path / WEIGHTS_NAME).resolve()) as stage:
            yield LOCAL + str(stage), None, str(stage)
    elif ref.name.startswith(HF):
        repo = _hub_repo(ref)
        where = short(ref.name, 120)
        config = read_config(_hub_file(repo, CONFIG_NAME, where), where)
        weights = _hub_file(repo, WEIGHTS_NAME, where)
        with _staging(config, weights) as stage:
            yield LOCAL + str(stage), None, str(stage)
    else:
        _check_builtin(ref.name, ref.pretrained)
        yield ref.name, ref.pretrained, ""


def open_clip_name(folder: Path, ref: BackboneRef) -> str:
    """The checked backbone folder (``local-dir:``) or name (``hf-hub:``, built-in) the reference denotes.

    Checks what can be checked without the network; the open_clip name actually used by
    :func:`load_backbone` is a private staging folder for ``local-dir:`` and ``hf-hub:``.
    """
    if ref.name.startswith(LOCAL):
        return LOCAL + str(local_backbone_dir(folder, ref))
    if ref.name.startswith(HF):
        return HF + _hub_repo(ref)
    _check_builtin(ref.name, ref.pretrained)
    return ref.name


def load_backbone(folder: Path, ref: BackboneRef) -> tuple[Any, Any]:
    """Create the open_clip model and its tokenizer, in eval mode, weights frozen.

    Returns:
        (model, tokenizer)

    Raises:
        BackboneError: the reference does not resolve (offline without a cache, unknown name or
            tag, missing repo), the backbone brings something outside the allow-list (code,
            tokenizer files, pickles, a config key or value open_clip must not see), or the
            weights do not load.
    """
    import open_clip

    logging.getLogger("open_clip").setLevel(logging.ERROR)
    with _open_clip_source(Path(folder), ref) as (name, pretrained, stage):
        try:
            model = open_clip.create_model(name, pretrained=pretrained, load_weights=True)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/HF errors
            from gatekeeper.sources._redact import redact

            first = _first_line(exc)
            if stage:
                first = first.replace(stage, "<backbone>")
            raise BackboneError(
                f"backbone {short(ref.describe(), 120)} did not load: {inert(redact(first), 300)}",
                "check the name/tag, and when offline that the weights are in the Hub cache (HF_HUB_OFFLINE=1)",
            ) from exc
    if not hasattr(model, "token_embedding"):
        raise BackboneError(
            f"backbone {short(ref.describe(), 120)} has a custom text tower (no token_embedding)",
            "prompt-tuned models need an open_clip CLIP with the standard text transformer",
        )
    from gatekeeper.models.prompt_tuned import TEXT_POOL_TYPES

    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in TEXT_POOL_TYPES:
        raise BackboneError(
            f"backbone {short(ref.describe(), 120)} pools its text tower with {short(pool)} (text_cfg.pool_type)",
            f"prompt-tuned models need one pooled feature per prompt: pool_type {', '.join(TEXT_POOL_TYPES)}",
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
