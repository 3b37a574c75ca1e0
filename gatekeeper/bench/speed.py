"""Scan speed: the reference ClipInspector vs FastClipInspector on the same model, pool and settings.

The model is a random-weight CoCoOp on an open_clip CLIP with the real 77-token text context and
50 ImageNet-like class names: on CUDA with ViT-B/16 shapes (open_clip config ``ViT-B-16``), on the
CPU at an affordable size (ViT width 192 / 6 layers / patch 16 at 112 px, text width 256 / 6
layers; ``--quick``: 128 / 4 and 128 / 4). Weights are random: only the *cost* and the
*agreement* of the two implementations are measured, not detection quality.

Both detectors invert the same subset of candidate classes (the reference is too slow for all
50 on a CPU); the output says which. The last line printed is exactly ``speedup <ratio>x``
(reference wall time / fast wall time, both including the ASR pass).

FLOPs (analytic, forward): a pre-LN transformer layer on T query tokens of width W attending to
N keys costs 24*T*W^2 (q/k/v/out projections 8TW^2 + MLP 16TW^2) + 4*T*N*W (QK^T and AV).
  image tower, per image: L_img * (24*T*W^2 + 4*T^2*W) + 2*T*3*p^2*W (patch embedding)
  text, reference, per image: K * L_txt * (24*77*W^2 + 4*77^2*W)
  text, fast, per image: L_txt * (24*P*W^2 + 4*P^2*W) + K * L_txt * (24*S*W^2 + 4*S*(P+S)*W)
      with P = 1 + n_ctx, S = max(EOT) + 1 - P (the last-layer savings are not counted).
An inversion step needs forward + backward to the input only (the weights are frozen, no weight
gradients): ~2x forward; the ASR pass is forward only. Achieved TFLOP/s = FLOPs / wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch

from gatekeeper._alloc import heap_mode, minor_faults
from gatekeeper.decide import anomaly_scores
from gatekeeper.inversion.base import ClassInversion, InversionSettings
from gatekeeper.inversion.clip_inspector import ClipInspector, apply_trigger, margin_loss
from gatekeeper.inversion.fast import FastClipInspector, cocoop_text_features, fast_logits, row_bytes, text_plan
from gatekeeper.models.manifest import BackboneRef, Manifest, ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net

CLASSNAMES = (
    "tench",
    "goldfish",
    "great white shark",
    "tiger shark",
    "hammerhead shark",
    "electric ray",
    "stingray",
    "rooster",
    "hen",
    "ostrich",
    "brambling",
    "goldfinch",
    "house finch",
    "junco",
    "indigo bunting",
    "American robin",
    "bulbul",
    "jay",
    "magpie",
    "chickadee",
    "American dipper",
    "kite (bird of prey)",
    "bald eagle",
    "vulture",
    "great grey owl",
    "fire salamander",
    "smooth newt",
    "newt",
    "spotted salamander",
    "axolotl",
    "American bullfrog",
    "tree frog",
    "tailed frog",
    "loggerhead sea turtle",
    "leatherback sea turtle",
    "mud turtle",
    "terrapin",
    "box turtle",
    "banded gecko",
    "green iguana",
    "Carolina anole",
    "desert grassland whiptail lizard",
    "agama",
    "frilled-necked lizard",
    "alligator lizard",
    "Gila monster",
    "European green lizard",
    "chameleon",
    "Komodo dragon",
    "Nile crocodile",
)  # the first 50 ImageNet-1k class names (CoOp's cleaned spelling)

CPU_SIZES = {"vision_width": 192, "vision_layers": 6, "text_width": 256, "text_layers": 6, "image_size": 112}
QUICK_SIZES = {"vision_width": 128, "vision_layers": 4, "text_width": 128, "text_layers": 4, "image_size": 112}

# dense peak TFLOP/s by GPU name fragment: (bf16 tensor core, plain fp32 CUDA cores). The fp32
# runs are compared with the fp32 figure (torch's default matmul precision does not use TF32).
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "4090": (165.0, 82.6),
    "3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


# --------------------------------------------------------------------------- the model


def build_bench_model(
    device: torch.device,
    n_classes: int = 50,
    vit_b16: bool = False,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> PromptTunedCLIP:
    """A random-weight CoCoOp (n_ctx 4, ctx from "a photo of a") with the real 77-token context."""
    import open_clip

    torch.manual_seed(seed)
    if vit_b16:
        cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
    else:
        s = sizes or CPU_SIZES
        cfg = {
            "embed_dim": max(s["text_width"], 64),
            "vision_cfg": {
                "image_size": s["image_size"],
                "layers": s["vision_layers"],
                "width": s["vision_width"],
                "patch_size": 16,
                "head_width": 64,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "width": s["text_width"],
                "heads": max(s["text_width"] // 64, 1),
                "layers": s["text_layers"],
            },
        }
    clip = open_clip.CLIP(**cfg).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE, 77 tokens
    names = tuple((CLASSNAMES * (n_classes // len(CLASSNAMES) + 1))[:n_classes])
    if len(set(names)) != len(names):
        names = tuple(f"{n} {i}" if i >= len(CLASSNAMES) else n for i, n in enumerate(names))
    image_size = int(cfg["vision_cfg"]["image_size"])
    manifest = Manifest(
        kind=ModelKind.COCOOP,
        classnames=names,
        backbone=BackboneRef("random-init"),
        image_size=image_size,
        n_ctx=4,
        ctx_init="a photo of a",
    )
    with torch.no_grad():
        ctx = clip.token_embedding(tokenizer(["a photo of a"])[0][1:5]).clone()
    ctx_dim = int(clip.ln_final.weight.shape[0])
    meta = build_meta_net(int(clip.visual.output_dim), ctx_dim)
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=ctx, meta_net=meta)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


# --------------------------------------------------------------------------- measuring


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory during the block: CUDA max_memory_allocated, or sampled RSS (+ ru_maxrss) on CPU."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_above_start_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss())
        out["peak_gib"] = peak[0] / 2**30
        out["peak_above_start_gib"] = (peak[0] - base) / 2**30
        out["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _faults(mem: dict[str, float]) -> str:
    if "cpu_s" not in mem:
        return ""
    return f"  ({mem['cpu_s']:.1f} CPU-s, {mem['minor_faults'] / 1e6:.2f} M minor page faults)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_scan(
    detector: Any,
    model: PromptTunedCLIP,
    pool: Any,
    cands: list[int],
    settings: InversionSettings,
    device: torch.device,
) -> tuple[list[ClassInversion], float, dict[str, float]]:
    faults0, cpu0 = minor_faults(), time.process_time()
    with peak_memory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        res = detector.invert(model, pool.inversion, pool.holdout, cands, settings)
        _sync(device)
        wall = time.perf_counter() - t0
    mem["minor_faults"] = float(minor_faults() - faults0)
    mem["cpu_s"] = time.process_time() - cpu0
    return res, wall, mem


def _step_time(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    groups: int,
    target: int,
    device: torch.device,
    repeats: int,
) -> float:
    """Seconds per (class, step): forward + backward of the margin loss over G classes' rows."""
    shape = x.shape[1:]
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        deltas = torch.zeros(groups, *shape, device=device, requires_grad=True)
        _sync(device)
        t0 = time.perf_counter()
        trig = apply_trigger(x.unsqueeze(0), deltas.unsqueeze(1)).reshape(groups * len(x), *shape)
        logits = fn(trig).float()
        loss = sum(margin_loss(logits[g * len(x) : (g + 1) * len(x)], target) for g in range(groups))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best / groups


def scan_flops(model: PromptTunedCLIP, n_steps_images: int, n_asr_images: int, fast: bool) -> float:
    """Analytic FLOPs of a scan (module docstring): 2x forward per inversion image, 1x per ASR image."""
    img, txt = image_text_flops(model, fast)
    return (img + txt) * (2 * n_steps_images + n_asr_images)


def image_text_flops(model: PromptTunedCLIP, fast: bool) -> tuple[float, float]:
    """Forward FLOPs per image of a CoCoOp logits call: (image tower, text tower over all K class prompts)."""
    visual: Any = model.clip.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
    t = (model.image_size // patch) ** 2 + 1
    wi, li = int(visual.transformer.width), len(visual.transformer.resblocks)
    img = li * (24 * t * wi**2 + 4 * t * t * wi) + 2 * (t - 1) * 3 * patch * patch * wi
    clip: Any = model.clip
    w = int(clip.ln_final.weight.shape[0])
    lt = len(clip.transformer.resblocks)
    k = len(model.classnames)
    if fast:
        plan = text_plan(model)
        p = plan.prefix_len
        s = plan.length - p
        txt = lt * (24 * p * w**2 + 4 * p * p * w) + k * lt * (24 * s * w**2 + 4 * s * (p + s) * w)
    else:
        n = int(cast(torch.Tensor, model.tokenized).shape[1])
        txt = k * lt * (24 * n * w**2 + 4 * n * n * w)
    return float(img), float(txt)


FULL_CLASS_KS = (10, 50, 200, 1000)


def full_class_costs(
    ks: tuple[int, ...] = FULL_CLASS_KS, n_pool: int = 1000, n_hold: int = 500, sizes: dict[str, int] | None = None,
    keep: int | None = None, n_screen: int | None = None,
) -> list[dict[str, float]]:
    """Analytic PFLOP of inverting every class of a K-class CoCoOp once (one restart, one budget;
    |D| = ``n_pool``, |T| = ``n_hold``), reference and fast, at ViT-B/16 shapes (``sizes``: the
    small CPU shapes instead). Each candidate's step runs the image tower and all K class prompts,
    so the text part grows as K^2. ``screened_pflop``: the same scan behind the screening stage
    (every class on ``n_screen`` + ``n_screen`` images, then ``keep`` classes in full; the policy's
    defaults)."""
    from gatekeeper.policy import Policy

    keep = Policy().screen_keep if keep is None else keep
    n_screen = Policy().screen_images if n_screen is None else n_screen
    rows = []
    for k in ks:
        model = build_bench_model(torch.device("cpu"), k, vit_b16=sizes is None, sizes=sizes)
        ref = scan_flops(model, n_pool * k, n_hold * k, fast=False)
        fast = scan_flops(model, n_pool * k, n_hold * k, fast=True)
        screened = fast
        if k > keep:  # every class on n_screen + n_screen images (and the public backbone's image tower), then keep in full
            img, _ = image_text_flops(model, fast=True)
            screened = scan_flops(model, n_screen * k, n_screen * k, fast=True) + 3 * img * n_screen * k
            screened += scan_flops(model, n_pool * keep, n_hold * keep, fast=True)
        rows.append({"classes": k, "reference_pflop": ref / 1e15, "fast_pflop": fast / 1e15, "work_ratio": ref / fast,
                     "screened_pflop": screened / 1e15, "screened_keep": min(k, keep)})
    return rows


def whole_scan_pflop(model: PromptTunedCLIP, policy: Any) -> dict[str, float]:
    """Analytic PFLOP of a whole scan of ``model`` (CoCoOp, every class) under ``policy``, by part:
    the model's inversions (restarts x budgets), the public backbone's (zero-shot: the image tower
    per image, the class prompts once), the null model's clean copies (tuning on cached image
    features, then the model's inversions), the positive control (the plant, through the image
    tower for the trigger and the text for every step, and, under the lift rule, the planted class
    alone re-scanned) and the screening where the policy screens. Forward FLOPs count once, a
    backward twice more (the module docstring's convention: 2x per inversion image)."""
    from gatekeeper.control import N_PLANT, PLANT_EPOCHS
    from gatekeeper.decide import rule_for
    from gatekeeper.models.tuning import BadCLIP
    from gatekeeper.null import NULL_TRAIN_EPOCHS
    from gatekeeper.pipeline import control_rescans_target_only
    from gatekeeper.policy import PositiveControl
    from gatekeeper.screen import screens

    k = len(model.classnames)
    img, txt = image_text_flops(model, fast=True)
    per_class = (2 * policy.ood_budget + policy.holdout) * (img + txt)  # one class, one pass
    ref_per_class = (2 * policy.ood_budget + policy.holdout) * img
    rule = rule_for(policy)
    passes = policy.restarts * len(policy.budgets)
    kept = min(k, policy.screen_keep) if screens(policy, k) else k
    out = {"model": passes * kept * per_class}
    out["public backbone"] = passes * kept * ref_per_class if rule.needs_reference else 0.0
    tune = NULL_TRAIN_EPOCHS * N_PLANT * 3 * txt + N_PLANT * img
    out["null copies"] = policy.null_copies * len(policy.budgets) * (tune + policy.restarts * kept * per_class) if rule.uses_null else 0.0
    if screens(policy, k):
        out["screening"] = len(policy.budgets) * 3 * policy.screen_images * k * ((img + txt) + (img if rule.needs_reference else 0.0))
    if policy.positive_control != PositiveControl.OFF:
        warmup = BadCLIP(0).warmup  # epochs in which the plant trains its trigger only (no clean loss)
        plant = PLANT_EPOCHS * N_PLANT * 3 * (img + txt) + (PLANT_EPOCHS - warmup) * N_PLANT * 3 * txt
        rescan_classes = 1 if control_rescans_target_only(policy) else kept
        out["positive control"] = plant + passes * rescan_classes * (per_class + ref_per_class)
    return {name: v / 1e15 for name, v in out.items()}


def shipped_policy_costs(sizes: dict[str, int] | None = None, k: int = 50) -> dict[str, dict[str, float]]:
    """:func:`whole_scan_pflop` under each shipped policy for a ``k``-class ViT-B/16 CoCoOp."""
    from gatekeeper.policy import load_policy

    model = build_bench_model(torch.device("cpu"), k, vit_b16=sizes is None, sizes=sizes)
    return {name: whole_scan_pflop(model, load_policy(name)) for name in ("default", "tiny-world")}


def measured_full_class(ks: tuple[int, ...] = (10, 50), n_pool: int = 32, n_hold: int = 16, log: Any = None) -> list[dict[str, float]]:
    """Wall seconds of the fast path inverting every class of a K-class CoCoOp at the small CPU
    shapes (random weights, one restart): how the cost grows with K on this machine."""
    rows = []
    for k in ks:
        model = build_bench_model(torch.device("cpu"), k, vit_b16=False, sizes=QUICK_SIZES)
        model.eval()
        pool = torch.rand(n_pool + n_hold, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(k))
        settings = InversionSettings(8 / 255, 32, 1, 0.1, 0)
        t0 = time.perf_counter()
        FastClipInspector().invert(model, pool[:n_pool], pool[n_pool:], list(range(k)), settings)
        rows.append({"classes": k, "seconds": time.perf_counter() - t0})
        if log:
            log(f"  K = {k}: {rows[-1]['seconds']:.1f} s")
    return rows


def tower_split(k: int = 50, batch: int = 4, repeats: int = 2, sizes: dict[str, int] | None = None) -> dict[str, float]:
    """One fast inversion step at ViT-B/16 shapes (random weights; ``sizes``: the small shapes
    instead), timed on the CPU: the whole step (image tower + CoCoOp text path over K classes,
    forward and backward to the trigger) and the image tower alone (the same step with the text
    features held fixed), per image; beside them the analytic forward-FLOP share of the image tower."""
    cpu = torch.device("cpu")
    model = build_bench_model(cpu, k, vit_b16=sizes is None, sizes=sizes)
    plan = text_plan(model)
    x = torch.rand(batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # fixed text features: what the image tower alone feeds
        text = cocoop_text_features(model, model.image_features(x[:1]), plan)[0]
    whole = _step_time(lambda t: fast_logits(model, t, plan), x, 1, 0, cpu, repeats) / batch
    image = _step_time(lambda t: model.logit_scale * model.image_features(t) @ text.T, x, 1, 0, cpu, repeats) / batch
    img_flops, txt_flops = image_text_flops(model, fast=True)
    return {"classes": k, "batch": batch, "step_s_per_image": whole, "image_s_per_image": image,
            "image_share_measured": image / whole, "image_share_analytic": img_flops / (img_flops + txt_flops)}


def _compare(ref: list[ClassInversion], fast: list[ClassInversion]) -> dict[str, Any]:
    dl = max(abs(r.metrics.loss - f.metrics.loss) for r, f in zip(ref, fast, strict=True))
    rel = max(
        abs(r.metrics.loss - f.metrics.loss) / max(abs(r.metrics.loss), 1e-12) for r, f in zip(ref, fast, strict=True)
    )
    dt = max(float((r.trigger - f.trigger).abs().max()) for r, f in zip(ref, fast, strict=True))
    asr_equal = all(r.metrics.asr == f.metrics.asr for r, f in zip(ref, fast, strict=True))

    def cstar(res: list[ClassInversion]) -> str:
        if len(res) < 2:
            return res[0].metrics.name
        scores = anomaly_scores([r.metrics for r in res], 0.5)
        return max(scores, key=lambda s: s.z).name

    return {
        "max_abs_dloss": dl,
        "max_rel_dloss": rel,
        "max_abs_dtrigger": dt,
        "asr_equal": asr_equal,
        "cstar_ref": cstar(ref),
        "cstar_fast": cstar(fast),
        "same_cstar": cstar(ref) == cstar(fast),
    }


# --------------------------------------------------------------------------- the benchmark


def run_speed_bench(
    quick: bool = False,
    vision_width: int | None = None,
    vision_layers: int | None = None,
    text_width: int | None = None,
    text_layers: int | None = None,
    n_classes: int = 50,
    pool: int | None = None,
    device: str | None = None,
    candidates: int | None = None,
    holdout: int | None = None,
    threads: int | None = None,
    breakdown: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time the reference and the fast scan on one model; returns the numbers (also logged).

    Args:
        quick: small sizes and a small pool (< 2 min on 2 CPU cores).
        vision_width, vision_layers, text_width, text_layers: override the CPU model sizes.
        n_classes: K, classes of the model (the max in the margin loss runs over all of them).
        pool: |D| inversion images (default 48 quick = steps of 32 + 16, 64 CPU, 1000 CUDA).
        device: "cpu", "cuda" (default: cuda when available).
        candidates: how many candidate classes both detectors invert (default 2 quick, 3 CPU, 4 CUDA).
        holdout: |T| (default 16 quick, 32 CPU, 64 CUDA).
        threads: torch CPU threads (default: leave torch's setting).
    """
    from gatekeeper.ood import load_pool

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    cuda = dev.type == "cuda"
    sizes = dict(QUICK_SIZES if quick else CPU_SIZES)
    for key, val in (
        ("vision_width", vision_width),
        ("vision_layers", vision_layers),
        ("text_width", text_width),
        ("text_layers", text_layers),
    ):
        if val is not None:
            sizes[key] = val
    vit_b16 = cuda and not any(v is not None for v in (vision_width, vision_layers, text_width, text_layers))
    n_pool = pool or (1000 if cuda and not quick else 48 if quick else 64)
    n_hold = holdout or (64 if cuda else 16 if quick else 32)
    n_cand = candidates or (4 if cuda else 2 if quick else 3)
    model = build_bench_model(dev, n_classes, vit_b16=vit_b16, sizes=sizes)
    data = load_pool("procedural", model.image_size, n_pool, n_hold, seed=0)
    settings = InversionSettings(epsilon=4 / 255)
    k = len(model.classnames)
    cands = [round(i * (k - 1) / max(n_cand - 1, 1)) for i in range(n_cand)] if n_cand > 1 else [0]
    plan = text_plan(model)
    shape = (
        "ViT-B/16 (open_clip 'ViT-B-16', random weights)"
        if vit_b16
        else (
            f"ViT w{sizes['vision_width']}/L{sizes['vision_layers']}/p16 @ {model.image_size}px, "
            f"text w{sizes['text_width']}/L{sizes['text_layers']}, random weights"
        )
    )
    log(
        f"device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if cuda else f", torch threads {torch.get_num_threads()}")
    )
    log(f"model: CoCoOp n_ctx 4 on {shape}; context 77, K = {k} classes; max EOT+1 = {plan.length}")
    log(f"pool |D| = {n_pool}, |T| = {n_hold}, batch {settings.batch_size}, 1 epoch, eps 4/255")
    log(
        f"candidates: a subset of {len(cands)} of {k} classes, the same for both: {[model.classnames[c] for c in cands]}"
    )
    out: dict[str, Any] = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "model": shape,
        "n_classes": k,
        "pool": n_pool,
        "holdout": n_hold,
        "candidates": [model.classnames[c] for c in cands],
        "text_length": plan.length,
    }

    # warm-up (CUDA context, cuBLAS handles, kernel selection) so neither timed scan pays for it
    warm = data.inversion[:2].to(dev)
    for fn in (model.logits, lambda im: fast_logits(model, im, plan)):
        _step_time(fn, warm, 1, 0, dev, repeats=0)
    # the fast path first (the CPU RSS high-water mark cannot be reset: the smaller one goes first)
    fast_det = FastClipInspector(amp=False)
    fast_res, t_fast, mem_fast = _timed_scan(fast_det, model, data, cands, settings, dev)
    log(f"fast      : {t_fast:8.2f} s  plan {fast_det.last_plan}{_faults(mem_fast)}")
    ref_res, t_ref, mem_ref = _timed_scan(ClipInspector(), model, data, cands, settings, dev)
    log(f"reference : {t_ref:8.2f} s{_faults(mem_ref)}")
    work = n_pool * len(cands)
    out.update(
        {
            "fast_plan": fast_det.last_plan,
            "estimated_row_bytes": {
                "fast": row_bytes(model, plan, True, train=True, amp=False),
                "reference": row_bytes(model, None, False, train=True, amp=False),
            },
        }
    )
    if not cuda:
        # glibc maps the reference's large activations afresh at every step (page faults, system
        # time): that is the allocator's cost, not the algorithm's. Both paths again with large
        # blocks kept on the heap; the headline speed-up is this allocator-neutral one.
        out["default_allocator"] = {"reference_s": t_ref, "fast_s": t_fast, "speedup": t_ref / t_fast}
        log(f"speedup with glibc's default allocator settings {t_ref / t_fast:.2f}x")
        if heap_mode():
            log("allocator: large blocks from the heap, freed memory kept (both paths, from here on)")
            fast_res, t_fast, mem_heap_fast = _timed_scan(fast_det, model, data, cands, settings, dev)
            log(f"fast      : {t_fast:8.2f} s{_faults(mem_heap_fast)}")
            ref_res, t_ref, mem_heap_ref = _timed_scan(ClipInspector(), model, data, cands, settings, dev)
            log(f"reference : {t_ref:8.2f} s{_faults(mem_heap_ref)}")
            out["allocator"] = "heap"
            out["headline_cpu_s"] = {"reference": mem_heap_ref["cpu_s"], "fast": mem_heap_fast["cpu_s"]}
            out["heap_allocator_faults"] = {
                "fast": mem_heap_fast["minor_faults"],
                "reference": mem_heap_ref["minor_faults"],
            }
        else:
            out["allocator"] = "default (not glibc: no allocator-neutral run)"
    out.update(
        {
            "reference_s": t_ref,
            "fast_s": t_fast,
            "reference_img_cls_per_s": work / t_ref,
            "fast_img_cls_per_s": work / t_fast,
            "reference_mem": mem_ref,
            "fast_mem": mem_fast,
        }
    )
    log(
        f"images*classes per second (inversion pool x candidates / wall, ASR included): reference {work / t_ref:.2f}, fast {work / t_fast:.2f}"
    )
    mem_key = "peak_above_start_gib"
    log(
        f"peak memory above start: reference {mem_ref[mem_key]:.2f} GiB, fast {mem_fast[mem_key]:.2f} GiB"
        + (f" (process ru_maxrss {mem_ref['ru_maxrss_gib']:.2f} GiB)" if "ru_maxrss_gib" in mem_ref else "")
    )
    eq = _compare(ref_res, fast_res)
    out["equal"] = eq
    log(
        f"equal results: max |dL_avg| {eq['max_abs_dloss']:.2e} (rel {eq['max_rel_dloss']:.2e}), "
        f"max |dtrigger| {eq['max_abs_dtrigger']:.2e}, ASR equal {eq['asr_equal']}, "
        f"same c* {eq['same_cstar']} ({eq['cstar_ref']})"
    )
    steps_images = n_pool * settings.epochs * len(cands)
    f_ref = scan_flops(model, steps_images, n_hold * len(cands), fast=False)
    f_fast = scan_flops(model, steps_images, n_hold * len(cands), fast=True)
    out["flops"] = {"reference": f_ref, "fast": f_fast}
    log(
        f"analytic FLOPs: reference {f_ref / 1e12:.2f} TFLOP ({f_ref / t_ref / 1e9:.1f} GFLOP/s), "
        f"fast {f_fast / 1e12:.3f} TFLOP ({f_fast / t_fast / 1e9:.1f} GFLOP/s); work ratio {f_ref / f_fast:.1f}x"
    )
    if not cuda:
        # FLOPs per CPU-second (not per wall second): both paths against one core's fp32 matmul peak
        cpu_peak = cpu_matmul_gflop_per_cpu_s()
        # the CPU-seconds of the headline runs (heap allocator where it applies)
        headline = out.get("headline_cpu_s") or {"reference": mem_ref["cpu_s"], "fast": mem_fast["cpu_s"]}
        cpu_ref, cpu_fast = headline["reference"], headline["fast"]
        out["cpu_efficiency"] = {
            "matmul_peak_gflop_per_cpu_s": cpu_peak,
            "reference_gflop_per_cpu_s": f_ref / cpu_ref / 1e9,
            "fast_gflop_per_cpu_s": f_fast / cpu_fast / 1e9,
            "reference_of_peak": f_ref / cpu_ref / 1e9 / cpu_peak,
            "fast_of_peak": f_fast / cpu_fast / 1e9 / cpu_peak,
        }
        eff = out["cpu_efficiency"]
        log(
            f"fp32 matmul peak (measured, n=2048, one thread): {cpu_peak:.1f} GFLOP per CPU-second; "
            f"achieved: reference {eff['reference_gflop_per_cpu_s']:.1f} ({eff['reference_of_peak']:.0%} of peak), "
            f"fast {eff['fast_gflop_per_cpu_s']:.1f} ({eff['fast_of_peak']:.0%})"
        )
    if cuda:
        name = torch.cuda.get_device_name(dev)
        peak = next((v for key, v in PEAK_TFLOPS.items() if key in name), None)
        if peak is not None:
            log(
                f"TFLOP/s vs device fp32 peak ({peak[1]:.0f}): reference {f_ref / t_ref / 1e12 / peak[1]:.1%}, fast {f_fast / t_fast / 1e12 / peak[1]:.1%}"
            )
        amp_det = FastClipInspector(amp=True)
        amp_res, t_amp, mem_amp = _timed_scan(amp_det, model, data, cands, settings, dev)
        eq_amp = _compare(ref_res, amp_res)
        out.update({"fast_bf16_s": t_amp, "fast_bf16_mem": mem_amp, "equal_bf16": eq_amp})
        log(
            f"fast bf16 : {t_amp:8.2f} s ({t_ref / t_amp:.1f}x), peak {mem_amp[mem_key]:.2f} GiB; NOT exact: "
            f"max |dL_avg| {eq_amp['max_abs_dloss']:.2e}, ASR equal {eq_amp['asr_equal']}, same c* {eq_amp['same_cstar']}"
            + (
                f"; {f_fast / t_amp / 1e12:.1f} TFLOP/s = {f_fast / t_amp / 1e12 / peak[0]:.1%} of bf16 peak {peak[0]:.0f}"
                if peak
                else ""
            )
        )
    if breakdown:
        out["breakdown"] = _breakdown(model, data.inversion[: settings.batch_size].to(dev), plan, dev, quick, log)
    ratio = t_ref / t_fast
    out["speedup"] = ratio
    if not cuda:
        log(f"allocator of the headline figure: {out['allocator']}")
    log(f"speedup {ratio:.2f}x")
    return out


def _breakdown(
    model: PromptTunedCLIP, x: torch.Tensor, plan: Any, dev: torch.device, quick: bool, log: Callable[[str], None]
) -> dict[str, float]:
    """Seconds per (class, optimization step) with each optimization added in turn."""
    from gatekeeper.inversion.fast import text_plan as make_plan

    full = make_plan(model, truncate=False)
    b = min(len(x), 4 if quick and dev.type == "cpu" else 8 if dev.type == "cpu" else len(x))
    xb = x[:b]
    groups = 4
    variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int]] = [
        ("reference (model.logits)", model.logits, 1),
        ("+ truncate at EOT", lambda im: fast_logits(model, im, plan, share_prefix=False), 1),
        ("+ shared prefix", lambda im: fast_logits(model, im, plan, share_prefix=True), 1),
        (f"+ {groups} classes per forward", lambda im: fast_logits(model, im, plan, share_prefix=True), groups),
    ]
    if not quick:
        variants.append(
            ("shared prefix without truncation", lambda im: fast_logits(model, im, full, share_prefix=True), 1)
        )
    res: dict[str, float] = {}
    log(f"per-optimization breakdown (s per class-step, batch of {b} images, best of 2):")
    base = None
    for name, fn, g in variants:
        sec = _step_time(fn, xb, g, 1, dev, repeats=1)
        base = base or sec
        res[name] = sec
        log(f"  {name:34s} {sec:8.4f} s  ({base / sec:5.1f}x)")
    return res


# --------------------------------------------------------------------------- the GPU check
#
# ``gatekeeper-lab bench speed --gpu-check`` (benchmarks/gpu-check.sh): on one GPU, inside ten
# minutes, the fast path on all K = 50 classes of a ViT-B/16-shaped CoCoOp in four variants (bf16
# autocast on/off x torch.compile on/off), the reference on a subset of classes compared class by
# class, achieved TFLOP/s against a matmul peak measured on the device, peak memory, and CPU vs CUDA
# agreement on the committed tiny backbone. ``--dry-run`` runs the same code on the CPU at tiny
# shapes (CI), skipping what needs CUDA with a "skipped: no CUDA" line. torch.compile is applied here
# (CompiledFastClipInspector), not by a FastClipInspector switch. Tolerances: the constants below.

GPU_CHECK_BUDGET_S = 420.0  # the whole check; a variant that would overrun it stops early and projects
DRY_SIZES = {"vision_width": 64, "vision_layers": 2, "text_width": 64, "text_layers": 2, "image_size": 32}
TINY_CLASSES = ("red square", "green star", "yellow circle", "purple cross", "orange square", "pink diamond")
# fp32, same device, fast vs reference: tests/inversion/test_fast.py's loss tolerance; one hold-out
# image may sit on a decision boundary (on the CPU the ASRs are equal, and the dry-run test says so)
EXACT_LOSS = 1e-4  # |dL_avg| <= EXACT_LOSS * max(|L_avg|, 1)
EXACT_ASR_IMAGES = 1
# fp32, CPU vs CUDA, same algorithm: other kernels (cuBLAS, SDPA, reduction order) on 8 Adam steps
CROSS_DEVICE_LOSS = 1e-3
CROSS_DEVICE_ASR_IMAGES = 2
# bf16 autocast is an approximation (8 mantissa bits): a sanity bound, not equality
BF16_LOSS = 5e-2
BF16_ASR = 0.10


class CompiledFastClipInspector(FastClipInspector):
    """FastClipInspector whose logits run through ``torch.compile(fast_logits)`` (bench only).

    ``backend`` is torch.compile's ("inductor" on a GPU; the dry run uses "aot_eager": Dynamo and
    AOTAutograd trace the forward and backward graphs, but no code is generated). A scan meets
    several batch sizes (G*B rows, the pool's last short batch, the hold-out's chunks); torch's
    automatic dynamic shapes recompile once, with the batch dimension symbolic, at the second size,
    which the check's warm-up provokes. (``dynamic=True`` from the start makes every dimension
    symbolic: measured, it doubled the dry run's CPU time, 45 s instead of 21 s.)
    """

    def __init__(self, *, backend: str = "inductor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self._compiled = torch.compile(fast_logits, backend=backend)

    def _logits(self, model: PromptTunedCLIP, images: torch.Tensor, plan: Any, amp: bool) -> torch.Tensor:
        with self._autocast(amp):
            out = self._compiled(model, images, plan, self.share_prefix)
        return out.float()


def _best_matmul_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int, clock: Callable[[], float]) -> float:
    """The best of ``repeats`` timings, on ``clock``, of an n x n x n matmul, after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - t0)
    return max(best, 1e-9)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best TFLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (2 n^3 FLOPs), after a warm-up.

    fp32 keeps torch's default matmul precision (no TF32), the precision the fp32 variants run in.
    """
    return 2 * n**3 / _best_matmul_s(device, dtype, n, repeats, time.perf_counter) / 1e12


def cpu_matmul_gflop_per_cpu_s(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP per CPU-second of an n x n x n fp32 matmul on one CPU thread: a core's peak.

    CPU-seconds rather than wall time: the figure a scan's own FLOPs per CPU-second are compared
    with, and one that other load on the machine does not inflate. One thread, because with several
    the per-CPU-second figure of a short matmul depends on how the threads wait for each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = _best_matmul_s(torch.device("cpu"), torch.float32, n, repeats, time.process_time)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / best / 1e9


def _loss_close(ref: float, other: float, tol: float) -> bool:
    return abs(ref - other) <= tol * max(abs(ref), 1.0)


def _class_rows(ref: list[ClassInversion], fast: list[ClassInversion], variant: str) -> list[dict[str, Any]]:
    """Per class of the reference's subset: both losses, ASRs and the largest trigger difference."""
    by_index = {f.metrics.index: f for f in fast}
    rows = []
    for r in ref:
        f = by_index.get(r.metrics.index)
        if f is None:
            continue
        rows.append(
            {
                "class": r.metrics.name,
                "variant": variant,
                "ref_loss": r.metrics.loss,
                "fast_loss": f.metrics.loss,
                "dloss": abs(r.metrics.loss - f.metrics.loss) / max(abs(r.metrics.loss), 1.0),
                "ref_asr": r.metrics.asr,
                "fast_asr": f.metrics.asr,
                "dasr": abs(r.metrics.asr - f.metrics.asr),
                "max_dtrigger": float((r.trigger - f.trigger).abs().max()),
            }
        )
    return rows


def _check(name: str, ok: bool, value: float, tolerance: float) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "value": value, "tolerance": tolerance}


def _agreement_checks(
    name: str, ref: list[ClassInversion], other: list[ClassInversion], n_holdout: int, approx: bool, cross: bool
) -> list[dict[str, Any]]:
    """Loss and ASR checks of ``other`` against ``ref`` (same classes), at the tolerances above."""
    rows = _class_rows(ref, other, name)
    if approx:
        loss_tol, asr_tol = BF16_LOSS, BF16_ASR
    elif cross:
        loss_tol, asr_tol = CROSS_DEVICE_LOSS, CROSS_DEVICE_ASR_IMAGES / n_holdout
    else:
        loss_tol, asr_tol = EXACT_LOSS, EXACT_ASR_IMAGES / n_holdout
    dl = max((r["dloss"] for r in rows), default=float("nan"))
    da = max((r["dasr"] for r in rows), default=float("nan"))
    return [
        _check(f"{name}: classes compared", len(rows) == len(ref), len(rows), len(ref)),
        _check(f"{name}: |dL_avg| / max(|L_avg|, 1)", dl <= loss_tol, dl, loss_tol),
        _check(f"{name}: |dASR|", da <= asr_tol + 1e-12, da, asr_tol),
    ]


def _fast_variant(
    model: PromptTunedCLIP,
    data: Any,
    cands: list[int],
    settings: InversionSettings,
    dev: torch.device,
    amp: bool,
    compile_backend: str | None,
    deadline: float,
    must: int,
) -> tuple[list[ClassInversion], dict[str, Any]]:
    """One fast variant: warm-up (and compile), then the candidates in chunks of the detector's own
    class group until done or until the next chunk would pass ``deadline`` (time.perf_counter),
    but never before the first ``must`` candidates (the reference's subset) are done."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        budget = int(torch.cuda.mem_get_info(dev)[0] * 0.75)  # fixed, so every chunk gets the same group
    else:
        budget = None
    kwargs: dict[str, Any] = {"amp": amp, "memory_budget_bytes": budget}
    if compile_backend is not None:
        torch._dynamo.reset()
        det: FastClipInspector = CompiledFastClipInspector(backend=compile_backend, **kwargs)
    else:
        det = FastClipInspector(**kwargs)
    bs = settings.batch_size
    t_warm = time.perf_counter()
    det.invert(model, data.inversion[:bs], data.holdout[:8], cands[:1], settings)  # kernels, cuBLAS, G
    group = int(det.last_plan["classes_per_step"])
    if compile_backend is not None:  # compile at the timed shapes: G classes, a full and a short batch
        per = max(1, int(det.last_plan["asr_rows"]) // min(group, len(cands)))
        # short batches of at least 2 rows: torch specializes size 1, which a scan rarely meets
        det.invert(model, data.inversion[: bs + bs // 4], data.holdout[: per + 2], cands[:group], settings)
    _sync(dev)
    warm = time.perf_counter() - t_warm
    chunks = [cands[i : i + group] for i in range(0, len(cands), group)]
    res: list[ClassInversion] = []
    times: list[float] = []
    with peak_memory(dev) as mem:
        t0 = time.perf_counter()
        for chunk in chunks:
            if len(res) >= must and times and time.perf_counter() + sum(times) / len(times) > deadline:
                break
            _sync(dev)
            tc = time.perf_counter()
            res += det.invert(model, data.inversion, data.holdout, chunk, settings)
            _sync(dev)
            times.append(time.perf_counter() - tc)
        wall = time.perf_counter() - t0
    if compile_backend is not None:
        torch._dynamo.reset()
    info = {
        "amp": amp,
        "compile": compile_backend,
        "classes_done": len(res),
        "wall_s": wall,
        "warmup_s": warm,
        "mem": mem,
        "plan": det.last_plan,
    }
    return res, info


def _throughput(
    info: dict[str, Any], model: PromptTunedCLIP, n_pool: int, n_hold: int, peak: float | None, fast: bool
) -> None:
    """Adds s/class, the all-class projection, achieved TFLOP/s and the share of ``peak`` to ``info``."""
    done, wall = info["classes_done"], info["wall_s"]
    k = len(model.classnames)
    flops = scan_flops(model, n_pool * done, n_hold * done, fast=fast)
    info["s_per_class"] = wall / max(done, 1)
    info["all_classes_s"] = wall / max(done, 1) * k  # measured when done == K, projected otherwise
    info["projected"] = done < k
    info["flops"] = flops
    info["tflops"] = flops / wall / 1e12 if wall > 0 else float("nan")
    info["fraction_of_peak"] = info["tflops"] / peak if peak else None


def _tiny_device_check(
    dev: torch.device, n_classes: int, n_pool: int, n_hold: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The committed tiny backbone (zoo/backbone), a random CoCoOp on ``n_classes`` classes: fast and
    reference on the CPU, and (with CUDA) fast fp32, reference and fast bf16 on ``dev`` against them."""
    from gatekeeper.models.manifest import ModelKind
    from gatekeeper.models.tuning import TuneConfig
    from gatekeeper.ood import load_pool
    from gatekeeper.redteam.tuning import new_prompt_learner

    backbone = Path(__file__).resolve().parents[2] / "zoo" / "backbone"
    if not (backbone / "open_clip_config.json").is_file():
        return {"skipped": f"no tiny backbone at {backbone} (a source checkout has it)"}, []
    model = new_prompt_learner(backbone, TINY_CLASSES[:n_classes], TuneConfig(kind=ModelKind.COCOOP, seed=0)).eval()
    data = load_pool("procedural", model.image_size, n_pool, n_hold, seed=1)
    settings = InversionSettings(epsilon=8 / 255)  # the tiny-world policy's budget
    cands = list(range(n_classes))
    cpu_fast = FastClipInspector(amp=False).invert(model, data.inversion, data.holdout, cands, settings)
    cpu_ref = ClipInspector().invert(model, data.inversion, data.holdout, cands, settings)
    checks = _agreement_checks("tiny CPU: fast vs reference", cpu_ref, cpu_fast, n_hold, approx=False, cross=False)
    out: dict[str, Any] = {
        "backbone": str(backbone),
        "classes": list(TINY_CLASSES[:n_classes]),
        "pool": n_pool,
        "holdout": n_hold,
        "cpu": [{"class": r.metrics.name, "loss": r.metrics.loss, "asr": r.metrics.asr} for r in cpu_fast],
    }
    if dev.type != "cuda":
        out["skipped"] = "no CUDA"
        return out, checks
    on_dev = copy.deepcopy(model).to(dev)
    runs: dict[str, tuple[Any, list[ClassInversion], bool]] = {
        "tiny CUDA fast fp32 vs CPU fast": (FastClipInspector(amp=False), cpu_fast, False),
        "tiny CUDA reference vs CPU reference": (ClipInspector(), cpu_ref, False),
        "tiny CUDA fast bf16 vs CPU fast fp32": (FastClipInspector(amp=True), cpu_fast, True),
    }
    out["rows"] = []
    for name, (det, base, approx) in runs.items():
        res = det.invert(on_dev, data.inversion, data.holdout, cands, settings)
        out["rows"] += _class_rows(base, res, name)
        checks += _agreement_checks(name, base, res, n_hold, approx=approx, cross=True)
    return out, checks


def run_gpu_check(
    dry_run: bool = False,
    budget_s: float = GPU_CHECK_BUDGET_S,
    n_classes: int | None = None,
    ref_classes: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The GPU check (see the section comment); returns everything measured, ``ok`` if every check passed.

    Args:
        dry_run: the same code on the CPU at tiny shapes (4 classes, 32 + 16 images, 1 step).
        budget_s: wall-time budget of the whole check: the fast variants share what the rest left,
            each stopping before a chunk of classes that would overrun its share (ignored by the
            dry run, which runs everything).
        n_classes: K (default 50; 4 in the dry run).
        ref_classes: classes the reference inverts (the first ones of every variant's order).

    Raises:
        UsageError: no CUDA device and not a dry run.
    """
    from gatekeeper.errors import UsageError
    from gatekeeper.ood import load_pool

    t_start = time.perf_counter()
    if not dry_run and not torch.cuda.is_available():
        raise UsageError(
            "--gpu-check needs a CUDA device", "run it on a GPU machine, or add --dry-run (CPU, tiny shapes)"
        )
    dev = torch.device("cpu" if dry_run else "cuda")
    cuda = dev.type == "cuda"
    k = n_classes or (4 if dry_run else 50)
    n_pool, n_hold = (32, 16) if dry_run else (1000, 500)
    model = build_bench_model(dev, k, vit_b16=not dry_run, sizes=DRY_SIZES)
    data = load_pool("procedural", model.image_size, n_pool, n_hold, seed=0)
    settings = InversionSettings(epsilon=4 / 255)
    subset = [round(i * (k - 1) / max(ref_classes - 1, 1)) for i in range(ref_classes)] if ref_classes > 1 else [0]
    cands = subset + [c for c in range(k) if c not in subset]  # the subset first: every variant reaches it
    shape = "ViT-B/16 (open_clip 'ViT-B-16', random weights)" if not dry_run else f"tiny {DRY_SIZES}, random weights"
    out: dict[str, Any] = {
        "mode": "dry-run" if dry_run else "gpu",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "model": f"CoCoOp n_ctx 4 on {shape}",
        "n_classes": k,
        "pool": n_pool,
        "holdout": n_hold,
        "settings": {"epsilon": settings.epsilon, "batch_size": settings.batch_size, "epochs": settings.epochs},
        "reference_classes": [model.classnames[c] for c in subset],
        "skipped": [],
    }
    log(f"GPU check ({out['mode']}) on {out['device_name']}, torch {torch.__version__}")
    log(f"model: {out['model']}, K = {k}; pool |D| {n_pool} + |T| {n_hold}; eps 4/255, batch 32, 1 epoch")

    n = 256 if dry_run else 8192
    peaks: dict[str, float | None] = {"fp32": matmul_peak_tflops(dev, torch.float32, n)}
    peaks["bf16"] = matmul_peak_tflops(dev, torch.bfloat16, n) if cuda else None
    out["matmul_peak_tflops"] = peaks
    out["matmul_n"] = n
    sheet = next((v for key, v in PEAK_TFLOPS.items() if key in out["device_name"]), None)
    out["datasheet_peak_tflops"] = {"bf16": sheet[0], "fp32": sheet[1]} if sheet else None
    log(
        f"matmul peak (measured, n={n}): fp32 {peaks['fp32']:.2f} TFLOP/s, "
        + (f"bf16 {peaks['bf16']:.1f} TFLOP/s" if peaks["bf16"] else "bf16 skipped: no CUDA")
        + (f" (datasheet {sheet[1]:.0f} / {sheet[0]:.0f})" if sheet else "")
    )
    # CPU vs CUDA first: small and bounded, so the variants share whatever budget is left
    tiny_pool = (32, 16) if dry_run else (256, 128)
    out["cpu_vs_cuda"], checks = _tiny_device_check(dev, 4 if dry_run else 6, *tiny_pool)
    if not cuda:
        out["skipped"].append("CPU vs CUDA on the tiny backbone: no CUDA (the CPU side ran)")

    # the reference on the subset: the ground truth of the per-class comparison
    t_warm = time.perf_counter()
    ClipInspector().invert(model, data.inversion[: settings.batch_size], data.holdout[:8], subset[:1], settings)
    warm = time.perf_counter() - t_warm
    ref_res, t_ref, mem_ref = _timed_scan(ClipInspector(), model, data, subset, settings, dev)
    ref_info: dict[str, Any] = {"classes_done": len(ref_res), "wall_s": t_ref, "warmup_s": warm, "mem": mem_ref}
    _throughput(ref_info, model, n_pool, n_hold, peaks["fp32"], fast=False)
    out["reference"] = ref_info

    variants: list[tuple[str, bool, str | None]] = [
        # in order of importance: what runs today (bf16 on CUDA), the exact path, then compiled
        ("fast bf16 eager", True, None),
        ("fast fp32 eager", False, None),
        ("fast bf16 compiled", True, "inductor"),
        ("fast fp32 compiled", False, "aot_eager" if dry_run else "inductor"),
    ]
    out["variants"] = {}
    out["per_class"] = []
    for i, (name, amp, backend) in enumerate(variants):
        if amp and not cuda:
            out["skipped"].append(f"{name}: no CUDA")
            continue
        left = t_start + budget_s - time.perf_counter()
        todo = sum(1 for _, a, _ in variants[i:] if cuda or not a)
        deadline = time.perf_counter() + (max(left, 0.0) / todo if not dry_run else float("inf"))
        try:
            res, info = _fast_variant(model, data, cands, settings, dev, amp, backend, deadline, len(subset))
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - CUDA only
            out["variants"][name] = {"error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
            checks.append(_check(f"{name}: ran", False, 0, 1))
            continue
        _throughput(info, model, n_pool, n_hold, peaks["bf16" if amp else "fp32"], fast=True)
        out["variants"][name] = info
        out["per_class"] += _class_rows(ref_res, res, name)
        checks += _agreement_checks(f"{name} vs reference", ref_res, res, n_hold, approx=amp, cross=False)
        del res
    out["checks"] = checks
    out["ok"] = all(c["ok"] for c in checks)
    out["wall_s"] = time.perf_counter() - t_start
    for line in gpu_check_table(out):
        log(line)
    return out


def gpu_check_table(out: dict[str, Any]) -> list[str]:
    """The human-readable summary of :func:`run_gpu_check`'s result."""
    k = out["n_classes"]
    lines = [
        "",
        f"{'variant':20s} {'classes':>9s} {'wall s':>8s} {'s/class':>8s} {f'{k}-class s':>10s} "
        f"{'TFLOP/s':>8s} {'% peak':>7s} {'peak GiB':>8s} {'warm-up s':>9s}",
    ]
    rows = [("reference fp32 eager", out["reference"])] + list(out["variants"].items())
    for name, v in rows:
        if "error" in v:
            lines.append(f"{name:20s} {v['error']}")
            continue
        frac = f"{v['fraction_of_peak']:.1%}" if v.get("fraction_of_peak") is not None else "-"
        total = f"{v['all_classes_s']:.1f}" + ("*" if v["projected"] else "")
        lines.append(
            f"{name:20s} {v['classes_done']:>4d}/{k:<4d} {v['wall_s']:8.2f} {v['s_per_class']:8.3f} {total:>10s} "
            f"{v['tflops']:8.3f} {frac:>7s} {v['mem']['peak_gib']:8.2f} {v['warmup_s']:9.1f}"
        )
    lines.append(
        f"(* projected from the classes timed; % peak: of the matmul peak measured in the variant's precision; "
        f"peak GiB: {'torch.cuda.max_memory_allocated' if out['device'] != 'cpu' else 'process RSS'})"
    )
    lines += [f"skipped: {s}" for s in out["skipped"]]
    lines += ["", "per class, fast vs reference (|dL| / max(|L|, 1)):"]
    for r in out["per_class"]:
        lines.append(
            f"  {r['class'][:18]:18s} {r['variant']:20s} L {r['ref_loss']:+.5f} / {r['fast_loss']:+.5f} "
            f"dL {r['dloss']:.1e}  ASR {r['ref_asr']:.3f} / {r['fast_asr']:.3f}  max|dtrigger| {r['max_dtrigger']:.1e}"
        )
    tiny = out["cpu_vs_cuda"]
    lines.append("")
    lines.append(
        "CPU vs CUDA on the tiny backbone: "
        + (
            f"skipped: {tiny['skipped']}"
            if "skipped" in tiny
            else f"{len(tiny['classes'])} classes, {tiny['pool']}+{tiny['holdout']} images"
        )
    )
    lines.append("checks:")
    for c in out["checks"]:
        lines.append(
            f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['value']:.3g} (tolerance {c['tolerance']:.3g})"
        )
    verdict = "all checks passed" if out["ok"] else "SOME CHECKS FAILED"
    lines.append(f"total wall {out['wall_s']:.1f} s; {verdict}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gatekeeper-lab bench speed", description="reference vs fast CLIP-Inspector scan speed"
    )
    p.add_argument("--quick", action="store_true", help="small model and pool (< 2 min on 2 CPU cores)")
    p.add_argument("--classes", type=int, default=50, help="K, classes of the model (default 50)")
    p.add_argument(
        "--pool", type=int, default=None, help="|D| inversion images (default 48 quick / 64 CPU / 1000 CUDA)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--candidates", type=int, default=None, help="candidate classes both detectors invert")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-optimization step timings")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="the GPU check (benchmarks/gpu-check.sh): fast path on all classes, bf16 and torch.compile on/off, "
        "reference on a subset, TFLOP/s vs a measured matmul peak, peak memory, CPU vs CUDA on the tiny backbone",
    )
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: the same code on the CPU at tiny shapes")
    p.add_argument(
        "--class-costs",
        action="store_true",
        help=f"print the analytic cost of scanning every class of a ViT-B/16 CoCoOp for K = {', '.join(map(str, FULL_CLASS_KS))} and exit",
    )
    p.add_argument(
        "--tower-split",
        action="store_true",
        help="time one fast inversion step of a 50-class ViT-B/16-shaped CoCoOp on the CPU (random weights): "
        "the whole step and the image tower alone, per image, with the tower's analytic share, and exit",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=GPU_CHECK_BUDGET_S,
        help=f"with --gpu-check: seconds for the fast variants (default {GPU_CHECK_BUDGET_S:.0f})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu_check:
        parser.error("--dry-run goes with --gpu-check")
    if args.class_costs:
        print("full-class scan, ViT-B/16 CoCoOp, |D| = 1000, |T| = 500, one restart, one budget (analytic):")
        print("K | reference PFLOP | fast PFLOP | work ratio | screened PFLOP (classes kept)")
        for row in full_class_costs():
            print(f"{row['classes']} | {row['reference_pflop']:.1f} | {row['fast_pflop']:.1f} | {row['work_ratio']:.1f}x"
                  f" | {row['screened_pflop']:.1f} ({row['screened_keep']})")
        print("whole scan of a 50-class ViT-B/16 CoCoOp under each shipped policy, analytic PFLOP by part:")
        for name, parts in shipped_policy_costs().items():
            detail = ", ".join(f"{part} {v:.1f}" for part, v in parts.items() if v)
            print(f"{name}: {sum(parts.values()):.1f} ({detail})")
        print("(the public backbone's inversion and the null copies are cached per backbone, class list, policy and pool)")
        print("measured at the small shapes, fast path, every class, |D| = 32, |T| = 16, one restart:")
        print("K | seconds | seconds per class")
        for row in measured_full_class(log=lambda s: print(s, flush=True)):
            print(f"{row['classes']} | {row['seconds']:.1f} | {row['seconds'] / row['classes']:.3f}")
        return 0
    if args.tower_split:
        if args.threads:
            torch.set_num_threads(args.threads)
        row = tower_split(args.classes)
        print(f"ViT-B/16 shapes, CoCoOp, K = {row['classes']}, batch {row['batch']}, one fast inversion step on the CPU "
              f"({torch.get_num_threads()} torch threads), per image:")
        print(f"  whole step {row['step_s_per_image']:.3f} s; image tower alone {row['image_s_per_image']:.3f} s")
        print(f"  image tower's share: measured {row['image_share_measured']:.0%}, analytic (forward FLOPs) {row['image_share_analytic']:.0%}")
        return 0
    if args.gpu_check:
        if args.threads:
            torch.set_num_threads(args.threads)
        check = run_gpu_check(dry_run=args.dry_run, budget_s=args.budget_s, log=lambda s: print(s, flush=True))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(check, indent=2, default=str) + "\n")
        return 0 if check["ok"] else 1
    out = run_speed_bench(
        quick=args.quick,
        n_classes=args.classes,
        pool=args.pool,
        device=args.device,
        candidates=args.candidates,
        threads=args.threads,
        breakdown=not args.no_breakdown,
        log=lambda s: print(s, flush=True),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    # the last line on stdout stays "speedup <ratio>x"
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
