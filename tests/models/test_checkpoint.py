"""Safe import of Dassl (CoOp / CoCoOp / BadCLIP) checkpoints: gatekeeper.models.checkpoint."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatekeeper.errors import ModelFormatError, UnsafeCheckpointError, UsageError
from gatekeeper.models.checkpoint import (
    ALLOWED_GLOBALS,
    convert_checkpoint,
    load_dassl_checkpoint,
    scan_pickle,
    sniff_format,
)
from gatekeeper.models.manifest import WEIGHTS_NAME, ModelKind, Precision, read_manifest

META = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")


class RunsShell:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class RunsExec:
    """Unpickling this runs Python code through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def dassl_state(dtype: torch.dtype = torch.float32, meta: bool = True, ctx_shape: tuple[int, ...] = (4, 8)) -> dict:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {
        "module.ctx": torch.randn(*ctx_shape, generator=g).to(dtype),
        "module.token_prefix": torch.randn(3, 1, 8, generator=g).to(dtype),
        "module.token_suffix": torch.randn(3, 72, 8, generator=g).to(dtype),
    }
    if meta:
        sd["module.meta_net.linear1.weight"] = torch.randn(2, 6, generator=g).to(dtype)
        sd["module.meta_net.linear1.bias"] = torch.randn(2, generator=g).to(dtype)
        sd["module.meta_net.linear2.weight"] = torch.randn(8, 2, generator=g).to(dtype)
        sd["module.meta_net.linear2.bias"] = torch.randn(8, generator=g).to(dtype)
    return sd


def save_dassl(folder: Path, state: dict, legacy: bool = False, **extra: Any) -> Path:
    """Write ``folder/prompt_learner/model.pth.tar-50`` the way Dassl's save_checkpoint does."""
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.002, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)
    ckpt = {"state_dict": state, "epoch": 50, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    ckpt.update(extra)
    path = folder / "prompt_learner" / "model.pth.tar-50"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_genuine_checkpoint_loads(tmp_path: Path, legacy: bool, dtype: torch.dtype) -> None:
    state = dassl_state(dtype)
    path = save_dassl(tmp_path, state, legacy=legacy)
    assert sniff_format(path) == ("pickle" if legacy else "torch-zip")
    loaded = load_dassl_checkpoint(path)
    assert set(loaded) == {"ctx", *META}  # module. stripped, token_prefix/suffix dropped
    for key, value in loaded.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[f"module.{key}"].float())


def test_safetensors_prompt_learner_loads_whatever_its_name(tmp_path: Path) -> None:
    path = tmp_path / "model.pth.tar-50"
    save_file({"ctx": torch.ones(2, 8, dtype=torch.float16), "token_prefix": torch.ones(1)}, str(path))
    loaded = load_dassl_checkpoint(path)
    assert set(loaded) == {"ctx"} and loaded["ctx"].dtype == torch.float32


def test_bare_state_dict_and_missing_ctx(tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    torch.save({"ctx": torch.ones(2, 8)}, path)
    assert set(load_dassl_checkpoint(path)) == {"ctx"}
    torch.save({"state_dict": {"meta_net.linear1.bias": torch.ones(2)}}, path)
    with pytest.raises(ModelFormatError, match="ctx"):
        load_dassl_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [RunsShell, RunsExec], ids=["os.system", "builtins.exec"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path, legacy: bool, payload: type) -> None:
    marker = tmp_path / "pwned"
    state = dassl_state()
    state["module.evil"] = payload(marker)
    path = save_dassl(tmp_path, state, legacy=legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_dassl_checkpoint(path)
    expected = "posix.system" if payload is RunsShell else "builtins.exec"
    assert expected in info.value.globals_found
    assert expected in str(info.value)
    assert info.value.hint
    assert not marker.exists()


def _replace_member(src: Path, dst: Path, member_suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(member_suffix) else zin.read(info))


def test_hand_crafted_stack_global_in_torch_zip_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    genuine = save_dassl(tmp_path, dassl_state())
    # protocol 4: STACK_GLOBAL whose module/name strings come back from the memo (BINGET)
    payload = pickle.dumps({"state_dict": {"ctx": 1}, "x": ["posix", "system", RunsShell(marker)]}, protocol=4)
    evil = tmp_path / "model.pth.tar-50"
    _replace_member(genuine, evil, "/data.pkl", payload)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_dassl_checkpoint(evil)
    assert info.value.globals_found == ("posix.system",)
    assert not marker.exists()


def test_scan_pickle_allows_torch_state_dicts(tmp_path: Path) -> None:
    path = save_dassl(tmp_path, dassl_state(torch.float16))
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    found = scan_pickle(data)
    assert {"torch._utils._rebuild_tensor_v2", "torch.HalfStorage", "collections.OrderedDict"} <= found
    assert found <= ALLOWED_GLOBALS


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x80\x02\x82\x01.", "EXT1"),  # extension registry code 1
        (b"\x80\x02Pfoo\n.", "PERSID"),
        (b"\x80\x02X\x03\x00\x00\x00abcQ.", "BINPERSID"),  # persistent id that is not ("storage", ...)
        (b"\x80\x04K\x01K\x02\x93.", "computed name"),  # STACK_GLOBAL on two ints
        (b"\x80\x02cos\nsystem\n.", "os.system"),
    ],
)
def test_scan_pickle_refuses_dangerous_opcodes(data: bytes, needle: str) -> None:
    with pytest.raises(UnsafeCheckpointError, match=needle):
        scan_pickle(data)


def test_scan_pickle_malformed() -> None:
    with pytest.raises(ModelFormatError, match="malformed"):
        scan_pickle(b"\x80\x02\xff")


def test_scan_pickle_frames() -> None:
    framed = b"\x80\x04\x95" + (3).to_bytes(8, "little") + b"K\x01."
    assert scan_pickle(framed) == set()
    # a frame reaching past STOP would make the next pickle of a stream start where the scan did not look
    overlong = b"\x80\x04\x95" + (7).to_bytes(8, "little") + b"K\x01.cos\nsystem\n"
    with pytest.raises(ModelFormatError, match="frame"):
        scan_pickle(overlong)


def test_old_torch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_dassl(tmp_path, dassl_state())
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu121")
    with pytest.raises(UnsafeCheckpointError, match="2.10"):
        load_dassl_checkpoint(path)


def test_sniff_format_by_content(tmp_path: Path) -> None:
    st = tmp_path / "weights.bin"
    save_file({"ctx": torch.ones(2, 3)}, str(st))
    assert sniff_format(st) == "safetensors"
    z = tmp_path / "x.txt"
    torch.save({"ctx": torch.ones(2)}, z)
    assert sniff_format(z) == "torch-zip"
    legacy = tmp_path / "model.safetensors"
    torch.save({"ctx": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert sniff_format(legacy) == "pickle"
    garbage = tmp_path / "model.pth.tar-50"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ModelFormatError, match="model.pth.tar-50"):
        sniff_format(garbage)
    plain_zip = tmp_path / "plain.pth"
    with zipfile.ZipFile(plain_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ModelFormatError, match="data.pkl"):
        sniff_format(plain_zip)
    with pytest.raises(ModelFormatError):
        sniff_format(tmp_path / "missing")


def _sidecar(folder: Path, **cfg: Any) -> Path:
    path = folder / "sidecar.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


def test_convert_cocoop_end_to_end(tmp_path: Path) -> None:
    state = dassl_state(torch.float16)
    ckpt = save_dassl(tmp_path, state, legacy=True)
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n", encoding="utf-8")
    side = tmp_path / "sidecar.yaml"
    side.write_text(
        "backbone: {name: ViT-B-16, pretrained: openai}\nclassnames_file: classes.txt\nctx_init: a photo of a\n",
        encoding="utf-8",
    )
    out = tmp_path / "models" / "cocoop"
    manifest = convert_checkpoint(ckpt, side, out)
    assert manifest.kind == ModelKind.COCOOP
    assert manifest.precision == Precision.FP16
    assert manifest.classnames == ("cat", "dog", "bird")
    assert (manifest.n_ctx, manifest.image_size, manifest.ctx_init) == (4, 224, "a photo of a")
    assert manifest.backbone.describe() == "ViT-B-16/openai"
    assert read_manifest(out) == manifest
    weights = load_file(str(out / WEIGHTS_NAME))
    assert set(weights) == {"ctx", *META}
    for key, value in weights.items():
        assert value.dtype == torch.float16
        assert torch.equal(value, state[f"module.{key}"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["cocoop"]  # no temp folder left behind


def test_convert_coop_fp32_inline_classnames(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, dassl_state(meta=False))
    side = _sidecar(tmp_path, backbone={"name": "RN50", "pretrained": "openai"}, classnames=["a", "b"], image_size=224)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine
    manifest = convert_checkpoint(ckpt, side, out)
    assert (manifest.kind, manifest.precision, manifest.n_ctx) == (ModelKind.COOP, Precision.FP32, 4)
    assert set(load_file(str(out / WEIGHTS_NAME))) == {"ctx"}


def test_convert_refuses_non_empty_out(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, dassl_state())
    side = _sidecar(tmp_path, backbone={"name": "RN50"}, classnames=["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UsageError, match="empty"):
        convert_checkpoint(ckpt, side, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_convert_unknown_sidecar_key(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, dassl_state())
    side = _sidecar(tmp_path, backbone={"name": "RN50"}, classnames=["a", "b"], colour="red")
    with pytest.raises(UsageError, match="colour"):
        convert_checkpoint(ckpt, side, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_class_specific_ctx(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, dassl_state(meta=False, ctx_shape=(3, 4, 8)))
    side = _sidecar(tmp_path, backbone={"name": "RN50"}, classnames=["a", "b", "c"])
    parent = tmp_path / "models"
    with pytest.raises(ModelFormatError, match="class-specific"):
        convert_checkpoint(ckpt, side, parent / "out")
    assert not (parent / "out").exists()
    assert not parent.exists() or not any(parent.iterdir())


def test_convert_refuses_malicious_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = dassl_state()
    ckpt = save_dassl(tmp_path, state, evil=RunsShell(marker))  # outside state_dict: still refused
    side = _sidecar(tmp_path, backbone={"name": "RN50"}, classnames=["a", "b"])
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(ckpt, side, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_zip_with_duplicate_members_is_refused(tmp_path: Path) -> None:
    genuine = save_dassl(tmp_path, dassl_state())
    dup = tmp_path / "dup.pth"
    with zipfile.ZipFile(genuine) as zin, zipfile.ZipFile(dup, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        name = next(n for n in zin.namelist() if n.endswith("/data.pkl"))
        with pytest.warns(UserWarning, match="Duplicate"):
            zout.writestr(name, io.BytesIO(b"x").getvalue())
    with pytest.raises(ModelFormatError, match="duplicate"):
        load_dassl_checkpoint(dup)
