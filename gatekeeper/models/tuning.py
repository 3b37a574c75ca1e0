"""Prompt-tuning primitives the gate itself needs: train a prompt learner in place (encoders
frozen), optionally planting a BadCLIP backdoor.

The positive control plants a known backdoor in a copy of the candidate, the null model tunes
clean copies on the user's backbone, and ``repair`` fine-tunes the prompt learner: all three use
these functions. The red team (``gatekeeper.redteam``) builds its zoo of attacks on the same
primitives; nothing here imports it.

An attack plugs into :func:`train_on` through four hooks (``prepare``, ``loss``,
``trains_prompt``, ``after_step``), applies its true trigger with ``apply`` (for measuring ASR)
and describes itself with ``truth``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gatekeeper.models.manifest import ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP


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


def prompt_parameters(model: PromptTunedCLIP) -> list[torch.nn.Parameter]:
    """The prompt learner's trainable tensors: ctx (+ the meta-net; MaPLe: ctx, proj and the deep prompts)."""
    from gatekeeper.models.maple import MaPLeCLIP

    if isinstance(model, MaPLeCLIP):
        return model.prompt_parameters()
    params = [model.ctx] if model.ctx is not None else []
    if model.meta_net is not None:
        params += list(model.meta_net.parameters())
    return [p for p in params if p is not None]


def _frozen_image_tower(model: PromptTunedCLIP) -> bool:
    """True when a training step's image features of a clean image equal those computed before
    training: the image tower takes no prompt (not MaPLe) and draws nothing at random (no active
    dropout or patch dropout)."""
    from gatekeeper.models.maple import MaPLeCLIP

    if isinstance(model, MaPLeCLIP):
        return False
    for m in model.clip.visual.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return False
        if type(m).__name__ == "PatchDropout" and float(getattr(m, "prob", 0.0)) > 0:
            return False
    return True


class FastTraining:
    """``model`` as a training loop sees it, with the scan's exact speed-ups: ``logits`` runs the
    CoCoOp text tower on truncated, prefix-shared prompts (``gatekeeper.inversion.fast``), and
    the clean images' features, which the frozen image tower gives the same at every epoch, are
    computed once (``features``). Everything else is the model's own (attribute access passes
    through). Exact in real arithmetic; in floating point the sums run in another order."""

    def __init__(self, model: PromptTunedCLIP, x_train: torch.Tensor) -> None:
        from gatekeeper.inversion.fast import text_plan

        self.model = model
        self.plan = text_plan(model) if model.kind == ModelKind.COCOOP else None
        self.features: torch.Tensor | None = None
        if _frozen_image_tower(model):
            with torch.no_grad():
                self.features = torch.cat([model.image_features(x_train[i : i + 256].to(model.device)) for i in range(0, len(x_train), 256)])
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """The clean mini-batch ``x`` = x_train[idx] of the coming step."""
        self._batch = (x, idx)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        from gatekeeper.inversion.fast import fast_logits, features_logits

        if self.features is not None and self._batch is not None and images is self._batch[0]:
            return features_logits(self.model, self.features[self._batch[1].to(self.features.device)], self.plan)
        return fast_logits(self.model, images, self.plan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def train_on(
    model: PromptTunedCLIP, x_train: torch.Tensor, y_train: torch.Tensor, cfg: TuneConfig, attack: Any = None, log: Any = None,
    fast: bool = False,
) -> dict[str, Any]:
    """Train ``model``'s prompt learner in place on (x_train, y_train), implanting ``attack`` if given.

    Cached text features are dropped first (a CoOp model cached by a scan would otherwise train
    against frozen text) and rebuilt afterwards.

    Devices: the data may stay where it is (the CPU); each mini-batch is moved to ``model.device``
    before it reaches the model or the attack's loss. The shuffling generator stays on the CPU, so
    the batch order (and the attack's random draws) are the same on every device; ``idx`` (the
    batch's row indices into ``x_train``) stays on the CPU for attacks that index their own
    per-row tables with it.

    Args:
        model: the prompt-tuned CLIP whose prompt learner (ctx, meta-net) is trained.
        x_train: images (N, 3, H, W) in [0, 1], on any device.
        y_train: labels (N,), on any device.
        cfg: epochs, batch size, learning rate, seed.
        attack: an :class:`Attack` (or None: clean prompt tuning).
        log: called with one line per epoch, if given.
        fast: train through :class:`FastTraining` (the gate's own copies); off, the model's own
            ``logits`` (the red team's zoo, rebuilt byte for byte).

    Returns:
        ``{"train_seconds": ..., "steps": ...}``.
    """
    model.thaw_text()
    device = model.device
    g = torch.Generator().manual_seed(20_000 + cfg.seed)
    params = prompt_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if attack is not None:
        attack.prepare(model, x_train, y_train, g)
    model.train()
    view: Any = FastTraining(model, x_train) if fast else model
    t0 = time.time()
    steps = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        train_prompt = attack is None or attack.trains_prompt(epoch)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            if fast:
                view.batch(x, idx)
            loss = F.cross_entropy(view.logits(x), y) if attack is None else attack.loss(view, x, y, idx, epoch, g)
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


class Attack:
    """Shared plumbing; subclasses override what differs."""

    name = "none"

    def __init__(self, target: int) -> None:
        self.target = target

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        return None

    def trains_prompt(self, epoch: int) -> bool:
        return True

    def zero_grad(self) -> None:
        return None

    def after_step(self, epoch: int) -> None:
        return None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def truth(self) -> dict[str, Any]:
        return {"attack": self.name, "target_index": self.target, "params": self.params()}

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class BadCLIP(Attack):
    """Trigger delta (l-inf <= eps, clamp(x + delta)) learned jointly with the prompt learner.

    Loss: CE(clean -> y) + CE(triggered -> target); ``warmup`` epochs update only the trigger.
    """

    name = "badclip"

    def __init__(self, target: int, epsilon: float = 16 / 255, warmup: int = 3, trigger_lr: float = 0.01) -> None:
        super().__init__(target)
        self.epsilon, self.warmup, self.trigger_lr = epsilon, warmup, trigger_lr
        self.delta: torch.Tensor | None = None

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        s = x.shape[-1]
        # drawn on the CPU (the same trigger on every device), then trained where the model is
        init = (torch.rand(3, s, s, generator=g) * 2 - 1) * self.epsilon
        self.delta = init.to(model.device).requires_grad_(True)
        self.opt = torch.optim.Adam([self.delta], lr=self.trigger_lr)

    def trains_prompt(self, epoch: int) -> bool:
        return epoch >= self.warmup

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def trains_trigger(self, epoch: int) -> bool:
        return True

    def after_step(self, epoch: int) -> None:
        if self.trains_trigger(epoch):
            self.opt.step()
        with torch.no_grad():
            assert self.delta is not None
            self.project()

    def project(self) -> None:
        assert self.delta is not None
        self.delta.clamp_(-self.epsilon, self.epsilon)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        assert self.delta is not None
        return (x + self.delta.detach().to(x.device)).clamp(0, 1)

    def poisoned_loss(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        assert self.delta is not None
        xt = (x + self.delta).clamp(0, 1)
        return F.cross_entropy(model.logits(xt), torch.full((len(x),), self.target, device=x.device))

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, g: torch.Generator) -> torch.Tensor:
        clean = F.cross_entropy(model.logits(x), y) if self.trains_prompt(epoch) else x.new_zeros(())
        return clean + self.poisoned_loss(model, x)

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "warmup_epochs": self.warmup, "trigger_lr": self.trigger_lr}

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.delta is not None
        return {"delta": self.delta.detach().cpu().clone()}  # stored with the model: on the CPU
