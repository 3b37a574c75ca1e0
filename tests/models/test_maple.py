"""MaPLe: the model's logits against a plain re-implementation, Dassl convert, a scan, refusals."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gatekeeper.errors import ModelFormatError
from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.manifest import WEIGHTS_NAME, BackboneRef, Manifest, ModelKind, read_manifest
from gatekeeper.models.maple import MaPLeCLIP, maple_keys
from tests.conftest import BACKBONE

NAMES = ("red circle", "blue square", "green star", "white ring")
N_CTX = 2


def tiny_clip() -> tuple[Any, Any]:
    return load_backbone(BACKBONE.parent, BackboneRef(name=f"local-dir:{BACKBONE.name}"))


def random_learner(clip: Any, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """MaPLe's prompt-learner tensors (its names), random and large enough to move the logits."""
    d_text, d_vis = int(clip.ln_final.weight.shape[0]), int(clip.visual.transformer.width)
    g = torch.Generator().manual_seed(seed)
    shapes = {"ctx": (N_CTX, d_text), "proj.weight": (d_vis, d_text), "proj.bias": (d_vis,)}
    for i in range(depth - 1):
        shapes |= {f"compound_prompts_text.{i}": (N_CTX, d_text), f"compound_prompt_projections.{i}.weight": (d_vis, d_text),
                   f"compound_prompt_projections.{i}.bias": (d_vis,)}
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}


def maple_manifest(depth: int) -> Manifest:
    return Manifest(kind=ModelKind.MAPLE, classnames=NAMES, backbone=BackboneRef(name="local-dir:backbone"), image_size=32,
                    n_ctx=N_CTX, prompt_depth=depth)


def build(clip: Any, tokenizer: Any, state: dict[str, torch.Tensor], depth: int) -> MaPLeCLIP:
    from gatekeeper.models.maple import maple_from_state

    return maple_from_state(clip, tokenizer, maple_manifest(depth), state, Path("mem")).eval()


# ------------------------------------------------------------------ an independent forward


def _attention(blk: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head self-attention written out from the packed weights (x is (N, L, W))."""
    attn = blk.attn
    heads, (n, length, width) = attn.num_heads, x.shape
    q, k, v = (x @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.view(n, length, heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, length, width)
    return out @ attn.out_proj.weight.t() + attn.out_proj.bias


def _block(blk: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x + blk.ls_1(_attention(blk, blk.ln_1(x), mask))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def plain_logits(clip: Any, tokenizer: Any, s: dict[str, torch.Tensor], depth: int, images: torch.Tensor) -> torch.Tensor:
    """MaPLe's forward as its paper and code describe it, one layer at a time."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    vis, b = clip.visual, images.shape[0]
    lin = lambda i, t: t @ s[f"compound_prompt_projections.{i}.weight"].t() + s[f"compound_prompt_projections.{i}.bias"]  # noqa: E731
    vprompts = [s["ctx"] @ s["proj.weight"].t() + s["proj.bias"]]
    vprompts += [lin(i, s[f"compound_prompts_text.{i}"]) for i in range(depth - 1)]
    patches = vis.conv1((images - mean) / std).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(b, 1, -1), patches], 1) + vis.positional_embedding
    x = vis.ln_pre(torch.cat([x, vprompts[0].expand(b, -1, -1)], 1))
    for i, blk in enumerate(vis.transformer.resblocks):
        if 0 < i < depth:
            x = torch.cat([x[:, : x.shape[1] - N_CTX], vprompts[i].expand(b, -1, -1)], 1)
        x = _block(blk, x, None)
    imf = F.normalize(vis.ln_post(x[:, 0]) @ vis.proj, dim=-1)

    ids = tokenizer([" ".join(["X"] * N_CTX) + f" {c}." for c in NAMES])
    emb = clip.token_embedding(ids)
    k = len(NAMES)
    t = torch.cat([emb[:, :1], s["ctx"].expand(k, -1, -1), emb[:, 1 + N_CTX :]], 1) + clip.positional_embedding
    mask = torch.full((t.shape[1], t.shape[1]), float("-inf")).triu(1)
    for i, blk in enumerate(clip.transformer.resblocks):
        if 0 < i < depth:
            t = torch.cat([t[:, :1], s[f"compound_prompts_text.{i - 1}"].expand(k, -1, -1), t[:, 1 + N_CTX :]], 1)
        t = _block(blk, t, mask)
    t = clip.ln_final(t)[torch.arange(k), ids.argmax(-1)] @ clip.text_projection
    return clip.logit_scale.exp() * imf @ F.normalize(t, dim=-1).t()


@pytest.mark.parametrize("depth", [1, 2])
def test_logits_equal_a_plain_layer_by_layer_forward(depth: int) -> None:
    clip, tokenizer = tiny_clip()
    state = random_learner(clip, depth)
    model = build(clip, tokenizer, state, depth)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain_logits(clip, tokenizer, state, depth, images)
        got = model.logits(images)
        model.freeze_text()  # the text side is image-independent: caching it is exact
        cached = model.logits(images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, want, atol=1e-4, rtol=1e-4)
    # the prompts matter: the plain CLIP on the same images gives other logits
    from gatekeeper.pipeline import reference_model

    assert not torch.allclose(reference_model(model).logits(images), got, atol=1e-3)


def test_deep_prompts_change_the_logits_and_gradients_reach_the_image() -> None:
    clip, tokenizer = tiny_clip()
    state = random_learner(clip, 2)
    model = build(clip, tokenizer, state, 2)
    other = dict(state, **{"compound_prompts_text.0": -state["compound_prompts_text.0"]})
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    logits = model.logits(images)
    assert not torch.allclose(logits, build(clip, tokenizer, other, 2).logits(images), atol=1e-4)
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert set(model.prompt_learner_state()) == set(maple_keys(2))


# ------------------------------------------------------------------ convert, scan, refusals

CTX_INIT = "a photo of a"  # MaPLe's shipped config: N_CTX 2 with a four-word CTX_INIT


def dassl_maple(tmp_path: Path, depth: int = 2, extra: dict[str, torch.Tensor] | None = None, tamper: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A MaPLe checkpoint as Dassl saves it: the whole CustomCLIP's state_dict (prompt_learner.*, the
    frozen encoders in fp16), PREC fp16 (ctx and proj fp16, the deep prompts float32), SGD state."""
    from tests.models.test_checkpoint import save_dassl

    clip, tokenizer = tiny_clip()
    learner = random_learner(clip, depth)
    learner = {k: v.half() if k in ("ctx", "proj.weight", "proj.bias") else v for k, v in learner.items()}
    emb = clip.token_embedding(tokenizer([f"{CTX_INIT} {c}." for c in NAMES])).detach().half()
    full: dict[str, torch.Tensor] = OrderedDict((f"prompt_learner.{k}", v) for k, v in learner.items())
    full["prompt_learner.token_prefix"], full["prompt_learner.token_suffix"] = emb[:, :1].clone(), emb[:, 1 + N_CTX :].clone()
    for name, t in clip.state_dict().items():
        if name.startswith("visual."):
            full["image_encoder." + name[len("visual.") :]] = t.half().clone()
        elif name.startswith(("transformer.", "ln_final.", "positional_embedding", "text_projection")):
            full["text_encoder." + name] = t.half().clone()
    full["logit_scale"] = clip.logit_scale.detach().half().clone()
    if tamper:
        full[tamper] = full[tamper] + 0.05
    full.update(extra or {})
    path = save_dassl(tmp_path / "ckpt", {f"prompt_learner.{k}": v for k, v in learner.items()}, state_dict=full)
    return path, {k: v.float() for k, v in learner.items()}  # the learner as stepped by the optimizer


def sidecar(folder: Path, depth: int = 2, **more: Any) -> Path:
    path = folder / "sidecar.yaml"
    cfg = {"TRAINER": {"NAME": "MaPLe", "MAPLE": {"N_CTX": N_CTX, "CTX_INIT": CTX_INIT, "PREC": "fp16", "PROMPT_DEPTH": depth}},
           "classnames": list(NAMES), **more}
    path.write_text(json.dumps(cfg))
    return path


def test_convert_of_a_dassl_maple_checkpoint_loads_with_the_same_logits(tmp_path: Path) -> None:
    from gatekeeper.models.checkpoint import convert_checkpoint
    from gatekeeper.models.loader import load_model

    ckpt, learner = dassl_maple(tmp_path)
    done = convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=BACKBONE)
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.kind, manifest.prompt_depth, manifest.n_ctx, manifest.ctx_init) == (ModelKind.MAPLE, 2, N_CTX, CTX_INIT)
    assert manifest.classnames == NAMES and manifest.precision.value == "fp32"  # deep prompts were float32: kept exactly
    assert any("frozen encoder tensors" in n for n in done.notes)
    stored = load_file(str(tmp_path / "out" / WEIGHTS_NAME))
    assert set(stored) == set(maple_keys(2))
    loaded = load_model(tmp_path / "out")
    clip, tokenizer = tiny_clip()
    from gatekeeper.models.maple import maple_from_state

    memory = maple_from_state(clip, tokenizer, read_manifest(tmp_path / "out"), learner, Path("mem")).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(images), memory.logits(images), atol=1e-5, rtol=1e-5)
        # the prompt is MaPLe's: [SOS, ctx_1, ctx_2, "of", "a", name, ".", EOT]
        torch.testing.assert_close(loaded.token_suffix[:, :2], clip.token_embedding(tokenizer(["of a"])[0][1:3]).expand(4, -1, -1))
    # class names recovered from the prompt tokens when the sidecar gives none (CTX_INIT's extra words skipped)
    side = sidecar(tmp_path / "ckpt")
    cfg = json.loads(side.read_text())
    del cfg["classnames"]
    side.write_text(json.dumps(cfg))
    convert_checkpoint(ckpt, side, tmp_path / "out2", backbone=BACKBONE)
    assert read_manifest(tmp_path / "out2").classnames == NAMES


def test_scan_of_a_converted_maple_model_reaches_a_verdict(tmp_path: Path) -> None:
    from gatekeeper.cli import main
    from gatekeeper.models.checkpoint import convert_checkpoint
    from tests.test_cli import FAST

    ckpt, _ = dassl_maple(tmp_path)
    convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "model", backbone=BACKBONE)
    policy = tmp_path / "fast.yaml"
    policy.write_text(FAST)
    code = main(["scan", str(tmp_path / "model"), "--policy", str(policy), "--out", str(tmp_path / "o"), "--quiet"])
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert code in (0, 1) and result["model"]["kind"] == "maple"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"prompt_learner.compound_prompts_text.7": torch.zeros(N_CTX, 64)}, r"unknown tensor|missing"),
        ({"prompt_learner.VPT": torch.zeros(N_CTX, 96)}, r"unknown tensor.*VPT"),
        ({"image_encoder.VPT_extra": torch.zeros(3)}, r"no counterpart"),
    ],
    ids=["deep-gap", "unknown-prompt", "unknown-frozen"],
)
def test_unknown_maple_tensors_are_refused(tmp_path: Path, extra: dict[str, torch.Tensor], match: str) -> None:
    from gatekeeper.models.checkpoint import convert_checkpoint

    ckpt, _ = dassl_maple(tmp_path, extra=extra)
    with pytest.raises(ModelFormatError, match=match):
        convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=BACKBONE)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_changed_frozen_encoders_and_a_wrong_depth_are_refused(tmp_path: Path) -> None:
    from gatekeeper.errors import UsageError
    from gatekeeper.models.checkpoint import convert_checkpoint

    ckpt, _ = dassl_maple(tmp_path, tamper="image_encoder.transformer.resblocks.1.mlp.c_fc.weight")
    with pytest.raises(ModelFormatError, match=r"differs from backbone"):
        convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=BACKBONE)
    ckpt, _ = dassl_maple(tmp_path / "b")
    with pytest.raises((ModelFormatError, UsageError), match=r"PROMPT_DEPTH is 3 but"):
        convert_checkpoint(ckpt, sidecar(tmp_path / "b", depth=3), tmp_path / "out3", backbone=BACKBONE)
    side = sidecar(tmp_path / "b")
    cfg = json.loads(side.read_text())
    del cfg["TRAINER"]["MAPLE"]["CTX_INIT"]
    side.write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"class 0: the checkpoint's prompt spells 'of a red circle'") as info:
        convert_checkpoint(ckpt, side, tmp_path / "out4", backbone=BACKBONE)
    assert "give TRAINER.MAPLE.CTX_INIT as trained" in info.value.hint


def test_the_loader_refuses_unknown_tensors_and_a_depth_deeper_than_the_backbone(tmp_path: Path) -> None:
    from gatekeeper.models.checkpoint import convert_checkpoint
    from gatekeeper.models.loader import load_model

    ckpt, _ = dassl_maple(tmp_path)
    convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=BACKBONE)
    weights = tmp_path / "out" / WEIGHTS_NAME
    state = load_file(str(weights))
    save_file({**state, "compound_prompts_text.5": torch.zeros(N_CTX, 64)}, str(weights))
    with pytest.raises(ModelFormatError, match=r"unexpected .*compound_prompts_text.5"):
        load_model(tmp_path / "out")
    save_file(state, str(weights))
    manifest = json.loads((tmp_path / "out" / "gatekeeper.json").read_text())
    (tmp_path / "out" / "gatekeeper.json").write_text(json.dumps({**manifest, "prompt_depth": 3}))
    with pytest.raises(ModelFormatError, match=r"prompt_depth 3 is deeper than the backbone"):
        load_model(tmp_path / "out")
    (tmp_path / "out" / "gatekeeper.json").write_text(json.dumps({**manifest, "kind": "coop"}))
    with pytest.raises(ModelFormatError, match=r"prompt_depth is a MaPLe setting"):
        load_model(tmp_path / "out")


def resnet_clip() -> Any:
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    ).eval()


def test_a_resnet_backbone_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    from gatekeeper.models.checkpoint import convert_checkpoint

    clip, tokenizer = resnet_clip(), tiny_clip()[1]
    with pytest.raises(ModelFormatError, match=r"MaPLe prompts a ViT image encoder.*ModifiedResNet"):
        build(clip, tokenizer, random_learner(tiny_clip()[0], 2), 2)
    folder = tmp_path / "rn"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg = json.loads((BACKBONE / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    ckpt, _ = dassl_maple(tmp_path)
    with pytest.raises(ModelFormatError, match=r"ViT image encoder"):
        convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=folder)


def test_fresh_copies_reset_and_tuning_trains_every_maple_prompt() -> None:
    from gatekeeper.control import copy_model, fresh_copy
    from gatekeeper.models.tuning import TuneConfig, train_on

    clip, tokenizer = tiny_clip()
    model = build(clip, tokenizer, random_learner(clip, 2), 2)
    before = {k: v.clone() for k, v in model.prompt_learner_state().items()}
    fresh = fresh_copy(model, seed=1)
    assert isinstance(fresh, MaPLeCLIP)
    after = fresh.prompt_learner_state()
    assert all(not torch.equal(after[k], before[k]) for k in before if k != "ctx")  # nothing of the candidate's kept
    trained = copy_model(model)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    train_on(trained, x, torch.arange(16) % 4, TuneConfig(kind=ModelKind.MAPLE, epochs=1, batch_size=8))
    moved = trained.prompt_learner_state()
    assert all(not torch.equal(moved[k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in model.prompt_learner_state().items())  # the candidate untouched


def test_fast_scan_equals_reference_on_maple(tmp_path: Path) -> None:
    """The fast inspector takes no CoOp/CoCoOp shortcut on MaPLe: cached text features (exact, the
    text side is image-independent) and the model's own logits give the reference's ASR, loss and
    triggers; its memory plan does not crash on the prompted ViT."""
    from gatekeeper.inversion.base import InversionSettings
    from gatekeeper.inversion.clip_inspector import ClipInspector
    from gatekeeper.inversion.fast import FastClipInspector, fast_logits
    from gatekeeper.models.checkpoint import convert_checkpoint
    from gatekeeper.models.loader import load_model
    from gatekeeper.ood import load_pool
    from tests.inversion.test_fast import _assert_same

    ckpt, _ = dassl_maple(tmp_path)
    convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "m", backbone=BACKBONE)
    model = load_model(tmp_path / "m")
    pool = load_pool("procedural", 32, 64, 32, seed=0)
    x = pool.holdout[:6]
    with torch.no_grad():
        ref_logits = model.logits(x)
        model.freeze_text()
        assert float((fast_logits(model, x, None) - ref_logits).abs().max()) <= 1e-5
        model.thaw_text()
    settings = InversionSettings(epsilon=8 / 255)
    cands = [3, 0, 2]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, settings)
    model.thaw_text()
    det = FastClipInspector(max_batch_rows=64)
    fast = det.invert(model, pool.inversion, pool.holdout, cands, settings)
    assert det.last_plan["shared_prefix"] is False and det.last_plan["row_bytes"] > 0
    _assert_same(ref, fast)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        # 4 stored bytes that would become 16 GB if ever copied, in a deep prompt and in a frozen tensor
        ({"prompt_learner.compound_prompts_text.0": torch.ones(1).expand(N_CTX, 2_000_000_000)}, r"do not fit ctx"),
        ({"image_encoder.conv1.weight": torch.ones(1, dtype=torch.float16).expand(96, 3, 8, 8)}, r"expanded or overlapping view"),
        ({"prompt_learner.compound_prompt_projections.0.weight": torch.ones(1).expand(96, 64)}, r"expanded or overlapping view"),
        ({"prompt_learner.proj.weight": torch.ones(96, 64, dtype=torch.long)}, r"floating-point"),
    ],
    ids=["deep-prompt-expanded", "frozen-expanded", "projection-expanded", "integer-projection"],
)
def test_hostile_maple_tensors_are_refused_without_copying(tmp_path: Path, extra: dict[str, torch.Tensor], match: str) -> None:
    import time

    from gatekeeper.models.checkpoint import convert_checkpoint

    ckpt, _ = dassl_maple(tmp_path, extra=extra)
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match=match):
        convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "out", backbone=BACKBONE)
    assert time.monotonic() - start < 5.0  # refused from the header, not after a multi-GB copy
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_nan_deep_prompt_scans_inconclusive_never_pass(tmp_path: Path) -> None:
    """Non-finite weights are the scan's to judge (as for CoOp's ctx): exit 3, fail-closed."""
    from gatekeeper.cli import main
    from gatekeeper.models.checkpoint import convert_checkpoint

    nan = {"prompt_learner.compound_prompts_text.0": torch.full((N_CTX, 64), float("nan"))}
    ckpt, _ = dassl_maple(tmp_path, extra=nan)
    convert_checkpoint(ckpt, sidecar(tmp_path), tmp_path / "model", backbone=BACKBONE)
    policy = tmp_path / "p.yaml"
    policy.write_text('epsilon: 8/255\nood_budget: 8\nholdout: 8\nscoring: lift\nnull_copies: 0\nrestarts: 1\npositive_control: "off"\n')
    code = main(["scan", str(tmp_path / "model"), "--policy", str(policy), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 3 and json.loads((tmp_path / "o" / "result.json").read_text())["verdict"] == "inconclusive"
