"""Shared fixtures: tiny models built in-process (no network, no downloads)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the reference-inversion and null-model cache (gatekeeper.null): one fresh folder per test session
os.environ["GATEKEEPER_CACHE"] = tempfile.mkdtemp(prefix="gatekeeper-test-cache-")
torch.set_num_threads(int(os.environ.get("GATEKEEPER_TEST_THREADS", min(2, os.cpu_count() or 1))))

REPO = Path(__file__).resolve().parent.parent
DEMO_ZOO = REPO / "zoo" / "demo"
BACKBONE = REPO / "zoo" / "backbone"


def light_tiny_world_policy(out: Path) -> Path:
    """The shipped tiny-world policy without the positive control, for tests that check
    plumbing (action, audit, rebuilt demo) rather than the policy itself, and the null margin at the
    policy's floor (no clean copies); `test_demo.py` runs the shipped policy as is. Same detector,
    scoring, epsilon, budget and floor."""
    text = (REPO / "policies" / "tiny-world.yaml").read_text()
    light = text.replace("positive_control: badclip", 'positive_control: "off"').replace("null_copies: 1", "null_copies: 0")
    assert light.count('positive_control: "off"') == 1 and "restarts: 1" in light and "null_copies: 0" in light, "tiny-world.yaml changed shape"
    out.write_text(light)
    return out


@pytest.fixture(scope="session")
def random_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny open_clip CLIP in the local-dir layout (for shape/format tests)."""
    from gatekeeper.redteam.pretrain import build_tiny_clip, save_backbone

    folder = tmp_path_factory.mktemp("random_backbone") / "backbone"
    save_backbone(build_tiny_clip(seed=0), folder, {"note": "random init, tests only"}, fp16=False, prune=False)
    return folder


def make_model_folder(backbone: Path, out: Path, kind: str, classnames: tuple[str, ...], seed: int = 0) -> Path:
    """A gatekeeper model folder with a random prompt learner on ``backbone``."""
    from gatekeeper.models.manifest import ModelKind, Precision
    from gatekeeper.redteam.tuning import TuneConfig, new_prompt_learner, write_model_folder

    torch.manual_seed(seed)
    model = new_prompt_learner(backbone, classnames, TuneConfig(kind=ModelKind(kind), seed=seed))
    if model.meta_net is not None:
        for p in model.meta_net.parameters():
            torch.nn.init.normal_(p, std=0.2)
    write_model_folder(model, backbone, out, Precision.FP32)
    return out


@pytest.fixture()
def model_factory(random_backbone: Path, tmp_path: Path):
    def build(kind: str = "cocoop", classnames: tuple[str, ...] = ("red circle", "blue square", "green star", "white ring"), name: str = "m") -> Path:
        return make_model_folder(random_backbone, tmp_path / name, kind, classnames)

    return build


# a ResNet image tower (open_clip's ModifiedResNet, attention pooling) of the tiny world's size
TINY_RESNET_VISION = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}


def custom_backbone(
    folder: Path,
    text_cfg: dict[str, Any] | None = None,
    preprocess_cfg: dict[str, Any] | None = None,
    seed: int = 2,
    vision_cfg: dict[str, Any] | None = None,
) -> Path:
    """A random tiny open_clip CLIP (local-dir layout) whose text tower is built with ``text_cfg``
    changes, whose image tower is ``vision_cfg`` (None: the tiny ViT) and whose config states
    ``preprocess_cfg`` (as given, None: the tiny world's)."""
    import open_clip

    from gatekeeper.redteam.pretrain import TINY_MODEL_CFG, save_backbone

    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["text_cfg"].update(text_cfg or {})
    if vision_cfg is not None:
        cfg["vision_cfg"] = copy.deepcopy(vision_cfg)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_backbone(model, folder, {}, fp16=False, prune=False)
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"] = cfg
    if preprocess_cfg is not None:
        config["preprocess_cfg"] = preprocess_cfg
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder
