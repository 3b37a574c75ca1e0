"""Safe import of Dassl (CoOp / CoCoOp / BadCLIP) checkpoints: gatekeeper.models.checkpoint."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import _LRScheduler

from gatekeeper.errors import ExitCode, ModelFormatError, UnsafeCheckpointError, UsageError, exit_code_for
from gatekeeper.models.checkpoint import (
    ALLOWED_GLOBALS,
    OPAQUE_GLOBALS,
    OpaqueObject,
    convert_checkpoint,
    load_dassl_checkpoint,
    read_torch_checkpoint,
    scan_pickle,
    sniff_format,
)
from gatekeeper.models.manifest import WEIGHTS_NAME, ClassTokenPosition, ModelKind, Precision, read_manifest
from tests.conftest import BACKBONE

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


# Dassl's dassl/optim/lr_scheduler.py, re-implemented (without ``verbose``, which torch 2.15's
# LRScheduler no longer takes) in a module of that exact name, so that a pickled instance
# references the global ``dassl.optim.lr_scheduler.ConstantWarmupScheduler`` as the real one does.
class _BaseWarmupScheduler(_LRScheduler):
    __module__ = "dassl.optim.lr_scheduler"

    def __init__(self, optimizer: Any, successor: Any, warmup_epoch: int, last_epoch: int = -1) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> Any:
        raise NotImplementedError

    def step(self, epoch: Any = None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    __module__ = "dassl.optim.lr_scheduler"

    def __init__(self, optimizer: Any, successor: Any, warmup_epoch: int, cons_lr: float, last_epoch: int = -1) -> None:
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self) -> Any:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


@pytest.fixture(autouse=True, scope="module")
def fake_dassl() -> Iterator[None]:
    """Make ``dassl.optim.lr_scheduler`` importable (pickle looks classes up by module name)."""
    mods = {name: types.ModuleType(name) for name in ("dassl", "dassl.optim", "dassl.optim.lr_scheduler")}
    mods["dassl"].optim = mods["dassl.optim"]  # type: ignore[attr-defined]
    mods["dassl.optim"].lr_scheduler = mods["dassl.optim.lr_scheduler"]  # type: ignore[attr-defined]
    for cls in (_BaseWarmupScheduler, ConstantWarmupScheduler):
        setattr(mods["dassl.optim.lr_scheduler"], cls.__name__, cls)
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in mods.items():
            mp.setitem(sys.modules, name, mod)
        yield


class PromptLearner(torch.nn.Module):
    """CoCoOp's PromptLearner, shrunk: learnable ctx, meta_net, frozen token_prefix/suffix buffers."""

    def __init__(self, ctx_shape: tuple[int, ...], meta: bool) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.empty(*ctx_shape))
        if meta:
            layers = [
                ("linear1", torch.nn.Linear(6, 2)),
                ("relu", torch.nn.ReLU(True)),
                ("linear2", torch.nn.Linear(2, 8)),
            ]
            self.meta_net = torch.nn.Sequential(OrderedDict(layers))
        self.register_buffer("token_prefix", torch.empty(3, 1, 8))
        self.register_buffer("token_suffix", torch.empty(3, 72, 8))


def dassl_state(dtype: torch.dtype = torch.float32, meta: bool = True, ctx_shape: tuple[int, ...] = (4, 8)) -> Any:
    """The prompt learner's state_dict as saved from a DataParallel model: ``module.`` keys."""
    learner = PromptLearner(ctx_shape, meta).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in learner.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return OrderedDict((f"module.{k}", v) for k, v in learner.state_dict().items())


def save_dassl(
    folder: Path,
    state: dict,
    legacy: bool = False,
    tamper: Callable[[Any, Any], None] | None = None,
    scheduler: Callable[[Any], Any] | None = None,
    optimizer: type = torch.optim.SGD,
    **extra: Any,
) -> Path:
    """Write ``folder/prompt_learner/model.pth.tar-50`` the way Dassl trains and saves a CoOp model.

    Dassl's build_optimizer (sgd, CoOp's OPTIM) over the prompt learner's parameters (which
    share storage with ``state``), build_lr_scheduler (cosine wrapped by a constant warmup),
    a few steps so the optimizer holds momentum buffers, then save_checkpoint's dict.
    ``tamper(optimizer, scheduler)`` runs before saving.
    """
    params = [torch.nn.Parameter(v) for k, v in state.items() if isinstance(v, torch.Tensor) and "token_" not in k]
    kwargs = {"momentum": 0.9, "dampening": 0.0, "nesterov": False} if optimizer is torch.optim.SGD else {}
    opt = optimizer(params, lr=0.002, weight_decay=5e-4, **kwargs)
    successor = scheduler(opt) if scheduler else torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(50))  # type: ignore[arg-type]  # as Dassl
    sched = ConstantWarmupScheduler(opt, successor, warmup_epoch=1, cons_lr=1e-5)
    for _ in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.1)
        opt.step()
        sched.step()
    if tamper:
        tamper(opt, sched)
    ckpt = {
        "state_dict": state,
        "epoch": 50,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
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


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dassl_training_state_loads_as_inert_stand_ins(
    tmp_path: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_dassl(tmp_path, dassl_state(torch.float16), legacy=legacy)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a real optimizer/scheduler method ran during the load")

    for cls in (torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR, ConstantWarmupScheduler):
        for attr in ("__init__", "__setstate__", "load_state_dict", "step"):
            monkeypatch.setattr(cls, attr, boom, raising=False)
    obj = read_torch_checkpoint(path)
    assert set(obj) == {"state_dict", "epoch", "optimizer", "scheduler", "val_result"}
    successor = obj["scheduler"]["successor"]
    assert isinstance(successor, OpaqueObject)
    assert successor.qualname == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert successor.state["T_max"] == 50.0 and successor.state["last_epoch"] == 2  # 3 steps, the first a warmup one
    sgd = successor.state["optimizer"]
    assert isinstance(sgd, OpaqueObject) and sgd.qualname == "torch.optim.sgd.SGD"
    assert type(sgd.state["state"]) is dict  # a defaultdict(dict) comes back as a plain dict ...
    assert all("momentum_buffer" in v for v in sgd.state["state"].values())  # ... with its content
    assert sgd.state["param_groups"][0]["momentum"] == 0.9
    assert obj["scheduler"]["cons_lr"] == 1e-5
    assert set(load_dassl_checkpoint(path)) == {"ctx", *META}


@pytest.mark.parametrize(
    ("optimizer", "scheduler"),
    [
        (torch.optim.Adam, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [10, 20])),
        (torch.optim.AdamW, lambda o: torch.optim.lr_scheduler.StepLR(o, 10)),
        (torch.optim.RMSprop, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    ],
    ids=["adam-multistep", "adamw-step", "rmsprop-exponential"],
)
def test_other_dassl_optimizers_and_schedulers_load(tmp_path: Path, optimizer: type, scheduler: Any) -> None:
    path = save_dassl(tmp_path, dassl_state(), optimizer=optimizer, scheduler=scheduler)
    assert set(load_dassl_checkpoint(path)) == {"ctx", *META}
    successor = read_torch_checkpoint(path)["scheduler"]["successor"]
    assert successor.qualname.startswith("torch.optim.lr_scheduler.")
    assert successor.state["optimizer"].qualname.endswith(optimizer.__name__)


def test_pickled_warmup_scheduler_object_is_opaque(tmp_path: Path) -> None:
    """A fork saving the scheduler object itself references Dassl's class: a stand-in, never imported."""
    state = dassl_state()
    path = tmp_path / "model.pth.tar-50"
    opt = torch.optim.SGD([torch.nn.Parameter(state["module.ctx"])], lr=0.002, momentum=0.9)
    sched = ConstantWarmupScheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50), 1, 1e-5)
    torch.save({"state_dict": state, "scheduler": sched}, path)
    with zipfile.ZipFile(path) as zf:
        found = scan_pickle(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    assert "dassl.optim.lr_scheduler.ConstantWarmupScheduler" in found
    obj = read_torch_checkpoint(path)
    assert isinstance(obj["scheduler"], OpaqueObject)
    assert obj["scheduler"].qualname == "dassl.optim.lr_scheduler.ConstantWarmupScheduler"
    assert obj["scheduler"].state["successor"].qualname == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert set(load_dassl_checkpoint(path)) == {"ctx", *META}


class CallsSGD:
    """REDUCE on an opaque class with arguments: the real SGD([]) would raise."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch.optim.SGD, ([], 0.1))


def test_reduce_on_opaque_name_calls_the_stand_in(tmp_path: Path) -> None:
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.ones(2, 8)}, "x": CallsSGD()}, path)
    obj = read_torch_checkpoint(path)
    assert isinstance(obj["x"], OpaqueObject) and obj["x"].qualname == "torch.optim.sgd.SGD"
    assert obj["x"].state is None and not vars(obj["x"])  # the arguments were dropped


def test_real_class_registered_elsewhere_is_refused(tmp_path: Path) -> None:
    path = save_dassl(tmp_path, dassl_state())
    with torch.serialization.safe_globals([torch.optim.SGD]), pytest.raises(UnsafeCheckpointError, match="sgd.SGD"):
        load_dassl_checkpoint(path)
    assert set(load_dassl_checkpoint(path)) == {"ctx", *META}  # our stand-ins were unregistered again
    assert not any(isinstance(g, tuple) for g in torch.serialization.get_safe_globals())


def _put_in_param_groups(obj: Any) -> Callable[[Any, Any], None]:
    return lambda opt, sched: opt.param_groups[0].__setitem__("evil", obj)


def _put_in_successor(obj: Any) -> Callable[[Any, Any], None]:
    return lambda opt, sched: setattr(sched.successor, "evil", obj)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", [_put_in_param_groups, _put_in_successor], ids=["param_groups", "successor"])
def test_payload_inside_training_state_is_refused(tmp_path: Path, legacy: bool, where: Any) -> None:
    marker = tmp_path / "pwned"
    path = save_dassl(tmp_path, dassl_state(), legacy=legacy, tamper=where(RunsShell(marker)))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_dassl_checkpoint(path)
    assert info.value.globals_found == ("posix.system",)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_opaque_names_do_not_widen_the_allow_list(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = save_dassl(tmp_path, dassl_state(), tamper=_put_in_successor(RunsExec(marker)))
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert b"torch.optim.sgd" in data  # the opaque names are there too ...
    with pytest.raises(UnsafeCheckpointError) as info:
        convert_checkpoint(path, _sidecar(tmp_path, backbone={"name": "RN50"}, classnames=["a", "b"]), tmp_path / "o")
    assert info.value.globals_found == ("builtins.exec",)  # ... and only exec is reported
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02ctorch.optim.sgd\nSGD\ncbuiltins\nexec\n\x86.",  # an opaque name next to exec
        b"\x80\x02cfunctools\npartial\n.",
        b"\x80\x02cbuiltins\ngetattr\n.",
        b"\x80\x02ctorch\nload\n.",
        b"\x80\x02ctorch.optim\nsgd.SGD\n.",  # an opaque name spelt differently
        b"\x80\x02cdassl.optim.lr_scheduler\n_BaseWarmupScheduler\n.",
    ],
)
def test_scan_refuses_names_near_the_opaque_list(data: bytes) -> None:
    with pytest.raises(UnsafeCheckpointError):
        scan_pickle(data)


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
    # what a Dassl checkpoint's training state references (torch 2.15), all of it opaque
    training = {
        "torch.optim.sgd.SGD",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "collections.defaultdict",
        "builtins.dict",
    }
    assert found - ALLOWED_GLOBALS == training
    assert training <= OPAQUE_GLOBALS and not ALLOWED_GLOBALS & OPAQUE_GLOBALS


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


def real_state(names: list[str], dtype: torch.dtype = torch.float32, meta: bool = True) -> Any:
    """A prompt learner on the committed tiny backbone (real token_prefix/suffix), ``module.`` keys."""
    from tests.models.test_convert import dassl_state as built

    return OrderedDict((f"module.{k}", v) for k, v in built(names, meta=meta, dtype=dtype).items())


def test_convert_cocoop_end_to_end(tmp_path: Path) -> None:
    state = real_state(["cat", "dog", "bird"], torch.float16)
    ckpt = save_dassl(tmp_path, state, legacy=True)
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n", encoding="utf-8")
    shutil.copytree(BACKBONE, tmp_path / "clip")
    side = tmp_path / "sidecar.yaml"
    side.write_text("backbone: {name: 'local-dir:clip'}\nclassnames_file: classes.txt\nctx_init: a photo of a\n", encoding="utf-8")
    out = tmp_path / "models" / "cocoop"
    manifest = convert_checkpoint(ckpt, side, out).manifest
    assert manifest.kind == ModelKind.COCOOP
    assert manifest.precision == Precision.FP16
    assert manifest.classnames == ("cat", "dog", "bird")
    assert (manifest.n_ctx, manifest.image_size, manifest.ctx_init) == (4, 32, "a photo of a")
    assert manifest.backbone.describe() == "local-dir:backbone"
    assert read_manifest(out) == manifest
    weights = load_file(str(out / WEIGHTS_NAME))
    assert set(weights) == {"ctx", *META}
    for key, value in weights.items():
        assert value.dtype == torch.float16
        assert torch.equal(value, state[f"module.{key}"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["cocoop"]  # no temp folder left behind


def test_convert_coop_fp32_inline_classnames(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, real_state(["a", "b"], meta=False))
    side = _sidecar(tmp_path, backbone={"name": "RN50", "pretrained": "openai"}, classnames=["a", "b"], image_size=32)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine
    manifest = convert_checkpoint(ckpt, side, out, backbone=BACKBONE).manifest  # --backbone replaces the sidecar's
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


def csc_state(names: list[str], dtype: torch.dtype = torch.float32, contexts: int | None = None, meta: bool = False) -> Any:
    """real_state with CoOp's class-specific contexts: ctx [contexts (default: one per class), n_ctx, d]."""
    state = real_state(names, dtype, meta=meta)
    n_ctx, dim = state["module.ctx"].shape
    g = torch.Generator().manual_seed(1)
    state["module.ctx"] = (torch.randn(contexts or len(names), n_ctx, dim, generator=g) * 0.02).to(dtype)
    return state


def _tiny_sidecar(folder: Path, **cfg: Any) -> Path:
    return _sidecar(folder, backbone={"name": "RN50"}, image_size=32, **cfg)  # replaced by --backbone BACKBONE


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_convert_coop_class_specific_ctx(tmp_path: Path, dtype: torch.dtype) -> None:
    """CoOp with CSC True stores one context per class, [K, n_ctx, d]: kept as is, marked csc."""
    state = csc_state(["a", "b", "c"], dtype)
    ckpt = save_dassl(tmp_path, state)
    side = _tiny_sidecar(tmp_path, classnames=["a", "b", "c"], class_token_position="middle")
    out = tmp_path / "out"
    manifest = convert_checkpoint(ckpt, side, out, backbone=BACKBONE).manifest
    assert (manifest.kind, manifest.csc, manifest.n_ctx) == (ModelKind.COOP, True, 4)
    assert manifest.class_token_position == ClassTokenPosition.MIDDLE
    assert read_manifest(out) == manifest
    weights = load_file(str(out / WEIGHTS_NAME))
    assert weights["ctx"].dtype == dtype and torch.equal(weights["ctx"], state["module.ctx"])


def test_convert_class_specific_ctx_needs_one_context_per_class(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path, csc_state(["a", "b"], contexts=3))
    side = _tiny_sidecar(tmp_path, classnames=["a", "b"])
    parent = tmp_path / "models"
    with pytest.raises(ModelFormatError, match="class-specific contexts for 3 classes, but the model has 2 class names"):
        convert_checkpoint(ckpt, side, parent / "out", backbone=BACKBONE)
    assert not (parent / "out").exists()
    assert not parent.exists() or not any(parent.iterdir())


def test_convert_refuses_coop_options_on_cocoop(tmp_path: Path) -> None:
    ckpt = save_dassl(tmp_path / "a", csc_state(["a", "b", "c"], meta=True))
    side = _tiny_sidecar(tmp_path, classnames=["a", "b", "c"])
    with pytest.raises(ModelFormatError, match=r"class-specific contexts \(CSC\) are a CoOp option"):
        convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE)
    ckpt = save_dassl(tmp_path / "b", real_state(["a", "b"]))
    for position in ("middle", "front"):
        side = _tiny_sidecar(tmp_path, classnames=["a", "b"], class_token_position=position)
        with pytest.raises(UsageError, match=f"class_token_position '{position}' is a CoOp option; cocoop"):
            convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE)
    side = _tiny_sidecar(tmp_path, classnames=["a", "b"], class_token_position="sideways")
    with pytest.raises(UsageError, match="class_token_position"):
        convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE)
    assert not (tmp_path / "out").exists()


def test_convert_bounds_the_prompt_learner_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What convert writes, load_model reads: no prompt learner over the folder's bound."""
    import gatekeeper.models.checkpoint as checkpoint

    state = csc_state(["a", "b", "c"])
    numel = state["module.ctx"].numel()
    monkeypatch.setattr(checkpoint, "MAX_PROMPT_LEARNER_BYTES", numel * 2)
    ckpt = save_dassl(tmp_path, state)
    side = _tiny_sidecar(tmp_path, classnames=["a", "b", "c"])
    with pytest.raises(ModelFormatError, match=f"would take {numel * 4} bytes as fp32") as refused:
        convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE)
    assert refused.value.hint == "set precision: fp16"
    side = _tiny_sidecar(tmp_path, classnames=["a", "b", "c"], precision="fp16")
    assert convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE).manifest.csc


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


# --- the sidecar is untrusted input too ---------------------------------------------------------


def _convert_with(tmp_path: Path, sidecar_text: str) -> Any:
    ckpt = save_dassl(tmp_path, real_state(["cat", "dog"], meta=False))
    side = tmp_path / "side" / "sidecar.yaml"
    side.parent.mkdir(exist_ok=True)
    side.write_text(sidecar_text, encoding="utf-8")
    return convert_checkpoint(ckpt, side, tmp_path / "out", backbone=BACKBONE).manifest


def _usage_error(tmp_path: Path, sidecar_text: str, match: str) -> UsageError:
    with pytest.raises(UsageError, match=match) as info:
        _convert_with(tmp_path, sidecar_text)
    assert exit_code_for(info.value) == ExitCode.USAGE
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    assert not (tmp_path / "out").exists()
    return info.value


BB = "backbone: {name: RN50, pretrained: openai}\n"


@pytest.mark.parametrize(
    "value",
    ["/etc/passwd", "../secret.txt", "sub/../../secret.txt", "C:\\\\secret.txt"],
    ids=["abs", "up", "up2", "drive"],
)
def test_classnames_file_must_stay_in_the_sidecar_folder(tmp_path: Path, value: str) -> None:
    (tmp_path / "secret.txt").write_text("root\nadmin\n", encoding="utf-8")
    _usage_error(tmp_path, f'{BB}classnames_file: "{value}"\n', "classnames_file")


def test_classnames_file_symlinks(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("root\nadmin\n", encoding="utf-8")
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "out.txt").symlink_to(tmp_path / "secret.txt")
    _usage_error(tmp_path, f"{BB}classnames_file: out.txt\n", "resolves outside")
    (tmp_path / "side" / "real.txt").write_text("cat\ndog\n", encoding="utf-8")
    (tmp_path / "side" / "in.txt").symlink_to("real.txt")  # a link that stays inside is fine
    assert _convert_with(tmp_path, f"{BB}classnames_file: in.txt\n").classnames == ("cat", "dog")


@pytest.mark.parametrize("kind", ["folder", "fifo", "large", "binary", "missing"])
def test_classnames_file_must_be_a_small_utf8_file(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "side" / "names.txt"
    target.parent.mkdir()
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)  # opening it for reading must not block
    elif kind == "large":
        target.write_text("cat\n" * 300_000, encoding="utf-8")
    elif kind == "binary":
        target.write_bytes(b"cat\n\xff\xfe\n")
    needle = {
        "folder": "regular file",
        "fifo": "regular file",
        "large": "1 MiB",
        "binary": "UTF-8",
        "missing": "cannot",
    }
    _usage_error(tmp_path, f"{BB}classnames_file: names.txt\n", needle[kind])


@pytest.mark.parametrize(
    ("classnames", "needle"),
    [
        (["cat", "dog\x1b[2J"], "control character"),
        (["cat", "dog\u202e"], "control character"),  # a bidi override
        (["cat", "d" * 201], "longer than 200"),
        ([f"c{i}" for i in range(10_001)], "more than 10000"),
        (["cat", "cat "], "duplicates"),  # names are stripped first
        (["cat", 3], "list of strings"),
    ],
    ids=["escape", "bidi", "long", "many", "dup-after-strip", "not-str"],
)
def test_inline_classnames_are_checked(tmp_path: Path, classnames: list[Any], needle: str) -> None:
    err = _usage_error(tmp_path, f"{BB}classnames: {json.dumps(classnames)}\n", needle)
    assert "\x1b" not in str(err) and "\u202e" not in str(err)


def test_classnames_file_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "names.txt").write_text("cat\ndog\x0cfish\n", encoding="utf-8")
    _usage_error(tmp_path, f"{BB}classnames_file: names.txt\n", "control character")
    (tmp_path / "side" / "names.txt").write_text("\ufeff cat \r\ndog\r\n\r\n", encoding="utf-8")  # BOM, CRLF
    assert _convert_with(tmp_path, f"{BB}classnames_file: names.txt\n").classnames == ("cat", "dog")


def test_sidecar_yaml_is_bounded(tmp_path: Path) -> None:
    laughs = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, 8):
        laughs += f"{'abcdefgh'[i]}: &{'abcdefgh'[i]} [{', '.join(['*' + 'abcdefgh'[i - 1]] * 10)}]\n"
    _usage_error(tmp_path, BB + "classnames: [a, b]\n" + laughs, "expands to more than")
    _usage_error(tmp_path, BB + "classnames: [a, b]\nclassnames: [c, d]\n", "duplicate key")
    _usage_error(tmp_path, BB + "classnames: [a, b]\n# " + "x" * 2**20 + "\n", "larger than")
    _usage_error(tmp_path, BB + "classnames: [a, b\n", "not valid YAML")


def test_sidecar_errors_quote_a_short_prefix(tmp_path: Path) -> None:
    err = _usage_error(tmp_path, BB + "classnames: [a, b]\n? " + "k" * 5000 + "\n: 1\n", "unknown sidecar key")
    assert "k" * 100 not in str(err)
    err = _usage_error(tmp_path, BB + "classnames: [a, b]\nimage_size: '" + "9" * 5000 + "'\n", "image_size")
    assert "9" * 100 not in str(err)
    err = _usage_error(tmp_path, "backbone: {name: '" + "n" * 5000 + "'}\nclassnames: [a, b]\n", "backbone")
    assert "n" * 100 not in str(err)


def test_truncated_zip_is_not_called_a_non_checkpoint(tmp_path: Path) -> None:
    path = save_dassl(tmp_path, dassl_state())
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ModelFormatError, match="truncated or corrupt zip"):
        sniff_format(path)
