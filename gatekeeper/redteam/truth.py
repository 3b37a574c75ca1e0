"""Rebuild a zoo model's true trigger from its ground-truth sidecar (for measuring ASR)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gatekeeper.redteam.attacks import ATTACKS, Attack, BadCLIP, Blended, MultiBadCLIP, WaNet


def true_attack(truth: dict[str, Any], truth_dir: Path) -> Attack | None:
    """An Attack object whose ``apply`` is the model's exact implanted trigger (None for clean)."""
    from safetensors.torch import load_file

    name = truth["attack"]
    if name == "clean":
        return None
    tensors = load_file(str(truth_dir / "trigger.safetensors"))
    attack = ATTACKS[name].__new__(ATTACKS[name])
    Attack.__init__(attack, int(truth["target_index"]))
    if isinstance(attack, WaNet):
        grid = tensors["grid"].unsqueeze(0)
        attack.apply = lambda x, jitter=None: torch.nn.functional.grid_sample(  # type: ignore[method-assign]
            x, grid.expand(len(x), -1, -1, -1), align_corners=True
        ).clamp(0, 1)
    elif isinstance(attack, Blended):
        attack.alpha = float(truth["params"]["alpha"])
        attack.pattern = tensors["pattern"]
    elif isinstance(attack, BadCLIP):
        attack.delta = tensors["delta"]
        if isinstance(attack, MultiBadCLIP):
            attack.targets = tuple(int(t) for t in truth["params"]["targets"])
    return attack
