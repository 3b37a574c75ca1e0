"""Load torch pickles from untrusted providers without running their code (used for Dassl checkpoints).

A Dassl checkpoint (``prompt_learner/model.pth.tar-N``) is a torch.save pickle from an
untrusted provider: ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``.
Only ``state_dict`` is kept, but the rest must be read past, and ``scheduler`` is not plain
data: every CoOp config uses a warmup, and Dassl's ``ConstantWarmupScheduler`` /
``LinearWarmupScheduler`` keep the wrapped scheduler in ``successor``, so
``scheduler.state_dict()`` holds a pickled ``torch.optim.lr_scheduler.CosineAnnealingLR``
instance, which holds its ``torch.optim.sgd.SGD`` (whose ``state`` is a
``collections.defaultdict(dict)``).

Before torch.load ever sees the file, every pickle in it is walked statically with
:mod:`pickletools` (nothing is unpickled) and each global it references falls in one of
three classes:

(a) :data:`ALLOWED_GLOBALS`: tensor rebuild functions, storage types, dtypes and the
    dict classes of a state dict. torch's weights_only unpickler resolves these to the
    real objects (they are in its own default allow-list), so the tensors load for real.
(b) :data:`OPAQUE_GLOBALS`: a short, explicit list of optimizer / LR-scheduler classes
    and their helper containers, the training state a Dassl checkpoint carries next to the
    weights. They are never imported nor called: for the load, each name is mapped (with
    ``torch.serialization.safe_globals`` and its ``(obj, "module.qualname")`` form, which
    binds a *name* to an object of our choosing) to an inert stand-in defined here, an
    :class:`OpaqueObject` subclass (``defaultdict``: an empty plain dict, see
    :class:`_OpaqueDefaultDict`). The unpickler then only ever calls ``__new__``,
    ``__init__`` and ``__setstate__`` of those stand-ins, which keep the pickled state as
    inert data and run nothing else; the real ``SGD``, ``CosineAnnealingLR`` or Dassl
    classes (provider code, in Dassl's case) are not touched.
(c) anything else (``os.system``, ``builtins.exec``, ``functools.partial``, ``numpy``
    functions, extension codes, ...): the whole file is refused with
    :class:`~gatekeeper.errors.UnsafeCheckpointError`, wherever in the file it hides,
    including inside the optimizer or scheduler state.

Then the file is loaded with ``torch.load(weights_only=True)`` (on a torch recent enough for
that to hold), which re-checks every global against (a) plus the stand-ins of (b).
"""

from __future__ import annotations

import _compat_pickle
import io
import logging
import pickletools
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from gatekeeper.errors import ModelFormatError, UnsafeCheckpointError

log = logging.getLogger(__name__)


ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        # What torch.save emits for a state dict of plain tensors and nothing more:
        "torch._utils._rebuild_tensor_v2",  # every tensor (current torch.save)
        "torch._utils._rebuild_tensor",  # tensors in old (torch < 0.4) legacy checkpoints
        "torch._utils._rebuild_parameter",  # an nn.Parameter saved as such (e.g. a raw ``ctx``)
        # storage types named in the persistent id of each tensor's storage; inert classes
        "torch.FloatStorage",
        "torch.HalfStorage",
        "torch.BFloat16Storage",
        "torch.DoubleStorage",
        "torch.LongStorage",  # e.g. optimizer step counters
        "torch.IntStorage",
        "torch.ByteStorage",
        "torch.BoolStorage",
        "torch.storage.UntypedStorage",
        "torch.float16",  # dtype singletons, may appear in storage metadata
        "torch.float32",
        "collections.OrderedDict",  # module.state_dict() is an OrderedDict (with _metadata)
        # MultiStepLR.milestones (Dassl's multi_step scheduler). torch's weights_only unpickler
        # resolves it to the real Counter whatever we register (its default allow-list wins),
        # so it cannot be stubbed; it is a stdlib dict subclass whose constructor only counts.
        "collections.Counter",
        # builtins.set/frozenset/tuple/list/slice are deliberately absent: the pickle opcodes
        # build those containers natively and no Dassl checkpoint needs them (builtins.dict is
        # opaque, below: it only appears as a defaultdict's default factory).
    }
)
OPAQUE_GLOBALS: frozenset[str] = frozenset(
    {
        # Training state next to the weights, derived by torch.save-ing a Dassl checkpoint built
        # as Dassl's build_optimizer / build_lr_scheduler do (torch 2.15) and listing its globals:
        # the warmup scheduler's ``successor`` pickles as the wrapped scheduler instance, which
        # holds the optimizer instance, whose ``state`` is a defaultdict(dict). Each name maps to
        # an inert stand-in (:data:`_OPAQUE_STUBS`); none of these is ever imported or called.
        "torch.optim.sgd.SGD",  # Dassl's OPTIM.NAME: sgd (every CoOp/CoCoOp config) ...
        "torch.optim.adam.Adam",  # ... adam, amsgrad
        "torch.optim.adamw.AdamW",  # ... adamw
        "torch.optim.rmsprop.RMSprop",  # ... rmsprop
        "torch.optim.lr_scheduler.CosineAnnealingLR",  # LR_SCHEDULER: cosine (every CoOp config)
        "torch.optim.lr_scheduler.StepLR",  # single_step
        "torch.optim.lr_scheduler.MultiStepLR",  # multi_step (its milestones: collections.Counter)
        "torch.optim.lr_scheduler.ExponentialLR",
        "torch.optim.lr_scheduler.LambdaLR",  # its lr_lambdas are functions: other globals, refused
        # Dassl's warmup wrappers: scheduler.state_dict() is a plain dict so their names do not
        # appear in a Dassl checkpoint, but they do where the scheduler object itself is saved.
        "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
        "dassl.optim.lr_scheduler.LinearWarmupScheduler",
        "collections.defaultdict",  # Optimizer.state is defaultdict(dict) ...
        "builtins.dict",  # ... whose default factory pickles as the global builtins.dict
        # Never here: anything that calls or resolves something given to it (builtins.getattr,
        # eval, exec, functools.partial, operator.*, copyreg.*, torch.load, torch._C.*, numpy
        # functions, os.*, subprocess.*) nor Dassl's RAdam (provider code that no CoOp config uses).
    }
)
_ALLOWED_PAIRS = frozenset(tuple(g.rsplit(".", 1)) for g in ALLOWED_GLOBALS)
_OPAQUE_PAIRS = frozenset(tuple(g.rsplit(".", 1)) for g in OPAQUE_GLOBALS)
_HINT = "the checkpoint may run code when loaded; re-export only the state_dict tensors with safetensors"
_LEGACY_PICKLES = 5  # legacy torch.save: magic, protocol, sys_info, object, storage keys
_MAX_PKL = 256 * 2**20


class _Mark:
    """A MARK on the symbolic pickle stack."""


_MARK, _UNKNOWN = _Mark(), object()


class OpaqueObject:
    """Inert stand-in for a training-state object (optimizer, LR scheduler) of a checkpoint.

    Every name in :data:`OPAQUE_GLOBALS` (but ``collections.defaultdict``) is bound, for the
    load only, to its own subclass of this class, our code and not the provider's. Whatever
    the pickle does with it (NEWOBJ: ``cls.__new__(cls, *args)``; REDUCE: ``cls(*args)``;
    BUILD: ``inst.__setstate__(state)``), the arguments are discarded and the BUILD state is
    kept as data in :attr:`state`: no method of the real class runs, nothing is imported,
    and nothing given by the pickle is ever called.
    """

    qualname: ClassVar[str] = ""  # the pickled global this subclass stands for
    state: Any = None  # the last BUILD state (tensors, numbers, dicts, other stand-ins)

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class: keep nothing
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


class _OpaqueDefaultDict:
    """Stand-in for ``collections.defaultdict``: constructing it gives an empty plain dict.

    The default factory (also opaque) is dropped. It cannot be an :class:`OpaqueObject`:
    torch's weights_only unpickler only runs SETITEM(S), which fills a defaultdict, on an
    object whose type is exactly dict, OrderedDict or Counter.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> dict[Any, Any]:  # type: ignore[misc]
        return {}


def _stub(name: str) -> type:
    if name == "collections.defaultdict":
        return _OpaqueDefaultDict
    return type(f"Opaque[{name}]", (OpaqueObject,), {"qualname": name, "__module__": __name__})


_OPAQUE_STUBS: dict[str, type] = {name: _stub(name) for name in sorted(OPAQUE_GLOBALS)}
_LOAD_LOCK = threading.Lock()  # safe_globals edits torch's process-wide allow-list


def sniff_format(path: Path) -> str:
    """Recognise a weights file by its content, whatever its name.

    Args:
        path: the file.
    Returns:
        ``"safetensors"``, ``"torch-zip"`` or ``"pickle"`` (legacy torch.save).
    Raises:
        ModelFormatError: missing, unreadable, or none of these formats.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read ({exc.strerror})", "check the path") from None
    if len(head) == 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("/data.pkl") for n in zf.namelist()):
                    return "torch-zip"
        except (zipfile.BadZipFile, OSError):
            pass
        raise ModelFormatError(f"{path}: a zip file but not a torch checkpoint (no */data.pkl)", "give model.pth.tar-N")
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:  # PROTO 1..5
        return "pickle"
    raise ModelFormatError(
        f"{path}: not a safetensors, torch zip or torch pickle file", "give the prompt_learner/model.pth.tar-N file"
    )


def _scan(stream: IO[bytes]) -> tuple[set[str], list[str]]:
    """Walk one pickle from ``stream`` symbolically: (globals referenced, offending items)."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    found: set[str] = set()
    bad: list[str] = []
    proto = 0

    def pop_to_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise ValueError("no MARK on the stack")

    def add(module: Any, name: Any) -> None:
        if not (isinstance(module, str) and isinstance(name, str)):
            bad.append("<STACK_GLOBAL with a computed name>")
            return
        if proto < 3:  # the unpickler's fix_imports mapping for Python 2 names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}" if "." not in name else f"{module}:{name}"
        found.add(full)
        if (module, name) not in _ALLOWED_PAIRS and (module, name) not in _OPAQUE_PAIRS:
            bad.append(full)

    frame_end = -1
    for op, arg, pos in pickletools.genops(stream):
        name = op.name
        if name == "FRAME" and isinstance(arg, int) and pos is not None:
            frame_end = pos + 9 + arg  # opcode byte + 8-byte length
        elif name == "PROTO":
            proto = arg if isinstance(arg, int) else 0
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _UNKNOWN))
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("GLOBAL", "INST"):
            if name == "INST":
                pop_to_mark()
            module, _, member = str(arg).partition(" ")  # genops gives "module name"
            add(module, member)
            stack.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            member, module = stack.pop(), stack.pop()
            add(module, member)
            stack.append(_UNKNOWN)
        elif name in ("EXT1", "EXT2", "EXT4"):
            bad.append(f"<{name} extension code {arg}>")  # copyreg registry: an arbitrary global
            stack.append(_UNKNOWN)
        elif name == "BINPERSID":  # torch's convention: ("storage", type, key, location, numel, ...)
            pid = stack.pop()
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                bad.append("<BINPERSID that is not a torch storage reference>")
            stack.append(_UNKNOWN)
        elif name == "PERSID":
            bad.append(f"<PERSID {arg!r}>")
            stack.append(_UNKNOWN)
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}.get(name)
            items = pop_to_mark() if n is None else [stack.pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif op.stack_after == [pickletools.pyunicode] or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            stack.append(arg)
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                stack.pop()
            stack.extend(_MARK if s is pickletools.markobject else _UNKNOWN for s in op.stack_after)
    if frame_end > stream.tell():  # unpicklers consume whole frames: the next pickle would start elsewhere
        raise ValueError("the last frame extends past STOP")
    return found, bad


def scan_pickle(data: bytes) -> set[str]:
    """Statically list the globals one pickle references, refusing anything off the two lists.

    Never unpickles: opcodes are walked with :func:`pickletools.genops` on a symbolic stack
    (strings, tuples and the memo are tracked so STACK_GLOBAL names are recovered).

    Args:
        data: the pickle bytes (e.g. a torch zip's ``data.pkl``).
    Returns:
        The ``module.name`` globals referenced, all in :data:`ALLOWED_GLOBALS` (loaded for
        real) or :data:`OPAQUE_GLOBALS` (loaded as inert stand-ins).
    Raises:
        UnsafeCheckpointError: a global in neither list, an extension code (EXT1/2/4),
            PERSID, a BINPERSID that is not a torch storage, or an unresolvable STACK_GLOBAL.
        ModelFormatError: the bytes are not a well-formed pickle.
    """
    return _check(io.BytesIO(data), "pickle")


def _check(stream: IO[bytes], where: str) -> set[str]:
    try:
        found, bad = _scan(stream)
    except Exception as exc:  # genops/stack errors: fail closed
        raise ModelFormatError(f"{where}: malformed pickle ({exc})", "the checkpoint is corrupt") from None
    if bad:
        offending = tuple(sorted(set(bad)))
        raise UnsafeCheckpointError(
            f"{where}: refused, the pickle references {', '.join(offending)}", _HINT, globals_found=offending
        )
    return found


def _require_safe_torch() -> None:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if m is None or (int(m[1]), int(m[2])) < (2, 10):
        raise UnsafeCheckpointError(
            f"torch {torch.__version__} cannot load pickles safely (weights_only is bypassable before 2.10: "
            "CVE-2025-32434, CVE-2026-24747)",
            "upgrade torch to >= 2.10",
        )


def _scan_zip(path: Path) -> None:
    """Scan every ``*.pkl`` member (torch unpickles ``<archive>/data.pkl``) of a torch zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.lower() for n in zf.namelist()]  # torch's reader (miniz) matches names case-insensitively
            if len(set(names)) != len(names):  # zipfile and torch's reader could pick different copies
                raise ModelFormatError(f"{path}: zip with duplicate member names", "the checkpoint is corrupt")
            for info in zf.infolist():
                if info.filename.lower().endswith(".pkl"):
                    if info.file_size > _MAX_PKL:
                        raise ModelFormatError(f"{path}: {info.filename} is implausibly large")
                    _check(io.BytesIO(zf.read(info)), f"{path}:{info.filename}")
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, zlib.error) as exc:
        raise ModelFormatError(f"{path}: unreadable zip ({exc})", "the checkpoint is corrupt") from None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with each opaque name bound to its inert stand-in."""
    stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(s, n) for n, s in _OPAQUE_STUBS.items()]
    with _LOAD_LOCK, torch.serialization.safe_globals(stubs):
        # add_safe_globals elsewhere in this process could bind one of our names to the real
        # class as well; torch would then pick either, so refuse rather than guess.
        for entry in torch.serialization.get_safe_globals():
            obj, name = entry if isinstance(entry, tuple) else (entry, _qualified(entry))
            if name in _OPAQUE_STUBS and obj is not _OPAQUE_STUBS[name]:
                raise UnsafeCheckpointError(
                    f"{path}: refused, {name} is registered with torch.serialization.add_safe_globals in this "
                    "process, so the load could construct the real class instead of an inert stand-in",
                    "load checkpoints in a process that does not call add_safe_globals for optimizers/schedulers",
                    globals_found=(name,),
                )
        return torch.load(path, map_location="cpu", weights_only=True)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def read_torch_checkpoint(path: Path) -> Any:
    """Scan, then load, a torch.save file (zip or legacy) whole, without running its code.

    Tensors load for real; optimizer / scheduler objects come back as :class:`OpaqueObject`
    stand-ins (their pickled state in ``.state``) and defaultdicts as plain dicts.

    Args:
        path: a torch zip or legacy torch.save file.
    Returns:
        The unpickled object (for a Dassl checkpoint, the dict holding ``state_dict``).
    Raises:
        UnsafeCheckpointError: torch < 2.10, or a global in neither :data:`ALLOWED_GLOBALS`
            nor :data:`OPAQUE_GLOBALS`.
        ModelFormatError: not a torch.save file, corrupt, or torch.load failed.
    """
    _require_safe_torch()
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "torch-zip":
        _scan_zip(path)
    elif fmt == "pickle":
        if tarfile.is_tarfile(path):
            raise ModelFormatError(f"{path}: pre-0.4 tar checkpoints are unsupported", "re-save with torch.save")
        with path.open("rb") as f:
            for _ in range(_LEGACY_PICKLES):
                _check(f, str(path))
    else:
        raise ModelFormatError(f"{path}: a {fmt} file, not a torch.save pickle")
    try:
        return _torch_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"{path}: torch.load failed ({str(exc)[:300]})", "the checkpoint is corrupt") from None
