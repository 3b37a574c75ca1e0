"""Shared set-up for the `gatekeeper-lab bench` end-to-end tests on the committed demo zoo."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import DEMO_ZOO


def demo_zoo_copy(tmp_path: Path, ood_budget: int, holdout: int) -> tuple[Path, Path]:
    """A writable copy of the demo zoo and a fast policy file (small OOD budget) next to it."""
    zoo = tmp_path / "zoo"
    shutil.copytree(DEMO_ZOO, zoo)
    policy = tmp_path / "fast.yaml"
    policy.write_text(f"epsilon: 8/255\nood_budget: {ood_budget}\nholdout: {holdout}\nnull_copies: 0\n")
    return zoo, policy


def rebuild_under_same_name(zoo: Path, source: str, target: str) -> None:
    """'Rebuild' zoo model ``target``: it now carries ``source``'s prompt learner, under its own name."""
    shutil.copy(zoo / source / "prompt_learner.safetensors", zoo / target / "prompt_learner.safetensors")
