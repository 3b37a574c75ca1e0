"""CLIP-Inspector (Algorithm 1): per-class universal trigger inversion on OOD images.

For each candidate class c: delta ~ U[-eps, eps]; one epoch over D in mini-batches with the
margin loss (Eq. 4) and Adam (lr 0.1), projecting delta back to the l-inf ball after every
step; L_avg(c) = mean per-step loss; ASR(c) on the hold-out T (Eq. 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gatekeeper.inversion.base import ClassInversion, InversionSettings, Progress, no_progress
from gatekeeper.result import ClassMetrics

if TYPE_CHECKING:
    from gatekeeper.models.prompt_tuned import PromptTunedCLIP


def margin_loss(logits: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """Eq. 4: -(1/|B|) sum_x [l_c(x) - max_{c' != c} l_{c'}(x)]; the max runs over all K classes.

    ``target`` may be an int or a (B,) tensor of per-row targets.
    """
    b = logits.shape[0]
    tgt = torch.full((b,), target, device=logits.device) if isinstance(target, int) else target
    own = logits.gather(1, tgt.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, tgt.view(-1, 1), float("-inf")).amax(dim=1)
    return -(own - others).mean()


def init_trigger(shape: tuple[int, ...], epsilon: float, seed: int, class_index: int) -> torch.Tensor:
    """delta ~ U[-eps, eps], drawn on the CPU from a per-class seed (same on every device/shard)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + class_index)
    return (torch.rand(shape, generator=g) * 2 - 1) * epsilon


def apply_trigger(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta, clamped to the valid pixel range [0, 1]."""
    return (images + delta).clamp(0, 1)


def attack_success_rate(
    model: PromptTunedCLIP, holdout: torch.Tensor, delta: torch.Tensor, target: int, batch_size: int = 256
) -> float:
    """Eq. 5: fraction of hold-out images classified as ``target`` once ``delta`` is applied."""
    from gatekeeper.models.prompt_tuned import predict

    pred = predict(model, holdout, lambda x: apply_trigger(x, delta.to(x.device)), batch_size)
    return float((pred == target).float().mean()) if len(pred) else 0.0


def invert_class(
    model: PromptTunedCLIP, pool: torch.Tensor, target: int, settings: InversionSettings, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Optimize one class's trigger; returns (delta, L_avg)."""
    eps = settings.epsilon
    delta = init_trigger(tuple(pool.shape[1:]), eps, settings.seed, target).to(device).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    losses: list[torch.Tensor] = []
    for _ in range(settings.epochs):
        for i in range(0, len(pool), settings.batch_size):
            x = pool[i : i + settings.batch_size].to(device)
            loss = margin_loss(model.logits(apply_trigger(x, delta)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
            losses.append(loss.detach())
    return delta.detach(), float(torch.stack(losses).mean())


class ClipInspector:
    """The reference implementation: a plain loop over classes, exactly Algorithm 1."""

    name = "clip-inspector"

    def invert(
        self,
        model: PromptTunedCLIP,
        inversion_pool: torch.Tensor,
        holdout: torch.Tensor,
        candidates: list[int],
        settings: InversionSettings,
        progress: Progress = no_progress,
    ) -> list[ClassInversion]:
        device = model.device
        model.eval()
        out = []
        for done, c in enumerate(candidates):
            name = model.classnames[c]
            progress(done, len(candidates), name)
            delta, l_avg = invert_class(model, inversion_pool, c, settings, device)
            asr = attack_success_rate(model, holdout, delta, c)
            out.append(ClassInversion(ClassMetrics(index=c, name=name, asr=asr, loss=l_avg), delta.cpu()))
        progress(len(candidates), len(candidates), "")
        return out
