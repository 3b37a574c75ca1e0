"""CoOp's options (class-specific contexts, class token position) against the official assembly.

The expected prompts are written here independently of gatekeeper.models.prompt_tuned: once as a
hand-written token layout for one short class name, once as a per-class loop in the shape of
CoOp's PromptLearner.forward (prefix_i, halves of ctx_i, class_i cut off suffix_i by the name's
own token length).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gatekeeper.errors import ModelFormatError
from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.loader import load_model
from gatekeeper.models.manifest import BackboneRef, ClassTokenPosition, Manifest, ModelKind, Precision
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net
from gatekeeper.redteam.tuning import write_model_folder

CLASSES = ("red circle", "square", "pink long thin bar")
N_CTX = 4
POSITIONS = [p.value for p in ClassTokenPosition]


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def build(
    backbone: Path,
    out: Path,
    *,
    csc: bool,
    position: str,
    precision: Precision = Precision.FP32,
    kind: ModelKind = ModelKind.COOP,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """A model folder with a random context (large enough that the layout moves the logits)."""
    clip, tokenizer = load_backbone(backbone.parent, BackboneRef(f"local-dir:{backbone.name}"))
    d = int(clip.ln_final.weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    shape = (len(classes), N_CTX, d) if csc else (N_CTX, d)
    manifest = Manifest(
        kind=kind,
        classnames=classes,
        backbone=BackboneRef("local-dir:backbone"),
        image_size=32,
        n_ctx=N_CTX,
        precision=precision,
        csc=csc,
        class_token_position=ClassTokenPosition(position),
    )
    meta = build_meta_net(int(clip.visual.output_dim), d) if kind == ModelKind.COCOOP else None
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=torch.randn(shape, generator=g) * 0.5, meta_net=meta)
    write_model_folder(model, backbone, out, precision)
    return out


def encode(model: PromptTunedCLIP, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text after the token embedding (positional embedding, causal transformer,
    ln_final, EOT pooling, projection), normalized."""
    clip = model.clip
    x = clip.transformer(prompts + clip.positional_embedding, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(x)), eot] @ clip.text_projection
    return F.normalize(x, dim=-1)


def official_prompts(model: PromptTunedCLIP, position: str) -> torch.Tensor:
    """CoOp's PromptLearner.forward, class by class, on this model's prefix/suffix and context."""
    tok = model.tokenizer
    ctx = model.ctx.detach()
    k = len(model.classnames)
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(k, -1, -1)
    prefix, suffix = model.token_prefix, model.token_suffix
    rows = []
    for i, name in enumerate(model.classnames):
        name_len = len(tok.encode(name))
        class_i, rest_i = suffix[i, :name_len], suffix[i, name_len:]
        if position == "end":
            parts = [prefix[i], ctx[i], suffix[i]]
        elif position == "front":
            parts = [prefix[i], class_i, ctx[i], rest_i]
        else:
            half = N_CTX // 2
            parts = [prefix[i], ctx[i, :half], class_i, ctx[i, half:], rest_i]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("position", POSITIONS)
def test_hand_written_layout_of_one_class(random_backbone: Path, tmp_path: Path, position: str, csc: bool) -> None:
    """"red circle" (2 tokens) with 4 context vectors c1..c4, token by token."""
    model = load_model(build(random_backbone, tmp_path / "m", csc=csc, position=position))
    tok, clip = model.tokenizer, model.clip
    ids = {"SOS": tok.sot_token_id, "red": tok.encoder["red</w>"], "circle": tok.encoder["circle</w>"],
           ".": tok.encoder[".</w>"], "EOT": tok.eot_token_id}
    layout = {
        "end": ["SOS", "c1", "c2", "c3", "c4", "red", "circle", ".", "EOT"],
        "front": ["SOS", "red", "circle", "c1", "c2", "c3", "c4", ".", "EOT"],
        "middle": ["SOS", "c1", "c2", "red", "circle", "c3", "c4", ".", "EOT"],
    }[position]
    ctx = model.ctx.detach()[0] if csc else model.ctx.detach()  # class 0's context
    length = model.tokenized.shape[1]
    with torch.no_grad():
        table = clip.token_embedding.weight
        rows = [table[ids[t]] if t in ids else ctx[int(t[1:]) - 1] for t in layout]
        rows += [table[0]] * (length - len(layout))  # padding
        expected = torch.stack(rows)
        got = model.class_prompts(model.ctx)[0]
        assert torch.equal(got, expected)
        assert int(model.eot_index[0]) == layout.index("EOT")
        x = _pixels(4)
        imf = F.normalize(clip.encode_image((x - model.pixel_mean) / model.pixel_std), dim=-1)
        tf = encode(model, expected.unsqueeze(0), torch.tensor([layout.index("EOT")]))
        ref = clip.logit_scale.exp() * imf @ tf.t()
        assert torch.allclose(model.logits(x)[:, :1], ref, atol=1e-5)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("position", POSITIONS)
def test_logits_equal_the_official_assembly(
    random_backbone: Path, tmp_path: Path, position: str, csc: bool, precision: Precision
) -> None:
    model = load_model(build(random_backbone, tmp_path / "m", csc=csc, position=position, precision=precision))
    assert (model.manifest.csc, model.manifest.class_token_position.value) == (csc, position)
    assert model.ctx.dim() == (3 if csc else 2)
    x = _pixels(5, seed=1)
    with torch.no_grad():
        prompts = official_prompts(model, position)
        assert torch.equal(model.class_prompts(model.ctx), prompts)
        tf = encode(model, prompts, model.tokenized.argmax(dim=-1))
        ref = model.logit_scale * model.image_features(x) @ tf.t()
        ours = model.logits(x)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_options_change_the_logits(random_backbone: Path, tmp_path: Path) -> None:
    """Each option is a different model: the same weights give other logits in another layout."""
    x = _pixels(4, seed=2)
    seen = []
    for csc in (False, True):
        for position in POSITIONS:
            model = load_model(build(random_backbone, tmp_path / f"{csc}-{position}", csc=csc, position=position))
            with torch.no_grad():
                seen.append(model.logits(x))
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.allclose(seen[i], seen[j], atol=1e-4), (i, j)


def test_class_specific_contexts_are_per_class(random_backbone: Path, tmp_path: Path) -> None:
    """Changing class 1's context moves class 1's logit only (not by a constant: LayerNorm hides that)."""
    model = load_model(build(random_backbone, tmp_path / "m", csc=True, position="end"))
    x = _pixels(3, seed=3)
    with torch.no_grad():
        before = model.logits(x)
        model.ctx[1] += torch.randn(model.ctx[1].shape, generator=torch.Generator().manual_seed(4))
        after = model.logits(x)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1], after[:, 1])


@pytest.mark.parametrize("csc,position", [(True, "end"), (False, "middle"), (False, "front")])
def test_cocoop_refuses_coop_options(random_backbone: Path, tmp_path: Path, csc: bool, position: str) -> None:
    with pytest.raises(ValueError, match="(is|are) a CoOp option"):
        build(random_backbone, tmp_path / "m", csc=csc, position=position, kind=ModelKind.COCOOP)


def test_manifest_refuses_coop_options_on_cocoop(random_backbone: Path, tmp_path: Path) -> None:
    import json

    folder = build(random_backbone, tmp_path / "m", csc=False, position="end", kind=ModelKind.COCOOP)
    path = folder / "gatekeeper.json"
    raw = json.loads(path.read_text())
    for key, value, needle in [
        ("class_token_position", "front", "class_token_position 'front' is a CoOp option; cocoop"),
        ("csc", True, r"class-specific contexts \(CSC\) are a CoOp option"),
        ("csc", "yes", "csc must be true or false"),
        ("class_token_position", "start", "class_token_position 'start' is not one of end, middle, front"),
    ]:
        path.write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ModelFormatError, match=needle):
            load_model(folder)


def test_loader_checks_the_context_shape_against_csc(random_backbone: Path, tmp_path: Path) -> None:
    import json

    folder = build(random_backbone, tmp_path / "m", csc=True, position="end")
    path = folder / "gatekeeper.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "csc": False}))
    with pytest.raises(ModelFormatError, match=r"has shape \(3, 4, 64\), expected \(4, 64\)"):
        load_model(folder)
    path.write_text(json.dumps({**json.loads(path.read_text()), "csc": True, "classnames": ["a", "b"]}))
    with pytest.raises(ModelFormatError, match=r"has shape \(3, 4, 64\), expected \(2, 4, 64\)"):
        load_model(folder)


def test_fresh_copy_keeps_the_options(random_backbone: Path, tmp_path: Path) -> None:
    """Calibration and null copies are fresh prompt learners of the model's own shape and layout."""
    from gatekeeper.control import copy_model, fresh_copy

    model = load_model(build(random_backbone, tmp_path / "m", csc=True, position="middle"))
    fresh = fresh_copy(model, seed=0)
    assert fresh.ctx.shape == model.ctx.shape and not torch.equal(fresh.ctx, model.ctx)
    assert torch.equal(fresh.ctx[0], fresh.ctx[2])  # "a photo of a" for every class
    assert torch.equal(fresh.prompt_order, model.prompt_order)
    copied = copy_model(model)
    x = _pixels(3, seed=5)
    with torch.no_grad():
        assert torch.equal(copied.logits(x), model.logits(x))
        assert fresh.logits(x).shape == (3, len(CLASSES))
