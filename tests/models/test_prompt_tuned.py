"""PromptTunedCLIP against independent re-derivations (open_clip's own encode_text, a per-image loop)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from gatekeeper.models.loader import load_model
from gatekeeper.models.prompt_tuned import CLIP_MEAN, CLIP_STD

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


def per_image_cocoop_logits(model, imf: torch.Tensor) -> torch.Tensor:
    """CoCoOp's forward written out per image and class from its definition (image features ``imf``)."""
    clip = model.clip
    w1, b1 = model.meta_net.linear1.weight, model.meta_net.linear1.bias
    w2, b2 = model.meta_net.linear2.weight, model.meta_net.linear2.bias
    tokens = model.tokenized
    base = clip.token_embedding(tokens)
    eot = tokens.argmax(-1)
    n_ctx = model.ctx.shape[0]
    rows = []
    for i in range(len(imf)):
        bias = w2 @ torch.relu(w1 @ imf[i] + b1) + b2  # h_theta(f_I(x))
        logits_i = []
        for k in range(len(tokens)):
            emb = base[k].clone()
            emb[1 : 1 + n_ctx] = model.ctx + bias  # [SOS, ctx+b, class tokens, ., EOT]
            h = emb + clip.positional_embedding
            h = clip.transformer(h.unsqueeze(0), attn_mask=clip.attn_mask)[0]
            h = clip.ln_final(h)[eot[k]] @ clip.text_projection
            logits_i.append(clip.logit_scale.exp() * imf[i] @ F.normalize(h, dim=-1))
        rows.append(torch.stack(logits_i))
    return torch.stack(rows)


def test_cocoop_forward_matches_a_per_image_rederivation(model_factory):
    model = load_model(model_factory("cocoop", CLASSES))
    x = _pixels(3, seed=1)
    with torch.no_grad():
        ours = model.logits(x)
        ref = per_image_cocoop_logits(model, _image_features(model, x))
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


# --- the backbone's own preprocessing and text pooling ---------------------------------------

OTHER_MEAN, OTHER_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]


def test_logits_use_the_mean_and_std_the_backbone_config_states(tmp_path):
    """A backbone whose config states another mean/std gives the logits of images normalised by
    those values by hand, not the ones OpenAI's values would give."""
    from tests.conftest import custom_backbone, make_model_folder

    other = custom_backbone(tmp_path / "other" / "backbone", preprocess_cfg={"mean": OTHER_MEAN, "std": OTHER_STD})
    openai = custom_backbone(tmp_path / "openai" / "backbone")  # same weights (seed), OpenAI's values stated
    m_other = load_model(make_model_folder(other, tmp_path / "other" / "m", "coop", CLASSES))
    m_openai = load_model(make_model_folder(openai, tmp_path / "openai" / "m", "coop", CLASSES))
    x = _pixels(4, seed=3)
    with torch.no_grad():
        mean, std = torch.tensor(OTHER_MEAN).view(1, 3, 1, 1), torch.tensor(OTHER_STD).view(1, 3, 1, 1)
        imf = F.normalize(m_other.clip.encode_image((x - mean) / std), dim=-1)
        by_hand = m_other.logit_scale * imf @ m_other.text_features().t()
        ours, theirs = m_other.logits(x), m_openai.logits(x)
    assert torch.allclose(ours, by_hand, atol=1e-5)
    assert float((ours - theirs).abs().max()) > 1e-2
    assert m_openai.normalisation == (CLIP_MEAN, CLIP_STD)
    assert m_other.normalisation == (tuple(OTHER_MEAN), tuple(OTHER_STD))


def test_a_backbone_that_states_no_preprocessing_gets_openais(tmp_path):
    """open_clip fills an unstated preprocess_cfg with OpenAI's values; so does gatekeeper."""
    import json

    from tests.conftest import custom_backbone, make_model_folder

    backbone = custom_backbone(tmp_path / "b" / "backbone")
    config = json.loads((backbone / "open_clip_config.json").read_text())
    del config["preprocess_cfg"]
    (backbone / "open_clip_config.json").write_text(json.dumps(config))
    model = load_model(make_model_folder(backbone, tmp_path / "b" / "m", "coop", CLASSES))
    assert model.normalisation == (CLIP_MEAN, CLIP_STD)


def test_the_committed_tiny_backbone_states_openais_values():
    """The tiny world's backbone was pretrained with OpenAI's mean/std (gatekeeper.redteam.pretrain),
    and its config says so: the committed zoo is normalised as it was trained."""
    import json

    from tests.conftest import BACKBONE

    cfg = json.loads((BACKBONE / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (CLIP_MEAN, CLIP_STD)


TEXT_TOWERS = {
    "argmax": {},
    "eos": {"pool_type": "eos", "eos_id": 49407},
    "first": {"pool_type": "first"},
    "last": {"pool_type": "last"},
    "no-causal-mask": {"no_causal_mask": True},
}


@pytest.mark.parametrize("tower", sorted(TEXT_TOWERS))
def test_prompts_are_pooled_as_open_clip_pools_the_text_tower(tmp_path, tower):
    """Prompt embeddings go through the text tower as open_clip's encode_text runs it, pool type included."""
    from tests.conftest import custom_backbone, make_model_folder

    backbone = custom_backbone(tmp_path / "backbone", TEXT_TOWERS[tower])
    model = load_model(make_model_folder(backbone, tmp_path / "m", "coop", CLASSES))
    _set_ctx_to_words(model, "a photo of a")
    with torch.no_grad():
        ours = model.text_features()
        tokens = model.tokenized.new_tensor(_tokens(model, CLASSES))
        theirs = F.normalize(model.clip.encode_text(tokens), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_text_tower_without_one_pooled_feature_is_refused(tmp_path):
    import json

    from gatekeeper.errors import BackboneError
    from tests.conftest import custom_backbone, make_model_folder

    backbone = custom_backbone(tmp_path / "backbone")
    folder = make_model_folder(backbone, tmp_path / "m", "coop", CLASSES)
    config_path = folder / "backbone" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["text_cfg"]["pool_type"] = "none"
    config_path.write_text(json.dumps(config))
    with pytest.raises(BackboneError) as info:
        load_model(folder)
    assert re.search(r"pools its text tower with 'none'.*argmax, eos, first, last", info.value.one_line())


def test_a_custom_text_tower_is_refused_with_the_reason(tmp_path):
    """open_clip's CustomTextCLIP (custom_text: true) has no top-level token embedding to prompt."""
    import copy
    import json

    import open_clip

    from gatekeeper.errors import BackboneError
    from gatekeeper.redteam.pretrain import TINY_MODEL_CFG, save_backbone
    from tests.conftest import custom_backbone, make_model_folder

    folder = make_model_folder(custom_backbone(tmp_path / "backbone"), tmp_path / "m", "coop", CLASSES)
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    save_backbone(open_clip.CustomTextCLIP(**cfg), folder / "backbone", {}, fp16=False, prune=False)
    config_path = folder / "backbone" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["custom_text"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(BackboneError) as info:
        load_model(folder)
    assert "has a custom text tower (no token_embedding)" in info.value.one_line()
