"""`gatekeeper convert` as an auditor meets it: Dassl sidecar names, the backbone, class names checked or recovered."""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from gatekeeper.cli import main
from gatekeeper.errors import BackboneError, ExitCode, ModelFormatError, UsageError, exit_code_for
from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.checkpoint import convert_checkpoint
from gatekeeper.models.loader import load_model
from gatekeeper.models.manifest import BackboneRef, ModelKind, Precision, read_manifest
from tests.conftest import BACKBONE

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("square", "circle", "star", "cross")
NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 20 classes
META = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")


def _clip(backbone: Path) -> tuple[Any, Any]:
    return load_backbone(backbone.parent, BackboneRef(name=f"local-dir:{backbone.name}"))


def dassl_state(
    names: list[str],
    backbone: Path = BACKBONE,
    meta: bool = False,
    dtype: torch.dtype = torch.float32,
    n_ctx: int = 4,
    ctx_init: str | None = None,
    ctx_dim: int | None = None,
    vis_dim: int | None = None,
    csc: bool = False,
) -> dict[str, torch.Tensor]:
    """A CoOp (or CoCoOp) prompt learner's state_dict, built the way CoOp builds one: the token
    embeddings of "X X X X {name}." (or of "{ctx_init} {name}.") sliced around the context;
    ``csc``: one context per class ([K, n_ctx, d], CoOp's class-specific contexts)."""
    clip, tokenizer = _clip(backbone)
    prompt = ctx_init or " ".join(["X"] * n_ctx)
    with torch.no_grad():
        emb = clip.token_embedding(tokenizer([f"{prompt} {n.replace('_', ' ')}." for n in names])).to(dtype)
    d = ctx_dim or emb.shape[-1]
    g = torch.Generator().manual_seed(0)
    shape = (len(names), n_ctx, d) if csc else (n_ctx, d)
    state: dict[str, torch.Tensor] = OrderedDict(ctx=(torch.randn(shape, generator=g) * 0.02).to(dtype))
    if meta:
        v = vis_dim or int(clip.visual.output_dim)
        state.update(
            {
                "meta_net.linear1.weight": torch.randn(v // 16, v, generator=g).to(dtype),
                "meta_net.linear1.bias": torch.zeros(v // 16, dtype=dtype),
                "meta_net.linear2.weight": torch.randn(d, v // 16, generator=g).to(dtype),
                "meta_net.linear2.bias": torch.zeros(d, dtype=dtype),
            }
        )
    state["token_prefix"] = emb[:, :1].clone()
    state["token_suffix"] = emb[:, 1 + n_ctx :].clone()
    return state


def dassl_checkpoint(folder: Path, names: list[str], **kw: Any) -> Path:
    """``folder/prompt_learner/model.pth.tar-50`` holding :func:`dassl_state` as Dassl's save_checkpoint writes it."""
    path = folder / "prompt_learner" / "model.pth.tar-50"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": dassl_state(names, **kw), "epoch": 50, "optimizer": None, "scheduler": None}, path)
    return path


def sidecar(folder: Path, text: str | dict[str, Any]) -> Path:
    path = folder / "sidecar.yaml"
    path.write_text(text if isinstance(text, str) else json.dumps(text), encoding="utf-8")
    return path


def _convert(tmp_path: Path, names: list[str], side: str | dict[str, Any], **ckpt: Any) -> Any:
    ckpt_path = dassl_checkpoint(tmp_path, names, **ckpt)
    return convert_checkpoint(ckpt_path, sidecar(tmp_path, side), tmp_path / "out", backbone=BACKBONE)


# --- class names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "dtype"), [(False, torch.float32), (True, torch.float16)], ids=["coop-fp32", "cocoop-fp16"]
)
def test_the_right_names_pass_and_the_folder_loads(tmp_path: Path, meta: bool, dtype: torch.dtype) -> None:
    done = _convert(tmp_path, NAMES, {"classnames": NAMES}, meta=meta, dtype=dtype)
    m = done.manifest
    assert m.classnames == tuple(NAMES)
    assert m.kind == (ModelKind.COCOOP if meta else ModelKind.COOP)
    assert m.precision == (Precision.FP16 if dtype == torch.float16 else Precision.FP32)
    assert (m.image_size, m.n_ctx, m.backbone.name) == (32, 4, "local-dir:backbone")  # size from the backbone
    assert "checked against the checkpoint" in done.classnames_from and "attached" in done.backbone_from
    assert sorted(p.name for p in (tmp_path / "out" / "backbone").iterdir()) == sorted(p.name for p in BACKBONE.iterdir())
    model = load_model(tmp_path / "out")
    assert torch.equal(model.token_suffix, dassl_suffix(tmp_path).float()) or dtype == torch.float16


def dassl_suffix(tmp_path: Path) -> torch.Tensor:
    state = torch.load(tmp_path / "prompt_learner" / "model.pth.tar-50", weights_only=True)["state_dict"]
    return state["token_suffix"]


def test_a_reversed_list_is_refused_at_the_first_position(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError) as info:
        _convert(tmp_path, NAMES, {"classnames": NAMES[::-1]})
    msg = info.value.one_line()
    assert "class 0" in msg and "'red square'" in msg and "'purple cross'" in msg and "listed at 19" in msg
    assert exit_code_for(info.value) == ExitCode.SCAN_ERROR and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_a_wrong_count_is_refused_with_both_counts(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="holds 20 classes .* lists 19 class names"):
        _convert(tmp_path, NAMES, {"classnames": NAMES[:19]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_names_are_recovered_when_none_are_given(tmp_path: Path, dtype: torch.dtype) -> None:
    done = _convert(tmp_path, NAMES, {}, meta=True, dtype=dtype, ctx_init="a photo of a")
    assert done.manifest.classnames == tuple(NAMES)
    assert "recovered" in done.classnames_from and "token_suffix" in done.classnames_from
    assert read_manifest(tmp_path / "out").classnames == tuple(NAMES)


def test_recovered_names_rebuild_the_same_prompts(tmp_path: Path) -> None:
    names = ["Red.Star", "white_ring", "PINK  cross", "a"]  # the tiny backbone's vocabulary holds these words only
    done = _convert(tmp_path, names, {})
    assert done.manifest.classnames == ("red . star", "white ring", "pink cross", "a")  # as the tokens read
    model = load_model(tmp_path / "out")
    assert torch.equal(model.token_suffix, dassl_suffix(tmp_path))


def test_tokens_sharing_one_embedding_are_not_guessed(tmp_path: Path) -> None:
    """The tiny backbone pruned its vocabulary to 23 live tokens: the others share one embedding."""
    with pytest.raises(ModelFormatError, match="class 1: token_suffix position 0 is the embedding of several"):
        _convert(tmp_path, ["red star", "tabby cat"], {})
    assert _convert(tmp_path, ["red star", "tabby cat"], {"classnames": ["red star", "tabby cat"]}).manifest.classnames == (
        "red star",
        "tabby cat",
    )


def test_underscores_match_as_coop_reads_them(tmp_path: Path) -> None:
    names = ["white_ring", "red_star", "blue"]
    done = _convert(tmp_path, names, {"classnames": names})
    assert done.manifest.classnames == ("white ring", "red star", "blue")
    assert any("underscores" in n for n in done.notes)


def test_prompt_tokens_of_another_backbone_are_refused(tmp_path: Path, random_backbone: Path) -> None:
    for given in ({"classnames": NAMES}, {}):
        with pytest.raises(ModelFormatError, match="start-of-text") as info:
            _convert(tmp_path, NAMES, given, backbone=random_backbone)
        assert "another backbone" in info.value.one_line()
        assert not (tmp_path / "out").exists()


def test_suffix_rows_that_are_not_token_embeddings_are_refused(tmp_path: Path) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES)
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["token_suffix"][3, 1] += 0.01  # class 3's second token no longer a vocabulary entry
    torch.save(saved, ckpt)
    with pytest.raises(ModelFormatError, match="class 3: token_suffix position 1 is not a token embedding"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {}), tmp_path / "out", backbone=BACKBONE)
    with pytest.raises(ModelFormatError, match="class 3: token_suffix is not the token embeddings of 'red cross'"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {"classnames": NAMES}), tmp_path / "out", backbone=BACKBONE)


# --- the backbone -----------------------------------------------------------------------------


def test_a_local_dir_backbone_next_to_the_sidecar_is_attached(tmp_path: Path) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3])
    shutil.copytree(BACKBONE, tmp_path / "clip")
    side = sidecar(tmp_path, "backbone: {name: 'local-dir:clip'}\n")
    done = convert_checkpoint(ckpt, side, tmp_path / "out")
    assert done.manifest.backbone == BackboneRef(name="local-dir:backbone")
    assert (tmp_path / "out" / "backbone" / "open_clip_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["local-dir:../elsewhere", "local-dir:missing", "local-dir:/etc"])
def test_a_local_dir_outside_the_sidecar_folder_or_missing_is_a_usage_error(tmp_path: Path, name: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    work = tmp_path / "delivery"
    ckpt = dassl_checkpoint(work, NAMES[:3])
    side = sidecar(work, {"backbone": {"name": name}})
    with pytest.raises(UsageError, match="backbone local-dir"):
        convert_checkpoint(ckpt, side, work / "out")
    assert not (work / "out").exists()


def test_cli_backbone_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3])
    side = sidecar(tmp_path, {})
    base = ["convert", str(ckpt), "--sidecar", str(side), "--out", str(tmp_path / "out")]
    assert main([*base, "--backbone", str(tmp_path / "no-such-folder")]) == 4
    assert "no such folder" in capsys.readouterr().err
    assert main([*base, "--backbone", "local-dir:backbone"]) == 4
    assert main(base) == 4  # no backbone anywhere
    assert "no backbone" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pt").write_bytes(b"x")
    assert main([*base, "--backbone", str(tmp_path / "junk")]) == 2  # a folder that is not an open_clip backbone
    assert "open_clip_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*base, "--backbone", str(BACKBONE)]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "recovered" in out and "attached from" in out


def test_a_missing_local_backbone_refuses_instead_of_failing_at_scan_time(tmp_path: Path) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3])
    with pytest.raises(BackboneError):
        convert_checkpoint(ckpt, sidecar(tmp_path, {}), tmp_path / "out", backbone="hf-hub:nobody/nothing")
    assert not (tmp_path / "out").exists()


def test_width_mismatches_are_refused_at_convert_time(tmp_path: Path) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3], ctx_dim=32)  # ctx narrower than the prompt tokens and the backbone
    with pytest.raises(ModelFormatError, match="token_prefix .* not"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {}), tmp_path / "out", backbone=BACKBONE)
    saved = torch.load(ckpt, weights_only=True)
    for k in ("token_prefix", "token_suffix"):
        del saved["state_dict"][k]
    torch.save(saved, ckpt)
    with pytest.raises(ModelFormatError, match="ctx is 32 wide but backbone .* has text width 64"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {"classnames": ["a", "b"]}), tmp_path / "out", backbone=BACKBONE)
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3], meta=True, vis_dim=96)
    with pytest.raises(ModelFormatError, match="meta_net.linear1 takes 96-wide image features but backbone .* gives 64"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {}), tmp_path / "out", backbone=BACKBONE)
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3])
    with pytest.raises(ModelFormatError, match="image_size is 224 but backbone .* takes 32x32"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {"image_size": 224}), tmp_path / "out", backbone=BACKBONE)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_prompt_tokens_needs_names_and_says_they_are_unchecked(tmp_path: Path) -> None:
    ckpt = dassl_checkpoint(tmp_path, NAMES[:3])
    saved = torch.load(ckpt, weights_only=True)
    for k in ("token_prefix", "token_suffix"):
        del saved["state_dict"][k]
    torch.save(saved, ckpt)
    with pytest.raises(UsageError, match="no class names"):
        convert_checkpoint(ckpt, sidecar(tmp_path, {}), tmp_path / "out", backbone=BACKBONE)
    done = convert_checkpoint(ckpt, sidecar(tmp_path, {"classnames": ["a", "b"]}), tmp_path / "out", backbone=BACKBONE)
    assert "not checked" in done.classnames_from


# --- Dassl's own sidecar names ----------------------------------------------------------------

DASSL_CONFIG = """\
# CoOp's configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml, plus what train.py sets
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 1
INPUT:
  SIZE: (32, 32)
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.002
MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
TRAINER:
  NAME: CoCoOp
  COCOOP:
    N_CTX: 4
    CTX_INIT: "a photo of a"
    PREC: "fp16"
  COOP:
    N_CTX: 16
    CSC: False
"""


def test_a_dassl_config_is_read_as_a_sidecar(tmp_path: Path) -> None:
    done = _convert(tmp_path, NAMES, DASSL_CONFIG, meta=True, dtype=torch.float16, ctx_init="a photo of a")
    m = done.manifest
    assert (m.kind, m.precision, m.n_ctx, m.ctx_init, m.image_size) == (ModelKind.COCOOP, Precision.FP16, 4, "a photo of a", 32)
    assert m.backbone.name == "local-dir:backbone"  # --backbone replaces MODEL.BACKBONE.NAME


def test_dotted_and_lower_case_aliases(tmp_path: Path) -> None:
    side = "trainer: CoOp\nprec: amp\nTRAINER.COOP.N_CTX: 4\nTRAINER.COOP.CLASS_TOKEN_POSITION: end\ncsc: false\n"
    done = _convert(tmp_path, NAMES[:4], side)
    assert (done.manifest.kind, done.manifest.precision) == (ModelKind.COOP, Precision.FP32)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kind: coop\nTRAINER: {NAME: CoCoOp}\n", r"kind 'coop' conflicts with TRAINER.NAME 'cocoop'"),
        ("precision: fp32\nprec: fp16\n", r"precision 'fp32' conflicts with prec 'fp16'"),
        ("n_ctx: 4\nTRAINER.COOP.N_CTX: 8\n", r"n_ctx 4 conflicts with TRAINER.COOP.N_CTX 8"),
        ("trainer: PromptSRC\n", r"trainer 'PromptSRC' is not a trainer"),
        ("colour: red\n", r"unknown sidecar key\(s\) 'colour' .*accepted: backbone, class_token_position"),
        ("TRAINER: {COOP: {N_CTXX: 4}}\n", r"unknown sidecar key 'TRAINER.COOP.N_CTXX'"),
        ("TRAINER: {COOP: {N_CTX: 4}, COCOOP: {N_CTX: 4}}\n", r"both given and no trainer is named"),
        ("INPUT: {SIZE: [32, 48]}\n", r"not square"),
    ],
    ids=["kind", "prec", "n_ctx", "trainer", "unknown", "unknown-dassl", "two-sections", "size"],
)
def test_sidecar_alias_errors_name_both_keys(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        _convert(tmp_path, NAMES[:4], text)
    assert re.search(needle, info.value.one_line()), info.value.one_line()
    assert exit_code_for(info.value) == ExitCode.USAGE and "\n" not in info.value.one_line()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("TRAINER.COOP.N_CTX: 16\n", r"TRAINER.COOP.N_CTX is 16 but the checkpoint's ctx holds 4 vectors"),
        ("csc: true\n", r"csc is True but ctx has shape \(4, 64\)"),
        ("kind: cocoop\n", r"CoCoOp \(kind in .*\) needs"),
        # KgCoOp's and ProGrad's sections are checked like CoOp's
        ("TRAINER: {NAME: KgCoOp, KGCOOP: {N_CTX: 4, LAMBDA: 1.0}}\n", r"unknown sidecar key 'TRAINER.KGCOOP.LAMBDA'"),
        ("TRAINER: {NAME: ProGrad, PROGRAD: {N_CTX: 8}}\n", r"TRAINER.PROGRAD.N_CTX is 8 but the checkpoint's ctx"),
        ("TRAINER: {KGCOOP: {N_CTX: 4}, PROGRAD: {N_CTX: 4}}\n", r"TRAINER.KGCOOP and TRAINER.PROGRAD are both given"),
    ],
    ids=["n_ctx", "csc", "kind", "kgcoop-unknown-key", "prograd-n_ctx", "two-sections"],
)
def test_sidecar_values_the_checkpoint_contradicts_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises((UsageError, ModelFormatError)) as info:
        _convert(tmp_path, NAMES[:4], text)
    assert re.search(needle, info.value.one_line()), info.value.one_line()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("position", ["middle", "front"])
def test_dassl_class_token_position_is_read_and_the_folder_loads(tmp_path: Path, position: str) -> None:
    """CoOp's CLASS_TOKEN_POSITION from the provider's own config reaches the manifest and the model."""
    from gatekeeper.models.loader import load_model
    from gatekeeper.models.manifest import ClassTokenPosition

    text = f"TRAINER: {{NAME: CoOp, COOP: {{N_CTX: 4, CLASS_TOKEN_POSITION: {position}}}}}\nclassnames: {NAMES[:4]}\n"
    done = _convert(tmp_path, NAMES[:4], text)
    assert done.manifest.class_token_position == ClassTokenPosition(position)
    model = load_model(tmp_path / "out")
    assert model.manifest.class_token_position == ClassTokenPosition(position)


# --- CoOp's descendants: KgCoOp and ProGrad ---------------------------------------------------

# as the official repos write them: TRAINER.COOP holds the options (plus their loss weights ALPHA /
# W), CTX_INIT is a bool, and a top-level LOSS section carries ProGrad's distillation settings
OFFICIAL_DESCENDANT = """\
INPUT:
  SIZE: (32, 32)
LOSS: {{NAME: prograd, T: 1.0, LAMBDA: 1.0, GM: false, ALPHA: 0.0}}
TRAINER:
  NAME: {trainer}
  COOP: {{N_CTX: 4, CSC: false, CTX_INIT: true, PREC: fp16, CLASS_TOKEN_POSITION: {position}, ALPHA: 1.0, W: 8.0}}
  COCOOP: {{N_CTX: 16, CTX_INIT: false, PREC: fp16}}
"""
# as toolboxes that gather many trainers write them: each in its own section
OWN_SECTION = """\
TRAINER:
  NAME: {trainer}
  {section}: {{N_CTX: 4, CSC: false, CTX_INIT: "", PREC: fp32, CLASS_TOKEN_POSITION: {position}, {extra}}}
  COOP: {{N_CTX: 16, CLASS_TOKEN_POSITION: end}}
"""


@pytest.mark.parametrize("trainer", ["KgCoOp", "ProGrad"])
@pytest.mark.parametrize("layout", ["official", "own-section"])
def test_kgcoop_and_prograd_checkpoints_convert_as_coop(tmp_path: Path, trainer: str, layout: str) -> None:
    """Their prompt learner is CoOp's (ctx, token_prefix, token_suffix): the checkpoint converts as
    CoOp, with the options read from the section their train.py writes, and the folder scans as CoOp."""
    from gatekeeper.models.manifest import ClassTokenPosition

    if layout == "official":
        text = OFFICIAL_DESCENDANT.format(trainer=trainer, position="middle")
        dtype, precision, ctx_init = torch.float16, Precision.FP16, None
    else:
        section, extra = ("KGCOOP", "W: 8.0") if trainer == "KgCoOp" else ("PROGRAD", "LAMBDA: 1.0, T: 1.0")
        text = OWN_SECTION.format(trainer=trainer, section=section, position="middle", extra=extra)
        dtype, precision, ctx_init = torch.float32, Precision.FP32, None
    text += f"classnames: {NAMES[:4]}\n"
    done = _convert(tmp_path, NAMES[:4], text, dtype=dtype)
    m = done.manifest
    assert (m.kind, m.precision, m.n_ctx, m.ctx_init) == (ModelKind.COOP, precision, 4, ctx_init)
    assert m.class_token_position == ClassTokenPosition.MIDDLE  # from the trainer's section, not the other one
    model = load_model(tmp_path / "out")
    assert model.kind == ModelKind.COOP and model.logits(torch.rand(2, 3, 32, 32)).shape == (2, 4)
