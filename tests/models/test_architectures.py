"""The model wrapper and the fast path on open_clip's real CLIP architectures, with random weights.

Nothing is downloaded: ``open_clip.create_model(name, pretrained=None)`` builds the architecture
and its preprocess config. These tests check shapes, the backbone's own normalisation and that the
fast text path equals the model's logits on the real 77-token towers; they say nothing about
accuracy with trained weights.
"""

from __future__ import annotations

import pytest
import torch

from gatekeeper.inversion.fast import fast_logits, text_plan
from gatekeeper.models.manifest import BackboneRef, Manifest, ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net

pytestmark = pytest.mark.slow  # builds ViT-B and ResNet CLIPs (~100-150 M parameters each)

ARCHITECTURES = ["ViT-B-32", "ViT-B-16", "RN50", "RN101"]
CLASSES = ("cat", "dog", "red panda")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cocoop_on_a_real_architecture(name: str) -> None:
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    manifest = Manifest(ModelKind.COCOOP, CLASSES, BackboneRef(name), image_size=size, n_ctx=4)
    ctx_dim = int(clip.ln_final.weight.shape[0])
    meta = build_meta_net(int(clip.visual.output_dim), ctx_dim)
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=torch.randn(4, ctx_dim) * 0.02, meta_net=meta).eval()
    cfg = open_clip.get_model_preprocess_cfg(clip)
    assert model.normalisation == (tuple(cfg["mean"]), tuple(cfg["std"]))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    plan = text_plan(model)
    assert plan.cuttable and plan.shareable and plan.length < model.tokenized.shape[1] == 77
    with torch.no_grad():
        ref = model.logits(x)
        fast = fast_logits(model, x, plan)
    assert ref.shape == (2, len(CLASSES)) and torch.isfinite(ref).all()
    assert float((fast - ref).abs().max()) <= 1e-4
