"""FastClipInspector computes what ClipInspector computes (issue "Fast scans").

Tolerances: text features / logits within 1e-5 absolute; per class ASR equal, L_avg within 1e-4
relative, triggers within 1e-4 absolute, same ranking (argsort of the anomaly score S).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gatekeeper.decide import anomaly_scores
from gatekeeper.inversion.base import ClassInversion, InversionSettings
from gatekeeper.inversion.clip_inspector import ClipInspector
from gatekeeper.inversion.fast import FastClipInspector, fast_logits, text_plan
from gatekeeper.models.loader import load_model
from gatekeeper.ood import load_pool
from tests.conftest import custom_backbone, make_model_folder

CLASSES = ("red circle", "blue square", "green star", "white ring", "pink long thin bar")
SETTINGS = InversionSettings(epsilon=8 / 255)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Both implementations run the same ops; one thread keeps these scans quick on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pool():
    return load_pool("procedural", 32, 64, 32, seed=0)


@pytest.fixture(scope="module")
def backbone77(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny open_clip CLIP with the real 77-token text context (local-dir layout)."""
    import open_clip

    from gatekeeper.redteam.pretrain import TINY_MODEL_CFG, save_backbone

    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["text_cfg"]["context_length"] = 77
    torch.manual_seed(1)
    model = open_clip.CLIP(**cfg)
    folder = tmp_path_factory.mktemp("backbone77") / "backbone"
    save_backbone(model, folder, {}, fp16=False, prune=False)
    # save_backbone writes the tiny config (16 tokens): record the one this model was built with
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"] = cfg
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _assert_same(ref: list[ClassInversion], fast: list[ClassInversion]) -> None:
    assert [r.metrics.index for r in ref] == [f.metrics.index for f in fast]
    for r, f in zip(ref, fast, strict=True):
        assert f.metrics.asr == r.metrics.asr, r.metrics.name
        assert f.metrics.loss == pytest.approx(r.metrics.loss, rel=1e-4, abs=1e-7), r.metrics.name
        assert f.trigger.shape == r.trigger.shape
        assert f.trigger.untyped_storage().nbytes() == f.trigger.numel() * f.trigger.element_size()  # not a view
        assert float((f.trigger - r.trigger).abs().max()) <= 1e-4, r.metrics.name
        assert float(f.trigger.abs().max()) <= SETTINGS.epsilon + 1e-7
    s_ref = [s.score for s in anomaly_scores([r.metrics for r in ref], 0.5)]
    s_fast = [s.score for s in anomaly_scores([f.metrics for f in fast], 0.5)]
    assert list(np.argsort(s_ref, kind="stable")) == list(np.argsort(s_fast, kind="stable"))


# ------------------------------------------------------------------ (a) the text path


@pytest.mark.parametrize("truncate,share", [(True, True), (True, False), (False, True), (False, False)])
def test_fast_text_path_equals_model_logits(model_factory, truncate: bool, share: bool):
    model = load_model(model_factory("cocoop", CLASSES))
    plan = text_plan(model, truncate=truncate)
    assert plan.causal and plan.shareable
    x = _pixels(7)
    with torch.no_grad():
        ref = model.logits(x)
        fast = fast_logits(model, x, plan, share_prefix=share)
    assert fast.shape == ref.shape
    assert float((fast - ref).abs().max()) <= 1e-5


def test_fast_text_path_gradient_equals_reference(model_factory):
    """The trigger gradient flows through the shared-prefix text path exactly as through logits."""
    model = load_model(model_factory("cocoop", CLASSES))
    plan = text_plan(model)
    x = _pixels(4, seed=3)
    grads = []
    for fn in (model.logits, lambda im: fast_logits(model, im, plan)):
        d = torch.zeros(3, 32, 32, requires_grad=True)
        (g,) = torch.autograd.grad(fn((x + d).clamp(0, 1))[:, 1].sum(), d)
        grads.append(g)
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-5 * max(1.0, float(grads[0].abs().max()))


def test_real_context_77_truncation_matters(backbone77: Path, tmp_path: Path):
    """With CLIP's 77-token context the text transformer runs on max(EOT)+1 tokens, same logits."""
    model = load_model(make_model_folder(backbone77, tmp_path / "m77", "cocoop", CLASSES))
    assert model.tokenized.shape[1] == 77
    plan = text_plan(model)
    assert plan.causal and plan.shareable
    assert plan.length == int(model.eot_index.max()) + 1 <= 12  # "X X X X pink long thin bar ." + EOT
    seen: list[int] = []
    hook = model.clip.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = _pixels(5, seed=1)
    with torch.no_grad():
        ref = model.logits(x)
        trunc = fast_logits(model, x, plan, share_prefix=False)
        shared = fast_logits(model, x, plan, share_prefix=True)  # per-layer loop, no transformer call
    hook.remove()
    assert seen == [77, plan.length]
    assert float((trunc - ref).abs().max()) <= 1e-5
    assert float((shared - ref).abs().max()) <= 1e-5


def test_real_context_77_scan_equals_reference(backbone77: Path, tmp_path: Path, pool):
    model = load_model(make_model_folder(backbone77, tmp_path / "m77", "cocoop", CLASSES))
    cands = [4, 1, 2]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    fast = FastClipInspector(max_batch_rows=64).invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    _assert_same(ref, fast)


# ------------------------------------------------------------------ (b) the scan, CoCoOp


FAST_CONFIGS = {
    "all-on, G=2 (2+2+1)": dict(max_batch_rows=64),
    "no class batching": dict(batch_classes=False),
    "truncate only, G=3 (3+2)": dict(share_prefix=False, max_batch_rows=96),
    "nothing but batching, G=5": dict(truncate=False, share_prefix=False, max_batch_rows=1000),
    "micro-batches of 16 (G=1)": dict(max_batch_rows=16),
}


def test_fast_scan_equals_reference_cocoop(model_factory, pool):
    model = load_model(model_factory("cocoop", CLASSES))
    cands = [4, 0, 2, 1, 3]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    for name, cfg in FAST_CONFIGS.items():
        det = FastClipInspector(**cfg)  # type: ignore[arg-type]
        calls: list[tuple[int, int, str]] = []

        def progress(done: int, total: int, cls: str, calls: list = calls) -> None:
            calls.append((done, total, cls))

        fast = det.invert(model, pool.inversion, pool.holdout, cands, SETTINGS, progress)
        _assert_same(ref, fast)
        assert calls[0] == (0, 5, CLASSES[4]) and calls[-1] == (5, 5, ""), name
    assert FastClipInspector(max_batch_rows=64).last_plan == {}  # filled by invert only


def test_group_plan_is_recorded(model_factory, pool):
    model = load_model(model_factory("cocoop", CLASSES))
    det = FastClipInspector(max_batch_rows=64)
    det.invert(model, pool.inversion[:32], pool.holdout[:8], [0, 1, 2], SETTINGS)
    assert det.last_plan["classes_per_step"] == 2
    assert det.last_plan["micro_batch"] == 32
    assert det.last_plan["shared_prefix"] is True
    assert det.last_plan["amp"] is False  # CPU: never autocast
    assert det.last_plan["text_length"] == text_plan(model).length


# ------------------------------------------------------------------ (c) CoOp and zero-shot


@pytest.mark.parametrize("kind", ["coop", "zeroshot"])
def test_fast_scan_equals_reference_coop_zeroshot(model_factory, pool, kind: str):
    model = load_model(model_factory(kind, CLASSES))
    cands = [0, 1, 2, 3, 4]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, SETTINGS)  # no cached text
    fast = FastClipInspector(max_batch_rows=64).invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    assert model._cached_text is not None  # text features computed once
    _assert_same(ref, fast)


# ------------------------------------------------------------------ one Adam == G Adams


def test_stacked_adam_equals_separate_adams():
    g = torch.Generator().manual_seed(0)
    n, shape, eps = 3, (3, 8, 8), 8 / 255
    init = [(torch.rand(shape, generator=g) * 2 - 1) * eps for _ in range(n)]
    grads = [[torch.randn(shape, generator=g) * 10.0 ** (-i) for _ in range(n)] for i in range(6)]
    sep = [t.clone().requires_grad_(True) for t in init]
    opts = [torch.optim.Adam([p], lr=0.1) for p in sep]
    stacked = torch.stack(init).requires_grad_(True)
    opt = torch.optim.Adam([stacked], lr=0.1)
    for step in grads:
        for p, o, gr in zip(sep, opts, step, strict=True):
            p.grad = gr.clone()
            o.step()
            with torch.no_grad():
                p.clamp_(-eps, eps)
        stacked.grad = torch.stack(step)
        opt.step()
        with torch.no_grad():
            stacked.clamp_(-eps, eps)
    assert torch.equal(stacked.detach(), torch.stack([p.detach() for p in sep]))


def test_summed_loss_gives_each_delta_its_own_gradient(model_factory):
    """d/d delta_g of sum_g' loss_g'(rows of g') == d/d delta_g of loss_g alone (no mixing)."""
    from gatekeeper.inversion.clip_inspector import apply_trigger, margin_loss

    model = load_model(model_factory("cocoop", CLASSES))
    plan = text_plan(model)
    x = _pixels(6, seed=5)
    deltas = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1) * SETTINGS.epsilon
    deltas.requires_grad_(True)
    trig = apply_trigger(x.unsqueeze(0), deltas.unsqueeze(1)).reshape(12, 3, 32, 32)
    logits = fast_logits(model, trig, plan)
    (margin_loss(logits[:6], 1) + margin_loss(logits[6:], 3)).backward()
    for g, c in enumerate((1, 3)):
        d = deltas.detach()[g].clone().requires_grad_(True)
        margin_loss(model.logits(apply_trigger(x, d)), c).backward()
        assert d.grad is not None and deltas.grad is not None
        assert float((deltas.grad[g] - d.grad).abs().max()) <= 1e-5 * max(1.0, float(d.grad.abs().max()))


# ------------------------------------------------------------------ CoOp's options


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
def test_fast_scan_equals_reference_coop_options(
    random_backbone: Path, tmp_path: Path, pool, csc: bool, position: str, precision: str
):
    """Class-specific contexts and the class token at the front or in the middle: the fast scan
    (cached text features, class batching) gives the reference's logits, ASR, loss and triggers."""
    from gatekeeper.models.manifest import Precision
    from tests.models.test_prompt_options import build

    folder = build(random_backbone, tmp_path / "m", csc=csc, position=position, precision=Precision(precision),
                   classes=CLASSES)
    model = load_model(folder)
    assert model.manifest.csc == csc
    assert model.shared_end_context == (not csc and position == "end")
    x = _pixels(6, seed=4)
    with torch.no_grad():
        ref_logits = model.logits(x)  # nothing cached: prompts assembled and encoded on every call
        model.freeze_text()
        fast_logits_ = fast_logits(model, x, text_plan(model))
        model.thaw_text()
    assert float((fast_logits_ - ref_logits).abs().max()) <= 1e-5
    cands = [4, 0, 2]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    model.thaw_text()
    det = FastClipInspector(max_batch_rows=64)
    fast = det.invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    assert det.last_plan["shared_prefix"] is False and det.last_plan["classes_per_step"] == 2
    _assert_same(ref, fast)


def test_prefix_sharing_needs_the_shared_end_layout(model_factory):
    """The shared-prefix path assumes [SOS, one ctx, class, ...] for every class; a model whose
    prompts are laid out otherwise is never given a shareable plan, and fast_logits falls back to
    the model's own logits."""
    model = load_model(model_factory("cocoop", CLASSES))
    assert model.shared_end_context and text_plan(model).shareable
    model.prompt_order = torch.arange(model.tokenized.shape[1]).expand(len(CLASSES), -1).clone()
    assert not model.shared_end_context and not text_plan(model).shareable
    seen: list[int] = []
    hook = model.clip.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        fast_logits(model, _pixels(2), text_plan(model))
    hook.remove()
    assert seen == [model.tokenized.shape[1]]  # the full-length exact path, not the truncated one


# ------------------------------------------------------------------ text towers the fast path does not fit

# open_clip text_cfg changes under which truncation at the EOT and prefix sharing are not exact
NOT_CUTTABLE = {
    "no-causal-mask": {"no_causal_mask": True},  # every token attends to the padding after the EOT
    "pool-last": {"pool_type": "last"},  # pooled at the last position, which truncation moves
    "pool-first": {"pool_type": "first"},  # pooled at SOS: the EOT rows the shared path keeps are not read
}


@pytest.fixture(scope="module", params=sorted(NOT_CUTTABLE))
def odd_tower_model(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    backbone = custom_backbone(root / "backbone", NOT_CUTTABLE[request.param])
    return request.param, load_model(make_model_folder(backbone, root / "m", "cocoop", CLASSES))


def _unguarded_plan(model) -> object:
    """The plan text_plan would make if it did not check the tower: truncated and shared."""
    from gatekeeper.inversion.fast import TextPlan

    eot = model.eot_index
    return TextPlan(
        length=int(eot.max()) + 1, prefix_len=1 + model.manifest.n_ctx, causal=True, shareable=True, eot=eot
    )


def test_the_planner_takes_the_exact_path_on_other_text_towers(odd_tower_model):
    _name, model = odd_tower_model
    plan = text_plan(model)
    assert not plan.cuttable and not plan.shareable
    assert plan.length == model.tokenized.shape[1]
    x = _pixels(3, seed=4)
    with torch.no_grad():
        assert torch.equal(fast_logits(model, x, plan), model.logits(x))  # the model's own logits, bit for bit


def test_without_the_guard_the_fast_path_is_wrong_on_other_text_towers(odd_tower_model):
    """What the guard prevents: truncating at the EOT and sharing the prefix change these logits."""
    name, model = odd_tower_model
    x = _pixels(3, seed=4)
    plan = _unguarded_plan(model)
    with torch.no_grad():
        ref = model.logits(x)
        shared = fast_logits(model, x, plan, share_prefix=True)
        trunc = fast_logits(model, x, plan, share_prefix=False)
    assert float((shared - ref).abs().max()) > 1e-3, name
    if name != "pool-first":  # position 0 sees only itself under a causal mask: truncation alone keeps it
        assert float((trunc - ref).abs().max()) > 1e-3, name


def test_fast_scan_equals_reference_on_other_text_towers(odd_tower_model, pool):
    _name, model = odd_tower_model
    cands = [4, 1, 2]
    ref = ClipInspector().invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    det = FastClipInspector(max_batch_rows=64)
    fast = det.invert(model, pool.inversion, pool.holdout, cands, SETTINGS)
    _assert_same(ref, fast)
    assert det.last_plan["exact_text"] and not det.last_plan["shared_prefix"]
    assert det.last_plan["text_length"] == model.tokenized.shape[1]
