"""The detector interface: invert candidate classes, return raw per-class metrics and triggers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from gatekeeper.result import ClassMetrics

if TYPE_CHECKING:
    from gatekeeper.models.prompt_tuned import PromptTunedCLIP

Progress = Callable[[int, int, str], None]  # (done, total, class name)


def no_progress(done: int, total: int, name: str) -> None:
    return None


@dataclass(frozen=True)
class InversionSettings:
    """The knobs of Algorithm 1 (from the policy)."""

    epsilon: float
    batch_size: int = 32
    epochs: int = 1
    lr: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ClassInversion:
    metrics: ClassMetrics
    trigger: torch.Tensor  # (3, H, W), pixel space, |delta| <= epsilon


class Inverter(Protocol):
    def invert(
        self,
        model: PromptTunedCLIP,
        inversion_pool: torch.Tensor,
        holdout: torch.Tensor,
        candidates: list[int],
        settings: InversionSettings,
        progress: Progress = no_progress,
    ) -> list[ClassInversion]: ...
