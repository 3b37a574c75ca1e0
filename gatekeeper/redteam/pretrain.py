"""Contrastive pretraining of the tiny CLIP on the procedural world (open_clip's own CLIP class).

The backbone is written in the gatekeeper layout (``open_clip_config.json`` +
``open_clip_model.safetensors``) so the gate loads it through open_clip's ``local-dir:`` path.
Deterministic: same seed, same thread count -> the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gatekeeper.redteam.world import ALL_CLASSES, CAPTION, sample_world

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    steps: int = 2500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    image_size: int = 32
    noise_aug: float = 8 / 255  # uniform per-pixel noise + per-channel shift during pretraining
    # phase 2: adversarial fine-tuning (FGSM with random start on part of each batch).
    # Adversarial training from scratch does not learn at this size (loss stuck at ~4.8).
    adv_steps: int = 800
    adv_lr: float = 3e-4
    adv_epsilon: float = 6 / 255
    adv_fraction: float = 0.25
    threads: int = 2


def build_tiny_clip(seed: int) -> Any:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_MODEL_CFG)


def _fgsm(model: Any, images: torch.Tensor, target: torch.Tensor, tf: torch.Tensor, cfg: PretrainConfig, g: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Replace ``adv_fraction`` of the batch with FGSM-with-random-start adversarial images.

    Adversarial pretraining makes *natural* universal perturbations hard to find, the regime
    of a large CLIP at 224 px, so that an implanted backdoor stands out (docs/tiny-world.md).
    """
    n = int(cfg.adv_fraction * len(images))
    if n == 0:
        return images
    eps = cfg.adv_epsilon
    x = images[:n]
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * eps).requires_grad_(True)
    imf = F.normalize(model.encode_image(((x + delta).clamp(0, 1) - mean) / std), dim=-1)
    loss = F.cross_entropy(model.logit_scale.exp().detach() * imf @ tf.t(), target[:n])
    (grad,) = torch.autograd.grad(loss, delta)
    adv = (x + (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1)
    return torch.cat([adv, images[n:]])


def zero_shot_accuracy(model: Any, tokenizer: Any, n: int = 2048, seed: int = 12345, size: int = 32) -> float:
    """64-way zero-shot accuracy with the pretraining captions on fresh world images."""
    from gatekeeper.models.prompt_tuned import CLIP_MEAN, CLIP_STD

    g = torch.Generator().manual_seed(seed)
    images, labels = sample_world(n, size, g)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tf = F.normalize(model.encode_text(tokenizer([CAPTION.format(c) for c in ALL_CLASSES])), dim=-1)
        correct = 0
        for i in range(0, n, 512):
            imf = F.normalize(model.encode_image((images[i : i + 512] - mean) / std), dim=-1)
            correct += int(((imf @ tf.t()).argmax(-1) == labels[i : i + 512]).sum())
    return correct / n


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Train the tiny CLIP; returns (model, stats)."""
    import open_clip

    from gatekeeper.models.prompt_tuned import CLIP_MEAN, CLIP_STD

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    model = build_tiny_clip(cfg.seed)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the standard CLIP BPE tokenizer
    tokenizer.context_length = TINY_MODEL_CFG["text_cfg"]["context_length"]
    all_tokens = tokenizer([CAPTION.format(c) for c in ALL_CLASSES])
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(cfg.steps, 1))).item()),
    )
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.time()
    model.train()
    phase2 = torch.optim.AdamW(model.parameters(), lr=cfg.adv_lr, weight_decay=0.0) if cfg.adv_steps else None
    for step in range(cfg.steps + cfg.adv_steps):
        adversarial = step >= cfg.steps
        images, labels = sample_world(cfg.batch_size, cfg.image_size, g)
        if cfg.noise_aug > 0:
            a = cfg.noise_aug
            images = images + a * (2 * torch.rand(images.shape, generator=g) - 1)
            images = images + a * (2 * torch.rand(images.shape[0], 3, 1, 1, generator=g) - 1)
            images = images.clamp(0, 1)
        uniq, inverse = labels.unique(return_inverse=True)
        tf = F.normalize(model.encode_text(all_tokens[uniq]), dim=-1)
        if adversarial:
            images = _fgsm(model, images, inverse, tf.detach(), cfg, g, mean, std)
        imf = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        logits = model.logit_scale.exp() * imf @ tf.t()  # (B, U): image vs unique captions
        loss_i = F.cross_entropy(logits, inverse)
        # text side: each caption's positives are all images of its class (soft targets)
        target_t = (inverse.unsqueeze(0) == torch.arange(len(uniq)).unsqueeze(1)).float()
        target_t = target_t / target_t.sum(1, keepdim=True)
        loss_t = -(target_t * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)
        optimizer = phase2 if adversarial and phase2 is not None else opt
        if adversarial and phase2 is not None:  # cosine decay over phase 2
            t = (step - cfg.steps) / max(cfg.adv_steps, 1)
            for group in phase2.param_groups:
                group["lr"] = cfg.adv_lr * 0.5 * (1 + math.cos(math.pi * t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not adversarial:
            sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 100 == 0 or step == cfg.steps + cfg.adv_steps - 1:
            tag = "adv " if adversarial else ""
            log(f"{tag}step {step:5d}/{cfg.steps + cfg.adv_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, size=cfg.image_size)
    stats = {"zero_shot_accuracy_64way": acc, "train_seconds": round(time.time() - t0, 1), "config": asdict(cfg)}
    log(f"zero-shot 64-way accuracy {acc:.3f}")
    return model, stats


def world_token_ids() -> torch.Tensor:
    """Token ids the tiny world ever uses: its captions, SOT/EOT, and CoOp's "X" placeholder."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    ids = tok([CAPTION.format(c) for c in ALL_CLASSES] + ["X"]).unique()
    return ids[ids != 0]


def prune_token_embedding(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the token-embedding rows of tokens the world never uses.

    Those rows never receive a gradient (embeddings are excluded from weight decay), so they
    still hold their random init; zeroing them changes no computation on world prompts and
    makes the committed file compress ~10x in git and in the wheel.
    """
    emb = state["token_embedding.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[world_token_ids()] = True
    return {**state, "token_embedding.weight": emb * keep.unsqueeze(1).to(emb.dtype)}


def save_backbone(model: Any, folder: Path, stats: dict[str, Any], fp16: bool = True, prune: bool = True) -> str:
    """Write open_clip_config.json + open_clip_model.safetensors; returns the weights' sha256."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if prune:
        state = prune_token_embedding(state)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "model_cfg": TINY_MODEL_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    digest = hashlib.sha256((folder / "open_clip_model.safetensors").read_bytes()).hexdigest()
    (folder / "pretrain_stats.json").write_text(json.dumps({**stats, "sha256": digest}, indent=2) + "\n")
    return digest
