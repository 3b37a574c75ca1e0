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

from gatekeeper.decide import anomaly_scores
from gatekeeper.inversion.base import ClassInversion, InversionSettings
from gatekeeper.inversion.clip_inspector import ClipInspector, apply_trigger, margin_loss
from gatekeeper.inversion.fast import FastClipInspector, fast_logits, row_bytes, text_plan
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
    with peak_memory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        res = detector.invert(model, pool.inversion, pool.holdout, cands, settings)
        _sync(device)
        wall = time.perf_counter() - t0
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
    per_image = float(img + txt)
    return per_image * (2 * n_steps_images + n_asr_images)


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
    log(f"fast      : {t_fast:8.2f} s  plan {fast_det.last_plan}")
    ref_res, t_ref, mem_ref = _timed_scan(ClipInspector(), model, data, cands, settings, dev)
    log(f"reference : {t_ref:8.2f} s")
    work = n_pool * len(cands)
    out.update(
        {
            "reference_s": t_ref,
            "fast_s": t_fast,
            "reference_img_cls_per_s": work / t_ref,
            "fast_img_cls_per_s": work / t_fast,
            "reference_mem": mem_ref,
            "fast_mem": mem_fast,
            "fast_plan": fast_det.last_plan,
            "estimated_row_bytes": {
                "fast": row_bytes(model, plan, True, train=True, amp=False),
                "reference": row_bytes(model, None, False, train=True, amp=False),
            },
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
