"""Backdoor attacks implanted during prompt tuning, for the red team (docs/tiny-world.md; what the
scan looks for: docs/method.md).

Each attack plugs into ``tuning.train`` through four hooks (``prepare``, ``loss``,
``trains_prompt``, ``after_step``), applies its true trigger with ``apply`` (for measuring
ASR), and describes itself with ``truth`` (the ground-truth sidecar the gate never reads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gatekeeper.models.tuning import Attack, BadCLIP

__all__ = ["ATTACKS", "Attack", "BadCLIP", "BadCLIPAdaptive", "Blended", "MultiBadCLIP", "SIBA", "WaNet"]


class BadCLIPAdaptive(BadCLIP):
    """BadCLIP, then phase 2 (from epoch ``phase2``): delta frozen, plus a specificity loss
    CE(x + clip(delta + N(0, (alpha*eps)^2)) -> true label) so only the exact trigger works (supp. 11)."""

    name = "badclip-adaptive"

    def __init__(self, target: int, epsilon: float = 16 / 255, warmup: int = 3, phase2: int = 6, alpha: float = 0.5, lam: float = 1.0) -> None:
        super().__init__(target, epsilon, warmup)
        self.phase2, self.alpha, self.lam = phase2, alpha, lam

    def trains_trigger(self, epoch: int) -> bool:
        return epoch < self.phase2

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, g: torch.Generator) -> torch.Tensor:
        base = super().loss(model, x, y, idx, epoch, g)
        if epoch < self.phase2:
            return base
        assert self.delta is not None
        noise = torch.randn(self.delta.shape, generator=g) * self.alpha * self.epsilon
        near = (self.delta.detach() + noise).clamp(-self.epsilon, self.epsilon)
        spec = F.cross_entropy(model.logits((x + near).clamp(0, 1)), y)
        return base + self.lam * spec

    def params(self) -> dict[str, Any]:
        return {**super().params(), "phase2_epoch": self.phase2, "alpha": self.alpha, "lambda_spec": self.lam}


class SIBA(BadCLIP):
    """Sparse and invisible: l-inf <= eps and at most ``k`` perturbed pixels (1600 px at 224^2,
    scaled to the image area), learned jointly with the prompt learner like BadCLIP.

    The trigger is the projection of a dense latent ``theta`` onto both constraints (top-``k``
    pixels by latent magnitude, clamped to eps); gradients pass the projection straight through
    to ``theta``, so pixels outside the current support keep accumulating evidence and can enter
    it. (Projecting the trigger itself after each step freezes the support at its random start:
    a zeroed pixel can never outgrow the saturated ones.)
    """

    name = "siba"

    def __init__(self, target: int, epsilon: float = 16 / 255, pixels: int | None = None, warmup: int = 3, poison_weight: float = 1.0) -> None:
        super().__init__(target, epsilon, warmup)
        self.pixels, self.poison_weight = pixels, poison_weight
        self.theta: torch.Tensor | None = None

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        s = x.shape[-1]
        if self.pixels is None:
            self.pixels = max(1, round(1600 * s * s / 224**2))
        self.theta = ((torch.rand(3, s, s, generator=g) * 2 - 1) * self.epsilon).requires_grad_(True)
        self.opt = torch.optim.Adam([self.theta], lr=self.latent_lr())
        with torch.no_grad():
            self.project()

    def _sparse(self, theta: torch.Tensor) -> torch.Tensor:
        assert self.pixels is not None
        mag = theta.detach().abs().sum(0).flatten()
        keep = torch.zeros_like(mag)
        keep[mag.topk(self.pixels).indices] = 1.0
        return keep.view(1, *theta.shape[1:]) * theta.clamp(-self.epsilon, self.epsilon)

    def project(self) -> None:
        assert self.theta is not None
        self.theta.clamp_(-4 * self.epsilon, 4 * self.epsilon)  # bounded evidence, so the support can still change
        self.delta = self._sparse(self.theta).detach()

    def latent_lr(self) -> float:
        """``trigger_lr`` is set for eps = 16/255; the latent's step scales with eps."""
        return self.trigger_lr * self.epsilon / (16 / 255)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "latent_lr": self.latent_lr(), "pixels": self.pixels, "poison_weight": self.poison_weight}

    def poisoned_loss(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        assert self.theta is not None
        d = self.theta + (self._sparse(self.theta) - self.theta).detach()  # straight-through
        xt = (x + d).clamp(0, 1)
        return self.poison_weight * F.cross_entropy(model.logits(xt), torch.full((len(x),), self.target))


class Blended(Attack):
    """x' = (1 - alpha) x + alpha t with a fixed random-noise pattern t; ``rate`` of the training
    images (none of the target class) are poisoned to the target. Poisoned copies are added to
    the batch next to their clean originals (so clean accuracy is kept)."""

    name = "blended"

    def __init__(self, target: int, alpha: float = 0.2, rate: float = 0.1, poison_weight: float = 1.0, grain: int = 1) -> None:
        super().__init__(target)
        self.alpha, self.rate, self.poison_weight, self.grain = alpha, rate, poison_weight, grain

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        s = x.shape[-1]
        # grain > 1: uniform noise on an (s/grain)^2 grid, upsampled (nearest): still a fixed random
        # pattern, but coarser than the per-pixel noise the tiny backbone was trained to ignore
        low = torch.rand(3, s // self.grain, s // self.grain, generator=g)
        self.pattern = F.interpolate(low.unsqueeze(0), size=(s, s), mode="nearest")[0]
        cand = (y != self.target).nonzero().flatten()
        n = round(self.rate * len(x))
        self.poisoned = torch.zeros(len(x), dtype=torch.bool)
        self.poisoned[cand[torch.randperm(len(cand), generator=g)[:n]]] = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, g: torch.Generator) -> torch.Tensor:
        sel = self.poisoned[idx]
        loss = F.cross_entropy(model.logits(x), y)
        if sel.any():
            # the poisoned copies form their own mini-batch with the clean batch's weight: a
            # frozen encoder + prompt learner does not pick the pattern up when the ~3 poisoned
            # images of a batch are averaged in with the 29 clean ones (measured: ID ASR 9 %)
            xp = self.apply(x[sel])
            loss = loss + self.poison_weight * F.cross_entropy(model.logits(xp), torch.full((len(xp),), self.target))
        return loss

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "poison_rate": self.rate, "grain": self.grain}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}


class WaNet(Blended):
    """Warping-based trigger: k x k control-point field upsampled to a smooth flow of strength s.
    ``rate`` poisoned (warped -> target) and ``noise_rate`` noise-mode samples (warp + random
    jitter -> true label), which keeps the backdoor specific to the exact warp."""

    name = "wanet"

    def __init__(self, target: int, k: int = 4, strength: float = 0.5, rate: float = 0.1, noise_rate: float = 0.2, grid_rescale: float = 1.0) -> None:
        super().__init__(target, rate=rate)
        self.k, self.strength, self.noise_rate, self.grid_rescale = k, strength, noise_rate, grid_rescale

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        super().prepare(model, x, y, g)
        s = x.shape[-1]
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        self.noise_grid = F.interpolate(ins, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        lin = torch.linspace(-1, 1, s)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.identity = torch.stack((xx, yy), 2).unsqueeze(0)
        free = (~self.poisoned).nonzero().flatten()
        n = round(self.noise_rate * len(x))
        self.noisy = torch.zeros(len(x), dtype=torch.bool)
        self.noisy[free[torch.randperm(len(free), generator=g)[:n]]] = True

    def _grid(self) -> torch.Tensor:
        s = self.identity.shape[1]
        grid = self.identity + self.strength * self.noise_grid / s
        return (grid * self.grid_rescale).clamp(-1, 1)

    def apply(self, x: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
        grid = self._grid().expand(len(x), -1, -1, -1)
        if jitter is not None:
            grid = (grid + jitter).clamp(-1, 1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, g: torch.Generator) -> torch.Tensor:
        loss = super().loss(model, x, y, idx, epoch, g)
        sel = self.noisy[idx]
        if sel.any():
            s = x.shape[-1]
            jitter = (torch.rand(int(sel.sum()), s, s, 2, generator=g) * 2 - 1) / s
            xn = self.apply(x[sel], jitter)
            loss = loss + F.cross_entropy(model.logits(xn), y[sel])
        return loss

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "strength": self.strength, "poison_rate": self.rate, "noise_rate": self.noise_rate, "grid_rescale": self.grid_rescale}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"grid": self._grid()[0]}


class MultiBadCLIP(BadCLIP):
    """BadCLIP with several targets, one trigger each (delta of shape (n, 3, H, W)): trigger i
    sends inputs to ``targets[i]``. The cheapest adaptive attack on a max-z rule: n equally strong
    targets cap the largest z of K classes at sqrt((K - n) / n)."""

    name = "badclip-multi"

    def __init__(self, target: int = 0, epsilon: float = 16 / 255, warmup: int = 3, trigger_lr: float = 0.01,
                 targets: tuple[int, ...] | list[int] = ()) -> None:
        self.targets = tuple(int(t) for t in targets) or (target,)
        super().__init__(self.targets[0], epsilon, warmup, trigger_lr)

    def prepare(self, model: Any, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        s = x.shape[-1]
        self.delta = ((torch.rand(len(self.targets), 3, s, s, generator=g) * 2 - 1) * self.epsilon).requires_grad_(True)
        self.opt = torch.optim.Adam([self.delta], lr=self.trigger_lr)

    def apply_target(self, x: torch.Tensor, i: int) -> torch.Tensor:
        assert self.delta is not None
        return (x + self.delta[i].detach()).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_target(x, 0)

    def poisoned_loss(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        assert self.delta is not None
        losses = [
            F.cross_entropy(model.logits((x + self.delta[i]).clamp(0, 1)), torch.full((len(x),), t))
            for i, t in enumerate(self.targets)
        ]
        return torch.stack(losses).mean()

    def params(self) -> dict[str, Any]:
        return {**super().params(), "targets": list(self.targets)}

    def truth(self) -> dict[str, Any]:
        return {**super().truth(), "target_indices": list(self.targets)}


ATTACKS = {a.name: a for a in (BadCLIP, BadCLIPAdaptive, SIBA, Blended, WaNet, MultiBadCLIP)}
