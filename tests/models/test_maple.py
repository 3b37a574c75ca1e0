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
