"""PromptTunedCLIP against independent re-derivations (open_clip's own encode_text, a per-image loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatekeeper.models.loader import load_model

CLASSES = ("red circle", "blue square", "green star", "white ring", "pink bar")


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _image_features(model, x):
    clip = model.clip
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return F.normalize(clip.encode_image((x - mean) / std), dim=-1)


def _set_ctx_to_words(model, words: str) -> None:
    from open_clip import get_tokenizer

    tok = get_tokenizer("ViT-B-32")
    tok.context_length = model.tokenized.shape[1]
    ids = tok([words])[0][1 : 1 + model.ctx.shape[0]]
    with torch.no_grad():
        model.ctx.copy_(model.clip.token_embedding(ids))


def test_coop_with_word_context_equals_open_clip_encode_text(model_factory):
    model = load_model(model_factory("coop", CLASSES))
    _set_ctx_to_words(model, "a photo of a")
    x = _pixels(6)
    with torch.no_grad():
        ours = model.logits(x)
        tf = F.normalize(model.clip.encode_text(model.tokenized.new_tensor(_tokens(model, CLASSES))), dim=-1)
        ref = model.clip.logit_scale.exp() * _image_features(model, x) @ tf.t()
    assert torch.allclose(ours, ref, atol=1e-4)


def _tokens(model, classes):
    from open_clip import get_tokenizer

    tok = get_tokenizer("ViT-B-32")
    tok.context_length = model.tokenized.shape[1]
    return tok([f"a photo of a {c}." for c in classes]).tolist()


def test_cocoop_forward_matches_a_per_image_rederivation(model_factory):
    model = load_model(model_factory("cocoop", CLASSES))
    clip = model.clip
    x = _pixels(3, seed=1)
    with torch.no_grad():
        ours = model.logits(x)
        imf = _image_features(model, x)
        w1, b1 = model.meta_net.linear1.weight, model.meta_net.linear1.bias
        w2, b2 = model.meta_net.linear2.weight, model.meta_net.linear2.bias
        tokens = model.tokenized
        base = clip.token_embedding(tokens)
        eot = tokens.argmax(-1)
        n_ctx = model.ctx.shape[0]
        rows = []
        for i in range(len(x)):
            bias = w2 @ torch.relu(w1 @ imf[i] + b1) + b2  # h_theta(f_I(x))
            logits_i = []
            for k in range(len(CLASSES)):
                emb = base[k].clone()
                emb[1 : 1 + n_ctx] = model.ctx + bias  # [SOS, ctx+b, class tokens, ., EOT]
                h = emb + clip.positional_embedding
                h = clip.transformer(h.unsqueeze(0), attn_mask=clip.attn_mask)[0]
                h = clip.ln_final(h)[eot[k]] @ clip.text_projection
                logits_i.append(clip.logit_scale.exp() * imf[i] @ F.normalize(h, dim=-1))
            rows.append(torch.stack(logits_i))
        ref = torch.stack(rows)
    assert ours.shape == (3, len(CLASSES))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # the meta-net matters: the bias changes the logits
    assert (ours - ours.mean(0)).abs().max() > 0


def test_zeroshot_uses_template_prompts(model_factory, tmp_path):
    import json

    folder = model_factory("coop", CLASSES, name="zs")
    manifest = json.loads((folder / "gatekeeper.json").read_text())
    manifest.update(kind="zeroshot", n_ctx=0)
    (folder / "gatekeeper.json").write_text(json.dumps(manifest))
    (folder / "prompt_learner.safetensors").unlink()
    model = load_model(folder)
    x = _pixels(4, seed=2)
    with torch.no_grad():
        tf = F.normalize(model.clip.encode_text(model.tokenized.new_tensor(_tokens(model, CLASSES))), dim=-1)
        ref = model.clip.logit_scale.exp() * _image_features(model, x) @ tf.t()
        assert torch.allclose(model.logits(x), ref, atol=1e-4)


def test_logits_are_differentiable_in_pixels(model_factory):
    model = load_model(model_factory("cocoop", CLASSES))
    x = _pixels(2).requires_grad_(True)
    model.logits(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_pixel_normalisation_comes_from_the_backbone_config(random_backbone, tmp_path):
    """open_clip configs carry their own mean/std (e.g. SigLIP's 0.5/0.5); never assume OpenAI's."""
    import json
    import shutil

    from gatekeeper.models.loader import load_model
    from tests.conftest import make_model_folder

    folder = make_model_folder(random_backbone, tmp_path / "m", "coop", ("a", "b", "c"))
    config = folder / "backbone" / "open_clip_config.json"
    cfg = json.loads(config.read_text())
    cfg["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    config.write_text(json.dumps(cfg))
    model = load_model(folder)
    assert model.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert model.pixel_std.flatten().tolist() == [0.25, 0.5, 1.0]
    shutil.rmtree(folder)
