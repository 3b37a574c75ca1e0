"""The compatibility table (docs/model-format.md#compatibility), one cell per test case.

Every family and option is delivered as the provider's trainer saves it (a Dassl checkpoint and
the provider's own config keys as the sidecar), converted, loaded and scanned to a verdict, on
both kinds of image tower open_clip builds: a ViT (the committed tiny backbone) and a ResNet with
attention pooling (open_clip's ModifiedResNet at the tiny world's size, random weights). The
real-size architectures (ViT-B/32, ViT-B/16, RN50, RN101) are in ``test_architectures.py``, MaPLe
(ViT only) in ``test_maple.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gatekeeper.cli import main
from gatekeeper.models.checkpoint import convert_checkpoint
from gatekeeper.models.loader import load_model
from tests.conftest import BACKBONE, TINY_RESNET_VISION, custom_backbone, make_model_folder
from tests.models.test_convert import dassl_checkpoint

NAMES = ["red square", "green circle", "blue star"]
POLICY = """version: 1
epsilon: 8/255
batch_size: 8
epochs: 1
ood_budget: 8
holdout: 8
scoring: lift
null_copies: 0
restarts: 1
positive_control: "off"
"""

# family-option: (trainer section, PREC, CoCoOp meta-net, class-specific contexts, class token position)
CELLS: dict[str, tuple[str, str, bool, bool, str]] = {
    "coop-fp32": ("CoOp", "fp32", False, False, "end"),
    "coop-fp16": ("CoOp", "fp16", False, False, "end"),
    "coop-csc": ("CoOp", "fp32", False, True, "end"),
    "coop-middle": ("CoOp", "fp16", False, False, "middle"),
    "coop-front": ("CoOp", "fp32", False, False, "front"),
    "cocoop-fp32": ("CoCoOp", "fp32", True, False, "end"),
    "cocoop-fp16": ("CoCoOp", "fp16", True, False, "end"),
    "kgcoop-fp32": ("KgCoOp", "fp32", False, False, "end"),
    "kgcoop-csc-front": ("KgCoOp", "fp16", False, True, "front"),
    "prograd-fp16": ("ProGrad", "fp16", False, False, "end"),
    "prograd-csc-middle": ("ProGrad", "fp32", False, True, "middle"),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    resnet = custom_backbone(tmp_path_factory.mktemp("resnet") / "backbone", vision_cfg=TINY_RESNET_VISION)
    return {"vit": BACKBONE, "resnet": resnet}


def _scan(model: Path, tmp_path: Path) -> dict[str, Any]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "scan"
    rc = main(["scan", str(model), "--policy", str(policy), "--out", str(out), "--device", "cpu", "--quiet"])
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    assert rc in (0, 1) and result["verdict"] in ("pass", "fail"), result["reason"]  # a verdict, not an error
    assert [c["name"] for c in sorted(result["classes"], key=lambda c: c["index"])] == NAMES
    return result


@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_each_cell_converts_loads_and_scans_to_a_verdict(towers: dict[str, Path], tmp_path: Path, cell: str, tower: str) -> None:
    trainer, prec, meta, csc, position = CELLS[cell]
    backbone = towers[tower]
    dtype = torch.float16 if prec == "fp16" else torch.float32
    ckpt = dassl_checkpoint(tmp_path, NAMES, backbone=backbone, meta=meta, dtype=dtype, csc=csc)
    section = {"N_CTX": 4, "PREC": prec}
    if trainer != "CoCoOp":
        section |= {"CSC": csc, "CLASS_TOKEN_POSITION": position}
    sidecar = tmp_path / "config.yaml"
    sidecar.write_text(json.dumps({"TRAINER": {"NAME": trainer, trainer.upper(): section}, "classnames": NAMES}))
    converted = convert_checkpoint(ckpt, sidecar, tmp_path / "model", backbone=backbone)
    m = converted.manifest
    kind = "cocoop" if meta else "coop"  # KgCoOp and ProGrad store CoOp's tensors and run as CoOp
    assert (m.kind.value, m.precision.value, m.csc, m.class_token_position.value) == (kind, prec, csc, position)
    model = load_model(tmp_path / "model")
    size = m.image_size
    assert size == (64 if tower == "resnet" else 32)
    assert model.logits(torch.rand(2, 3, size, size)).shape == (2, len(NAMES))
    result = _scan(tmp_path / "model", tmp_path)
    assert (result["model"]["kind"], result["model"]["image_size"]) == (kind, size)


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_zero_shot_loads_and_scans_to_a_verdict(towers: dict[str, Path], tmp_path: Path, tower: str) -> None:
    folder = make_model_folder(towers[tower], tmp_path / "model", "zeroshot", tuple(NAMES))
    assert load_model(folder).kind.value == "zeroshot"
    assert _scan(folder, tmp_path)["model"]["kind"] == "zeroshot"
