"""Prompt tuning (CoOp / CoCoOp, encoders frozen) on a world task, optionally with an attack implanted.

The attack hooks into the loss (see ``attacks.py``); the result is written as a gatekeeper
model folder that carries its own copy of the backbone (``backbone/``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from gatekeeper.models.backbone import load_backbone
from gatekeeper.models.loader import save_model
from gatekeeper.models.manifest import BackboneRef, Manifest, ModelKind, Precision
from gatekeeper.models.prompt_tuned import PromptTunedCLIP, build_meta_net
from gatekeeper.models.tuning import TuneConfig, prompt_parameters, train_on
from gatekeeper.redteam.world import Task, sample_task

__all__ = ["BACKBONE_SUBDIR", "TuneConfig", "new_prompt_learner", "prompt_parameters", "train", "train_on", "write_model_folder"]

BACKBONE_SUBDIR = "backbone"


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




def write_model_folder(model: PromptTunedCLIP, backbone_dir: Path, out: Path, precision: Precision) -> None:
    """Write a self-contained gatekeeper model folder: manifest, prompt learner, backbone copy."""
    from dataclasses import replace

    from gatekeeper._io import atomic_folder

    with atomic_folder(out) as tmp:
        shutil.copytree(backbone_dir, tmp / BACKBONE_SUBDIR, ignore=shutil.ignore_patterns("pretrain_stats.json"))
        save_model(model, tmp, replace(model.manifest, precision=precision))
