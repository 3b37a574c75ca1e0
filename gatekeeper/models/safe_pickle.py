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

A torch zip has one reader and one truth. Python's :mod:`zipfile` (which the scan reads with)
and torch's miniz do not locate an archive the same way (zipfile tolerates data before the
archive and takes the Zip64 record right before its locator; miniz takes offsets as absolute
and follows the locator), so one file can hold an archive for each. The layout is therefore
checked first (:func:`_zip_layout`): the end record is the file's last 22 bytes (after the
Zip64 record and locator torch.save writes), the members' local headers, data and data
descriptors tile the file from offset 0 up to the central directory with no gap, overlap or
duplicate name, and every local header repeats its central entry; anything else is
"ambiguous". Then every member is read once with zipfile, the ``.pkl`` members are scanned
from those very bytes, and the same bytes are written to a fresh archive in a temporary file
that is what torch.load reads: tensors can only come from the pickle that was scanned.

The scan is bounded (a pickle of no-op opcodes must not cost minutes): each pickle
(:data:`_MAX_PKL`), all pickles of a file (:data:`_MAX_PKL_TOTAL`), opcodes
(:data:`_MAX_OPS`) and wall time (:data:`_SCAN_SECONDS`); no tensor storage may declare more
elements than the file has bytes (torch allocates it from that count); a zip member must be stored
uncompressed, as torch.save writes them (no zip bomb), and the archive is at most
:data:`_MAX_ARCHIVE`.
"""

from __future__ import annotations

import _compat_pickle
import io
import logging
import os
import pickle
import pickletools
import re
import shutil
import struct
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from gatekeeper.errors import ModelFormatError, UnsafeCheckpointError
from gatekeeper.untrusted import inert

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
_TORCH_HINT = "re-export only the state_dict tensors as a safetensors file and convert that file"
_CORRUPT = "the checkpoint is corrupt; download it again or re-save it with torch.save"
_LEGACY_PICKLES = 5  # legacy torch.save: magic, protocol, sys_info, object, storage keys
_MAX_PKL = 8 * 2**20  # one pickle: a Dassl data.pkl is a few KB
_MAX_PKL_TOTAL = 32 * 2**20  # all the pickles of one file
_MAX_OPS = 1_000_000  # pickle opcodes over one file: a Dassl checkpoint has a few thousand
_SCAN_SECONDS = 10.0  # wall time of the static scan of one file
_MAX_ARCHIVE = 2 * 2**30  # a checkpoint file (zip members or legacy file): Dassl's are KB to MB
_MAX_MEMBERS = 65_535  # zip members (torch.save: one per tensor storage, plus 5 records)
_MAX_CENTRAL = 16 * 2**20  # bytes of the zip central directory


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
        ModelFormatError: missing, unreadable, a truncated or corrupt zip, or none of these formats.
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
                names = zf.namelist()
        except Exception as exc:  # BadZipFile, EOFError, struct/seek errors on a cut file: fail closed
            raise ModelFormatError(f"{path}: truncated or corrupt zip ({inert(exc, 160)})", _CORRUPT) from None
        if any(n.lower().endswith("/data.pkl") for n in names):  # torch's reader ignores case
            return "torch-zip"
        raise ModelFormatError(f"{path}: a zip file but not a torch checkpoint (no */data.pkl)", "give model.pth.tar-N")
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:  # PROTO 1..5
        return "pickle"
    raise ModelFormatError(
        f"{path}: not a safetensors, torch zip or torch pickle file", "give the prompt_learner/model.pth.tar-N file"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class _Budget:
    """What the static scan of one file may still spend (opcodes, wall time), and how large a storage may be."""

    def __init__(self, where: str, file_size: int | None = None) -> None:
        self.where = where
        self.ops = 0
        self.deadline = time.monotonic() + _SCAN_SECONDS
        # a storage holds at least one byte per element, all of them in the file
        self.max_numel = _MAX_ARCHIVE if file_size is None else file_size

    def refuse(self, what: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.where}: refused, {what}",
            "a Dassl checkpoint's pickles are a few KB; re-export only the state_dict tensors with safetensors",
        )

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.refuse(f"the static pickle scan exceeded its time budget ({_SCAN_SECONDS:g} s)")


def _scan(stream: IO[bytes], budget: _Budget) -> tuple[set[str], list[str]]:
    """Walk one pickle from ``stream`` symbolically: (globals referenced, offending items)."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    found: set[str] = set()
    bad: list[str] = []
    proto = 0
    start, max_ops, max_bytes = stream.tell(), _MAX_OPS, _MAX_PKL

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
        budget.ops += 1
        if budget.ops > max_ops:
            raise budget.refuse(f"the pickles exceed the opcode limit ({max_ops} opcodes)")
        if pos is not None and pos - start > max_bytes:
            raise budget.refuse(f"a pickle exceeds the per-pickle size limit ({_mib(max_bytes)})")
        if not budget.ops & 0xFFF:
            budget.check_time()
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
            elif len(pid) > 4 and isinstance(pid[4], int) and pid[4] > budget.max_numel:
                # torch allocates the storage from this count before reading its bytes
                raise budget.refuse(f"a tensor storage declares {pid[4]} elements, more than the file holds")
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
        elif op.stack_after in ([pickletools.pyint], [pickletools.pylong], [pickletools.pyinteger_or_bool]):
            stack.append(arg)  # a storage's element count, see BINPERSID
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                stack.pop()
            stack.extend(_MARK if s is pickletools.markobject else _UNKNOWN for s in op.stack_after)
    if stream.tell() - start > max_bytes:  # one opcode whose argument alone is too large
        raise budget.refuse(f"a pickle exceeds the per-pickle size limit ({_mib(max_bytes)})")
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
        ModelFormatError: the bytes are not a well-formed pickle, or the pickle is over the
            size (:data:`_MAX_PKL`), opcode (:data:`_MAX_OPS`) or time (:data:`_SCAN_SECONDS`) limit.
    """
    budget = _Budget("pickle")
    if len(data) > _MAX_PKL:
        raise budget.refuse(f"a pickle exceeds the per-pickle size limit ({_mib(_MAX_PKL)})")
    return _check(io.BytesIO(data), "pickle", budget)


def _check(stream: IO[bytes], where: str, budget: _Budget) -> set[str]:
    budget.check_time()
    try:
        found, bad = _scan(stream, budget)
    except ModelFormatError:
        raise
    except Exception as exc:  # genops/stack errors: fail closed
        raise ModelFormatError(f"{where}: malformed pickle ({inert(exc, 160)})", "the checkpoint is corrupt") from None
    if bad:
        offending = tuple(sorted({inert(b, 200) for b in bad}))
        shown = ", ".join(offending[:8]) + (f" and {len(offending) - 8} more" if len(offending) > 8 else "")
        raise UnsafeCheckpointError(f"{where}: refused, the pickle references {shown}", _HINT, globals_found=offending)
    return found


def _require_safe_torch() -> None:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if m is None or (int(m[1]), int(m[2])) < (2, 10):
        raise UnsafeCheckpointError(
            f"torch {torch.__version__} cannot load pickles safely (weights_only is bypassable before 2.10: "
            "CVE-2025-32434, CVE-2026-24747)",
            "upgrade torch to >= 2.10",
        )


# Zip records (APPNOTE.TXT 4.3): end of central directory, Zip64 locator and end record,
# central directory header, local file header, data descriptor (32- and 64-bit sizes).
_EOCD = struct.Struct("<4s4H2LH")
_Z64_LOCATOR = struct.Struct("<4sLQL")
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_DESCRIPTOR32 = struct.Struct("<4s3L")
_DESCRIPTOR64 = struct.Struct("<4sLQQ")
_AMBIGUOUS_HINT = "zip readers could disagree on its content; re-save the checkpoint with torch.save"


@dataclass(frozen=True)
class _Member:
    """One zip member, as its central directory entry and its local header both describe it."""

    name: str
    raw_name: bytes
    flags: int
    offset: int  # of the local header
    size: int  # stored: compressed and uncompressed sizes are equal
    crc: int


def _ambiguous(where: str, what: str) -> ModelFormatError:
    return ModelFormatError(f"{where}: ambiguous zip: {what}", _AMBIGUOUS_HINT)


def _corrupt(where: str, what: str) -> ModelFormatError:
    return ModelFormatError(f"{where}: truncated or corrupt zip: {what}", _CORRUPT)


def _read_at(f: IO[bytes], offset: int, n: int, where: str) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise _corrupt(where, f"the file ends inside a record at offset {offset}")
    return data


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int, where: str, label: str) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, local header offset), completed from a Zip64 extra field."""
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            values, j, out = extra[i + 4 : i + 4 + n], 0, []
            for v in (usize, csize, offset):
                if v == 0xFFFFFFFF:
                    if j + 8 > len(values):
                        break
                    v = int.from_bytes(values[j : j + 8], "little")
                    j += 8
                out.append(v)
            else:
                return out[0], out[1], out[2]
        i += 4 + n
    raise _corrupt(where, f"member {label} has Zip64 sizes but no Zip64 extra field holding them")


def _zip_layout(f: IO[bytes], size: int, where: str) -> list[_Member]:
    """Check that ``f`` holds exactly one zip archive, laid out with no room for a second one.

    The end record is the last 22 bytes (no comment), preceded by the Zip64 end record and
    locator when there are some (torch.save always writes them); the central directory ends
    where those begin; the members' local headers, stored data and data descriptors tile the
    file from offset 0 up to the central directory; each local header repeats the name, flags,
    method and (unless a data descriptor follows) CRC and sizes of its central entry; names
    are unique ignoring case (torch's reader matches them so) and hold no NUL (zipfile cuts
    them there). Members must be stored (torch.save never compresses), so the sizes declared
    are the bytes on disk and no member can inflate; their total and the pickles' sizes are
    bounded before anything is read.

    Returns:
        The members in central directory order.
    Raises:
        ModelFormatError: "ambiguous zip", "truncated or corrupt zip", or a size limit.
    """
    if size > _MAX_ARCHIVE:
        raise ModelFormatError(f"{where}: refused, {size} bytes is over the archive size limit ({_mib(_MAX_ARCHIVE)})")
    if size < _EOCD.size:
        raise _corrupt(where, "shorter than an end-of-central-directory record")
    end = size - _EOCD.size
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_off, comment = _EOCD.unpack(_read_at(f, end, _EOCD.size, where))
    if sig != b"PK\x05\x06" or comment:
        raise _ambiguous(
            where,
            "the end-of-central-directory record is not the last 22 bytes (a zip comment or data after the archive)",
        )
    if disk or cd_disk or n_disk != n_total:
        raise _ambiguous(where, "a multi-disk archive")
    if end >= _Z64_LOCATOR.size + _Z64_EOCD.size and _read_at(f, end - _Z64_LOCATOR.size, 4, where) == b"PK\x06\x07":
        _, loc_disk, record, disks = _Z64_LOCATOR.unpack(_read_at(f, end - _Z64_LOCATOR.size, _Z64_LOCATOR.size, where))
        end -= _Z64_LOCATOR.size + _Z64_EOCD.size
        if loc_disk or disks != 1 or record != end:
            raise _ambiguous(
                where, f"the Zip64 locator points at offset {record}, not at the Zip64 end record before it"
            )
        (rsig, rsize, _, _, rdisk, rcd_disk, rn_disk, rn_total, rcd_size, rcd_off) = _Z64_EOCD.unpack(
            _read_at(f, end, _Z64_EOCD.size, where)
        )
        if rsig != b"PK\x06\x06" or rsize != _Z64_EOCD.size - 12 or rdisk or rcd_disk or rn_disk != rn_total:
            raise _ambiguous(where, "a malformed Zip64 end record")
        for small, big, sentinel in (
            (n_total, rn_total, 0xFFFF),
            (cd_size, rcd_size, 0xFFFFFFFF),
            (cd_off, rcd_off, 0xFFFFFFFF),
        ):
            if small not in (big, sentinel):
                raise _ambiguous(where, "the end record and the Zip64 end record disagree")
        n_total, cd_size, cd_off = rn_total, rcd_size, rcd_off
    if not 0 < n_total <= _MAX_MEMBERS or cd_size > _MAX_CENTRAL:
        raise _corrupt(where, f"{n_total} members in a {cd_size}-byte central directory")
    if cd_off + cd_size != end:
        raise _ambiguous(
            where,
            f"the central directory ({cd_size} bytes at offset {cd_off}) does not end where the end records start ({end})",
        )
    central = _read_at(f, cd_off, cd_size, where)
    members: list[_Member] = []
    seen: set[str] = set()
    pos = total = pickles = 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > len(central):
            raise _ambiguous(where, "the central directory holds fewer entries than the end record counts")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _, offset) = (
            _CENTRAL.unpack_from(central, pos)
        )
        raw = central[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        extra = central[pos + _CENTRAL.size + nlen : pos + _CENTRAL.size + nlen + elen]
        pos += _CENTRAL.size + nlen + elen + clen
        if sig != b"PK\x01\x02" or pos > len(central):
            raise _corrupt(where, f"a bad central directory entry at offset {cd_off + pos}")
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")  # as zipfile decodes it
        except UnicodeDecodeError:
            raise _corrupt(where, f"member name {inert(raw, 120)} is not UTF-8") from None
        label = inert(name, 120)
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset, where, label)
        if not name or "\x00" in name:
            raise _ambiguous(where, f"member name {label} is empty or holds a NUL byte")
        if disk:
            raise _ambiguous(where, f"member {label} is on another disk")
        if flags & 0x41:
            raise ModelFormatError(f"{where}: member {label} is encrypted", "re-save the checkpoint with torch.save")
        if method != zipfile.ZIP_STORED or csize != usize:
            raise ModelFormatError(
                f"{where}: refused, member {label} is compressed (method {method}, {csize} -> {usize} bytes); "
                "torch.save stores members uncompressed",
                "re-save the checkpoint with torch.save",
            )
        key = name.lower()
        if key in seen:
            raise _ambiguous(where, f"duplicate member name {label} (torch's reader ignores case)")
        seen.add(key)
        total += usize
        if total > _MAX_ARCHIVE:
            raise ModelFormatError(
                f"{where}: refused, the members exceed the archive size limit ({_mib(_MAX_ARCHIVE)})"
            )
        if key.endswith(".pkl"):
            pickles += usize
            if usize > _MAX_PKL:
                raise _Budget(where).refuse(
                    f"member {label} is a {usize}-byte pickle, over the per-pickle size limit ({_mib(_MAX_PKL)})"
                )
            if pickles > _MAX_PKL_TOTAL:
                raise _Budget(where).refuse(f"the pickles exceed the total size limit ({_mib(_MAX_PKL_TOTAL)})")
        members.append(_Member(name, raw, flags, offset, usize, crc))
    if pos != len(central):
        raise _ambiguous(where, f"{len(central) - pos} bytes in the central directory belong to no entry")
    pos = 0
    for m in sorted(members, key=lambda m: m.offset):
        label = inert(m.name, 120)
        if m.offset != pos:
            raise _ambiguous(
                where,
                f"{m.offset - pos} bytes before member {label} belong to no member (data prepended or hidden)"
                if m.offset > pos
                else f"member {label} overlaps the member before it",
            )
        (sig, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, lnlen, lelen) = _LOCAL.unpack(
            _read_at(f, pos, _LOCAL.size, where)
        )
        if sig != b"PK\x03\x04":
            raise _ambiguous(where, f"no local header at offset {pos}, where the central directory puts member {label}")
        lname = _read_at(f, pos + _LOCAL.size, lnlen, where)
        if lname != m.raw_name:
            raise _ambiguous(where, f"the local header of member {label} names {inert(lname, 120)}")
        described = lflags & 0x8
        if (
            lflags != m.flags
            or lmethod != zipfile.ZIP_STORED
            or (lcrc, lcsize, lusize) not in ((m.crc, m.size, m.size), *([(0, 0, 0)] if described else []))
        ):
            raise _ambiguous(where, f"the local header of member {label} disagrees with its central directory entry")
        pos += _LOCAL.size + lnlen + lelen + m.size
        if described:  # a data descriptor follows the data (torch.save's streaming writer)
            head = _read_at(f, pos, _DESCRIPTOR32.size, where)
            if _DESCRIPTOR32.unpack(head) == (b"PK\x07\x08", m.crc, m.size, m.size):
                pos += _DESCRIPTOR32.size
            elif pos + _DESCRIPTOR64.size <= cd_off and _DESCRIPTOR64.unpack(
                _read_at(f, pos, _DESCRIPTOR64.size, where)
            ) == (b"PK\x07\x08", m.crc, m.size, m.size):
                pos += _DESCRIPTOR64.size
            else:
                raise _ambiguous(where, f"no data descriptor matching member {label} after its data")
        if pos > cd_off:
            raise _ambiguous(where, f"member {label} overlaps the central directory")
    if pos != cd_off:
        raise _ambiguous(
            where, f"{cd_off - pos} bytes between the last member and the central directory belong to no member"
        )
    return members


def _read_zip(path: Path) -> Any:
    """Validate, read once, scan, re-pack and load a torch zip: torch only sees scanned bytes."""
    where = str(path)
    with path.open("rb") as f, tempfile.TemporaryFile(prefix="gatekeeper-", buffering=0) as tmp:
        size = os.fstat(f.fileno()).st_size
        budget = _Budget(where, size)
        members = _zip_layout(f, size, where)
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
                infos = zf.infolist()
                listed = [(i.filename, i.header_offset, i.file_size, i.compress_size, i.CRC) for i in infos]
                if listed != [(m.name, m.offset, m.size, m.size, m.crc) for m in members]:
                    raise _ambiguous(where, "Python's zip reader lists other members than the central directory")
                for info in infos:
                    _copy_member(zf, info, out, where, budget)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
            raise _corrupt(where, inert(exc, 160)) from None
        tmp.seek(0)
        return _load(tmp, where)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: zipfile.ZipFile, where: str, budget: _Budget) -> None:
    """Read one member once (zipfile checks its CRC), scan it if it is a pickle, write those bytes to ``out``."""
    copy = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
    copy.compress_type = zipfile.ZIP_STORED
    copy.file_size = info.file_size  # lets zipfile choose Zip64 up front for a large member
    if info.filename.lower().endswith(".pkl") or info.file_size <= 2**20:
        data = zf.read(info)
        if info.filename.lower().endswith(".pkl"):
            _check(io.BytesIO(data), f"{where}:{inert(info.filename, 120)}", budget)
        out.writestr(copy, data)
    else:
        with zf.open(info) as src, out.open(copy, "w") as dst:
            shutil.copyfileobj(src, dst, 2**20)


def _read_legacy(path: Path) -> Any:
    """Copy a legacy torch.save file aside once, scan its pickles from the copy, load the copy."""
    where = str(path)
    with path.open("rb") as f, tempfile.TemporaryFile(prefix="gatekeeper-", buffering=0) as tmp:
        size = os.fstat(f.fileno()).st_size
        budget = _Budget(where, size)
        if size > _MAX_ARCHIVE:
            raise ModelFormatError(
                f"{where}: refused, {size} bytes is over the checkpoint size limit ({_mib(_MAX_ARCHIVE)})"
            )
        shutil.copyfileobj(f, tmp, 2**20)
        tmp.seek(0)
        if tarfile.is_tarfile(tmp):  # type: ignore[arg-type]
            raise ModelFormatError(f"{where}: pre-0.4 tar checkpoints are unsupported", "re-save with torch.save")
        tmp.seek(0)
        head = io.BytesIO(tmp.read(_MAX_PKL_TOTAL))  # the pickles come first; the storages' bytes follow
        for _ in range(_LEGACY_PICKLES):
            try:
                _check(head, where, budget)
            except ModelFormatError:
                if size > _MAX_PKL_TOTAL and head.tell() >= _MAX_PKL_TOTAL:
                    raise budget.refuse(f"the pickles exceed the total size limit ({_mib(_MAX_PKL_TOTAL)})") from None
                raise
        tmp.seek(0)
        return _load(tmp, where)


def _torch_load(f: IO[bytes], where: str) -> Any:
    """``torch.load(weights_only=True)`` with each opaque name bound to its inert stand-in."""
    stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(s, n) for n, s in _OPAQUE_STUBS.items()]
    with _LOAD_LOCK, torch.serialization.safe_globals(stubs):
        # add_safe_globals elsewhere in this process could bind one of our names to the real
        # class as well; torch would then pick either, so refuse rather than guess.
        for entry in torch.serialization.get_safe_globals():
            obj, name = entry if isinstance(entry, tuple) else (entry, _qualified(entry))
            if name in _OPAQUE_STUBS and obj is not _OPAQUE_STUBS[name]:
                raise UnsafeCheckpointError(
                    f"{where}: refused, {name} is registered with torch.serialization.add_safe_globals in this "
                    "process, so the load could construct the real class instead of an inert stand-in",
                    "load checkpoints in a process that does not call add_safe_globals for optimizers/schedulers",
                    globals_found=(name,),
                )
        # a file object, not a path: torch.load hands paths ending in .safetensors to another loader
        return torch.load(f, map_location="cpu", weights_only=True, mmap=False)


_TORCH_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _load(f: IO[bytes], where: str) -> Any:
    """:func:`_torch_load`, its failures turned into one-line errors of our own."""
    try:
        return _torch_load(f, where)
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ModelFormatError(f"{where}: torch.load failed ({_first_clause(str(exc))})", _CORRUPT) from None
        raise _torch_refusal(str(exc), where) from None
    except Exception as exc:
        raise ModelFormatError(f"{where}: torch.load failed ({_first_clause(str(exc))})", _CORRUPT) from None


def _first_clause(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no message")
    return inert(line.split(". ")[0].rstrip("."), 160)


def _torch_refusal(text: str, where: str) -> UnsafeCheckpointError:
    """Our message for torch's weights-only refusal: the offending global (else torch's reason), one line.

    torch's own text advises loading with weights_only=False, which would run the pickle's code;
    none of it is repeated.
    """
    m = _TORCH_GLOBAL.search(text)
    found: tuple[str, ...] = ()
    if m:
        found = (inert(m[1], 160),)
        detail = f"the global {found[0]} is not allowed"
    else:
        body = text.split("\n\nCheck the documentation", 1)[0]
        if "WeightsUnpickler error:" in body:
            reason = body.rsplit("WeightsUnpickler error:", 1)[1]
        else:
            paragraphs = [p for p in body.split("\n\n") if p.strip()]
            reason = paragraphs[-1] if len(paragraphs) > 1 else body.replace("Weights only load failed.", "", 1)
        detail = _first_clause(reason)
        if "weights_only" in detail:
            detail = "the pickle uses something it does not allow"
    return UnsafeCheckpointError(
        f"{where}: refused by torch's weights-only loader ({detail})", _TORCH_HINT, globals_found=found
    )


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def read_torch_checkpoint(path: Path) -> Any:
    """Scan, then load, a torch.save file (zip or legacy) whole, without running its code.

    Tensors load for real; optimizer / scheduler objects come back as :class:`OpaqueObject`
    stand-ins (their pickled state in ``.state``) and defaultdicts as plain dicts. torch.load
    never reads ``path`` itself: it reads a private copy of the bytes that were scanned (for a
    zip, a fresh archive re-packed from the members zipfile read, see :func:`_zip_layout`).

    Args:
        path: a torch zip or legacy torch.save file.
    Returns:
        The unpickled object (for a Dassl checkpoint, the dict holding ``state_dict``).
    Raises:
        UnsafeCheckpointError: torch < 2.10, a global in neither :data:`ALLOWED_GLOBALS`
            nor :data:`OPAQUE_GLOBALS`, or a refusal by torch's weights-only loader.
        ModelFormatError: not a torch.save file, an ambiguous, truncated or corrupt zip, a
            pickle over a scan limit, or torch.load failed.
    """
    _require_safe_torch()
    path = Path(path)
    fmt = sniff_format(path)
    try:
        if fmt == "torch-zip":
            return _read_zip(path)
        if fmt == "pickle":
            return _read_legacy(path)
    except OSError as exc:
        raise ModelFormatError(
            f"{path}: cannot read ({inert(exc, 160)})", "check the path and free disk space"
        ) from None
    raise ModelFormatError(f"{path}: a {fmt} file, not a torch.save pickle")
