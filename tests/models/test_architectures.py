"""Every prompt-learner family on open_clip's real CLIP architectures, with random weights.

Nothing is downloaded: ``open_clip.create_model(name, pretrained=None)`` builds the architecture
and its preprocess config, once per architecture for this module. For each family the model's
logits are checked against a straightforward re-derivation of its forward pass (CoOp's per-class
prompt assembly, CoCoOp's per-image loop, MaPLe's layer-by-layer loop) and the fast text path against the model's logits,
on the real 77-token towers at the architecture's input size. These tests check shapes, the
backbone's own normalisation and the arithmetic; they say nothing about accuracy with trained
weights. Converting and scanning each family to a verdict is ``test_compatibility.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gatekeeper.inversion.fast import fast_logits, text_plan
from gatekeeper.models.manifest import BackboneRef, ClassTokenPosition, Manifest, ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net
from tests.models import test_maple
from tests.models.test_prompt_options import N_CTX, encode, official_prompts
from tests.models.test_prompt_tuned import per_image_cocoop_logits

pytestmark = pytest.mark.slow  # builds ViT-B and ResNet CLIPs (~100-150 M parameters each)

ARCHITECTURES = ["ViT-B-32", "ViT-B-16", "RN50", "RN101"]
CLASSES = ("cat", "dog", "red panda")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, Any, int]]:
    import open_clip

    name = request.param
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    size = clip.visual.image_size
    yield name, clip, open_clip.get_tokenizer(name), int(size[0] if isinstance(size, (tuple, list)) else size)


def _pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _fast_equals_model(model: PromptTunedCLIP, x: torch.Tensor) -> torch.Tensor:
    """The model's logits, after checking the fast text path (cut at the EOT) gives the same."""
    plan = text_plan(model)
    assert plan.cuttable and plan.length < model.tokenized.shape[1] == 77
    with torch.no_grad():
        ref, fast = model.logits(x), fast_logits(model, x, plan)
    assert ref.shape == (len(x), len(model.classnames)) and torch.isfinite(ref).all()
    assert float((fast - ref).abs().max()) <= 1e-4
    return ref


def test_cocoop(arch: tuple[str, Any, Any, int]) -> None:
    import open_clip

    name, clip, tokenizer, size = arch
    manifest = Manifest(ModelKind.COCOOP, CLASSES, BackboneRef(name), image_size=size, n_ctx=4)
    ctx_dim = int(clip.ln_final.weight.shape[0])
    meta = build_meta_net(int(clip.visual.output_dim), ctx_dim)  # a ResNet's output is 1024 wide
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=torch.randn(4, ctx_dim) * 0.02, meta_net=meta).eval()
    cfg = open_clip.get_model_preprocess_cfg(clip)
    assert model.normalisation == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert text_plan(model).shareable
    x = _pixels(size)
    ours = _fast_equals_model(model, x)
    with torch.no_grad():
        imf = F.normalize(clip.encode_image((x - model.pixel_mean) / model.pixel_std), dim=-1)
        ref = per_image_cocoop_logits(model, imf)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize(("csc", "position"), [(False, "end"), (True, "middle"), (False, "front")], ids=["end", "csc-middle", "front"])
def test_coop_options_equal_the_official_assembly(arch: tuple[str, Any, Any, int], position: str, csc: bool) -> None:
    """CoOp (and KgCoOp, ProGrad, which store CoOp's tensors): every option value once per
    architecture (the four share one text tower shape; every combination is on the tiny one)."""
    name, clip, tokenizer, size = arch
    d = int(clip.ln_final.weight.shape[0])
    manifest = Manifest(ModelKind.COOP, CLASSES, BackboneRef(name), image_size=size, n_ctx=N_CTX, csc=csc,
                        class_token_position=ClassTokenPosition(position))
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn((len(CLASSES), N_CTX, d) if csc else (N_CTX, d), generator=g) * 0.5
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=ctx).eval()
    x = _pixels(size)
    ours = _fast_equals_model(model, x)
    with torch.no_grad():
        prompts = official_prompts(model, position)
        assert torch.equal(model.class_prompts(model.ctx), prompts)
        ref = model.logit_scale * model.image_features(x) @ encode(model, prompts, model.tokenized.argmax(dim=-1)).t()
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_zero_shot(arch: tuple[str, Any, Any, int]) -> None:
    name, clip, tokenizer, size = arch
    model = PromptTunedCLIP(clip, tokenizer, Manifest(ModelKind.ZEROSHOT, CLASSES, BackboneRef(name), image_size=size)).eval()
    x = _pixels(size)
    ours = _fast_equals_model(model, x)
    with torch.no_grad():
        text = clip.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]), normalize=True)
        ref = clip.logit_scale.exp() * model.image_features(x) @ text.t()
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_maple_equals_a_layer_by_layer_forward(arch: tuple[str, Any, Any, int]) -> None:
    """MaPLe at its shipped prompt depth 9 on the ViTs; a ResNet is refused."""
    from gatekeeper.errors import ModelFormatError
    from gatekeeper.models.maple import maple_from_state

    name, clip, tokenizer, size = arch
    depth = 9
    manifest = Manifest(ModelKind.MAPLE, test_maple.NAMES, BackboneRef(name), image_size=size, n_ctx=test_maple.N_CTX,
                        prompt_depth=depth)
    if name.startswith("RN"):
        with pytest.raises(ModelFormatError, match=r"MaPLe prompts a ViT image encoder"):
            maple_from_state(clip, tokenizer, manifest, {}, Path("mem"))
        return
    state = {k: v * 0.1 for k, v in test_maple.random_learner(clip, depth).items()}
    model = maple_from_state(clip, tokenizer, manifest, state, Path("mem")).eval()
    x = _pixels(size)
    with torch.no_grad():
        ours = model.logits(x)
        ref = test_maple.plain_logits(clip, tokenizer, state, depth, x)
    assert ours.shape == (len(x), len(test_maple.NAMES)) and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
