"""SIBA's trigger optimisation: both constraints hold, and the sparse support can move."""

from __future__ import annotations

import torch

from gatekeeper.redteam.attacks import SIBA


class _PixelScorer:
    """Two-class 'model' whose target logit is a fixed weighting of the pixels: it rewards only
    the pixels in ``wanted``, so the best k-sparse trigger is exactly that set."""

    def __init__(self, wanted: torch.Tensor) -> None:
        self.w = torch.zeros(3, 8, 8)
        self.w[:, wanted // 8, wanted % 8] = 1.0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.w).sum((1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], 1)


def _support(attack: SIBA) -> set[int]:
    assert attack.delta is not None
    return set((attack.delta.abs().sum(0).flatten() > 0).nonzero().flatten().tolist())


def test_siba_trigger_is_sparse_bounded_and_finds_the_pixels_that_matter():
    eps, k = 16 / 255, 6
    attack = SIBA(target=0, epsilon=eps, pixels=k)
    x = torch.full((4, 3, 8, 8), 0.5)
    attack.prepare(None, x, torch.ones(4, dtype=torch.long), torch.Generator().manual_seed(0))
    start = _support(attack)
    wanted = torch.tensor(sorted(set(range(64)) - start))[:k]  # all outside the random start
    model = _PixelScorer(wanted)
    for _ in range(200):
        attack.zero_grad()
        attack.poisoned_loss(model, x).backward()
        attack.after_step(epoch=0)
    assert attack.delta is not None
    assert len(_support(attack)) <= k and attack.delta.abs().max() <= eps + 1e-7
    assert _support(attack) == set(wanted.tolist())
    assert torch.allclose(attack.apply(x)[:, :, wanted // 8, wanted % 8], torch.tensor(0.5 + eps))
