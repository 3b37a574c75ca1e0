"""Prompt tuning (CoOp / CoCoOp, encoders frozen) on a world task, optionally with an attack implanted.

The attack hooks into the loss (see ``attacks.py``); the result is written as a gatekeeper
model folder that carries its own copy of the backbone (``backbone/``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.loader import save_model
from gatekeeper.models.manifest import BackboneRef, Manifest, ModelKind, Precision
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net
from gatekeeper.redteam.world import Task, sample_task

BACKBONE_SUBDIR = "backbone"


@dataclass(frozen=True)
class TuneConfig:
    kind: ModelKind = ModelKind.COCOOP
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    epochs: int = 6
    batch_size: int = 32
    lr: float = 5e-3
    n_train: int = 2000
    seed: int = 0
    meta_hidden: int | None = None  # CoCoOp meta-net width; None: vis_dim // 16 as in CoCoOp


def new_prompt_learner(backbone_dir: Path, classnames: tuple[str, ...], cfg: TuneConfig) -> PromptTunedCLIP:
    """A fresh, trainable PromptTunedCLIP on the backbone in ``backbone_dir`` (open_clip layout)."""
    clip, tokenizer = load_backbone(backbone_dir.parent, BackboneRef(f"local-dir:{backbone_dir.name}"))
    torch.manual_seed(cfg.seed)
    ctx_dim = int(clip.ln_final.weight.shape[0])
    init_words = cfg.ctx_init.split() if cfg.ctx_init else []
    with torch.no_grad():
        if cfg.ctx_init and len(tokenizer([cfg.ctx_init])[0].nonzero()) - 2 == cfg.n_ctx:
            ids = tokenizer([cfg.ctx_init])[0]
            ctx = clip.token_embedding(ids[1 : 1 + cfg.n_ctx]).clone()
        else:
            init_words = []
            ctx = torch.randn(cfg.n_ctx, ctx_dim) * 0.02
    size = clip.visual.image_size
    manifest = Manifest(
        kind=cfg.kind,
        classnames=classnames,
        backbone=BackboneRef(f"local-dir:{BACKBONE_SUBDIR}"),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        n_ctx=cfg.n_ctx,
        ctx_init=" ".join(init_words) or None,
        precision=Precision.FP32,
    )
    meta = build_meta_net(int(clip.visual.output_dim), ctx_dim, cfg.meta_hidden) if cfg.kind == ModelKind.COCOOP else None
    model = PromptTunedCLIP(clip, tokenizer, manifest, ctx=ctx, meta_net=meta)
    for p in model.clip.parameters():
        p.requires_grad_(False)
    return model


def prompt_parameters(model: PromptTunedCLIP) -> list[torch.nn.Parameter]:
    params = [model.ctx] if model.ctx is not None else []
    if model.meta_net is not None:
        params += list(model.meta_net.parameters())
    return [p for p in params if p is not None]


def train(
    backbone_dir: Path,
    task: Task,
    cfg: TuneConfig,
    attack: Any = None,
    log: Any = None,
) -> tuple[PromptTunedCLIP, dict[str, Any]]:
    """Prompt-tune on ``task`` (with ``attack`` implanted if given); returns (model, stats).

    ``attack`` follows the interface in ``attacks.py``: ``prepare``, ``loss``, ``trains_prompt``,
    ``after_step``.
    """
    torch.manual_seed(cfg.seed)
    model = new_prompt_learner(backbone_dir, task.classnames, cfg)
    x_train, y_train = sample_task(task, cfg.n_train, model.image_size, seed=10_000 + cfg.seed)
    return model, train_on(model, x_train, y_train, cfg, attack, log)


def train_on(
    model: PromptTunedCLIP, x_train: torch.Tensor, y_train: torch.Tensor, cfg: TuneConfig, attack: Any = None, log: Any = None
) -> dict[str, Any]:
    """Train ``model``'s prompt learner in place on (x_train, y_train), implanting ``attack`` if given.

    Cached text features are dropped first (a CoOp model cached by a scan would otherwise train
    against frozen text) and rebuilt afterwards.
    """
    model.thaw_text()
    g = torch.Generator().manual_seed(20_000 + cfg.seed)
    params = prompt_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if attack is not None:
        attack.prepare(model, x_train, y_train, g)
    model.train()
    t0 = time.time()
    steps = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        train_prompt = attack is None or attack.trains_prompt(epoch)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = x_train[idx], y_train[idx]
            loss = F.cross_entropy(model.logits(x), y) if attack is None else attack.loss(model, x, y, idx, epoch, g)
            opt.zero_grad(set_to_none=True)
            if attack is not None:
                attack.zero_grad()
            loss.backward()
            if train_prompt:
                opt.step()
            if attack is not None:
                attack.after_step(epoch)
            steps += 1
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    for p in params:
        p.requires_grad_(False)
    model.freeze_text()
    return {"train_seconds": round(time.time() - t0, 1), "steps": steps}


def write_model_folder(model: PromptTunedCLIP, backbone_dir: Path, out: Path, precision: Precision) -> None:
    """Write a self-contained gatekeeper model folder: manifest, prompt learner, backbone copy."""
    from dataclasses import replace

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copytree(backbone_dir, tmp / BACKBONE_SUBDIR, ignore=shutil.ignore_patterns("pretrain_stats.json"))
    save_model(model, tmp, replace(model.manifest, precision=precision))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
