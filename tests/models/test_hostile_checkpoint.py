"""Hostile torch checkpoints: zip polyglots, scan bombs, size blow-ups, torch's own refusals.

Each file is built here (torch.save, zipfile, raw bytes) and must be refused quickly, with one
line naming the problem, without running its code or allocating what it claims.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from gatekeeper.errors import ModelFormatError, UnsafeCheckpointError
from gatekeeper.models import safe_pickle
from gatekeeper.models.checkpoint import convert_checkpoint, load_dassl_checkpoint, read_torch_checkpoint

NOOPS = b"N0"  # NONE, POP: a pickle opcode pair that does nothing


class RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def torch_zip(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def local_entry(name: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data)
    return (
        struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 33, crc, len(data), len(data), len(name), 0) + name + data
    )


def central_entry(name: bytes, data: bytes, offset: int) -> bytes:
    crc = zlib.crc32(data)
    fields = (b"PK\x01\x02", 20, 20, 0, 0, 0, 33, crc, len(data), len(data), len(name), 0, 0, 0, 0, 0, offset)
    return struct.pack("<4s6H3L5H2L", *fields) + name


def end_record(n: int, central: bytes, offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), offset, len(comment)) + comment


def build_zip(
    entries: Sequence[tuple[str | bytes, bytes]],
    *,
    prefix: bytes = b"",
    gaps: dict[int, bytes] | None = None,
    local_names: dict[int, bytes] | None = None,
    comment: bytes = b"",
) -> bytes:
    """A stored zip with absolute offsets, written by hand so that exactly one thing can be off."""
    gaps, local_names = gaps or {}, local_names or {}
    out, central = bytearray(prefix), bytearray()
    for i, (name, data) in enumerate(entries):
        out += gaps.get(i, b"")
        raw = name if isinstance(name, bytes) else name.encode()
        central += central_entry(raw, data, len(out))
        out += local_entry(local_names.get(i, raw), data)
    return bytes(out) + bytes(central) + end_record(len(entries), bytes(central), len(out), comment)


def zip64_polyglot(first: bytes, second: bytes) -> bytes:
    """``first + second``, where zipfile reads ``second`` and torch's reader (miniz) reads ``first``.

    zipfile takes the Zip64 end record right before the locator (``second``'s) and corrects
    for the data in front; miniz follows the locator's offset, re-pointed here at ``first``'s
    Zip64 record, and takes its values because the plain end record holds the 0xFFFF.. markers.
    """
    patched = bytearray(second)
    locator, end = len(second) - 42, len(second) - 22
    assert patched[locator : locator + 4] == b"PK\x06\x07" and first[-98:-94] == b"PK\x06\x06"
    struct.pack_into("<Q", patched, locator + 8, len(first) - 98)
    struct.pack_into("<HHLL", patched, end + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return first + bytes(patched)


def benign() -> bytes:
    return torch_zip({"state_dict": {"ctx": torch.ones(2, 8)}})


def write(tmp_path: Path, data: bytes, name: str = "model.pth.tar-50") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def data_pkl(data: bytes) -> bytes:
    return next(d for n, d in members(data) if n.endswith("/data.pkl"))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\r" not in text
    return text


# --- 1. one reader, one truth ---------------------------------------------------------------


@pytest.mark.parametrize("payload", ["weights", "os.system"])
def test_zip64_polyglot_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    hidden: dict[str, Any] = {"state_dict": {"ctx": torch.full((2, 8), 7.0)}}
    if payload == "os.system":
        hidden["evil"] = RunsShell(marker)
    shown = benign()
    path = write(tmp_path, zip64_polyglot(torch_zip(hidden), shown))
    # the premise: the two readers see two different archives
    with zipfile.ZipFile(path) as zf:
        assert zf.read("archive/data.pkl") == data_pkl(shown)
    if payload == "weights":
        assert torch.load(path, weights_only=True)["state_dict"]["ctx"][0, 0] == 7.0
    with pytest.raises(ModelFormatError, match="ambiguous zip") as info:
        read_torch_checkpoint(path)
    assert "Zip64" in one_line(info.value)
    with pytest.raises(ModelFormatError, match="ambiguous zip"):
        load_dassl_checkpoint(path)
    assert not marker.exists()


def test_appended_second_archive_is_refused(tmp_path: Path) -> None:
    """Two archives of the same length back to back: torch reads the first, zipfile the second."""
    first, second = torch_zip({"ctx": torch.full((2, 8), 7.0)}), torch_zip({"ctx": torch.ones(2, 8)})
    assert len(first) == len(second)
    path = write(tmp_path, first + second)
    assert torch.load(path, weights_only=True)["ctx"][0, 0] == 7.0  # zipfile would scan ``second``
    with pytest.raises(ModelFormatError, match="ambiguous zip"):
        read_torch_checkpoint(path)


def _evil_entry(marker: Path) -> bytes:
    """A local header and data of an ``archive/data.pkl`` that runs a command."""
    evil = pickle.dumps({"state_dict": {"ctx": 1}, "x": RunsShell(marker)}, protocol=2)
    return build_zip([("archive/data.pkl", evil)]).split(b"PK\x01\x02")[0]


@pytest.mark.parametrize(
    "case",
    [
        "trailing data",
        "zip comment",
        "comment holding an end record",
        "prepended member",
        "hidden member between members",
        "local name differs",
        "NUL in a name",
        "names equal ignoring case",
    ],
)
def test_ambiguous_layouts_are_refused(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "pwned"
    entries: list[tuple[str | bytes, bytes]] = list(members(benign()))
    evil = _evil_entry(marker)
    if case == "trailing data":
        data = build_zip(entries) + evil
    elif case == "zip comment":
        data = build_zip(entries, comment=b"hello")
    elif case == "comment holding an end record":
        # members, then an evil data.pkl; a central directory listing the benign members; an end
        # record whose comment holds a second central directory (the evil data.pkl instead) and
        # its end record: a reader that honours the comment sees one archive, the rest the other
        body = bytearray()
        offsets = []
        for name, content in entries:
            offsets.append(len(body))
            body += local_entry(str(name).encode(), content)
        evil_at, evil_pkl = len(body), pickle.dumps({"state_dict": {"ctx": 1}, "x": RunsShell(marker)}, protocol=2)
        body += local_entry(b"archive/data.pkl", evil_pkl)
        first = b"".join(central_entry(str(n).encode(), c, o) for (n, c), o in zip(entries, offsets, strict=True))
        second = b"".join(
            central_entry(b"archive/data.pkl", evil_pkl, evil_at)
            if str(n).endswith("data.pkl")
            else central_entry(str(n).encode(), c, o)
            for (n, c), o in zip(entries, offsets, strict=True)
        )
        second_at = len(body) + len(first) + 22
        comment = second + end_record(len(entries), second, second_at)
        data = bytes(body) + first + end_record(len(entries), first, len(body), comment)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:  # the premise: zipfile takes the inner one
            assert zf.read("archive/data.pkl") == evil_pkl
    elif case == "prepended member":
        data = build_zip(entries, prefix=evil)
    elif case == "hidden member between members":
        data = build_zip(entries, gaps={1: evil})
    elif case == "local name differs":
        data = build_zip(entries, local_names={0: b"archive/data.pkk"})
    elif case == "NUL in a name":  # zipfile cuts the name at the NUL, torch's reader does not
        entries.append((b"archive/DATA.pkl\x00x", pickle.dumps(RunsShell(marker), protocol=2)))
        data = build_zip(entries)
    else:  # torch's reader matches names ignoring case: which copy would it take?
        entries.append(("ARCHIVE/DATA.PKL", pickle.dumps({"state_dict": {"ctx": 1}}, protocol=2)))
        data = build_zip(entries)
    path = write(tmp_path, data)
    with pytest.raises(ModelFormatError, match="ambiguous zip") as info:
        read_torch_checkpoint(path)
    one_line(info.value)
    assert not marker.exists()


def test_hand_built_zip_loads(tmp_path: Path) -> None:
    """The builder above makes loadable archives: each refusal comes from the one thing altered."""
    path = write(tmp_path, build_zip(list(members(benign()))))
    assert torch.equal(read_torch_checkpoint(path)["state_dict"]["ctx"], torch.ones(2, 8))


def test_torch_loads_only_the_scanned_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the layout check switched off, torch gets a re-pack of what zipfile read and scanned."""
    marker = tmp_path / "pwned"
    hidden = torch_zip({"state_dict": {"ctx": torch.full((2, 8), 7.0)}, "evil": RunsShell(marker)})
    path = write(tmp_path, zip64_polyglot(hidden, benign()))

    def zipfile_view(f: Any, size: int, where: str) -> list[Any]:
        with zipfile.ZipFile(f) as zf:
            return [
                safe_pickle._Member(
                    i.filename, i.orig_filename.encode(), i.flag_bits, i.header_offset, i.file_size, i.CRC
                )
                for i in zf.infolist()
            ]

    seen: list[Any] = []
    real_load = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(f)
        return real_load(f, *args, **kwargs)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(safe_pickle, "_zip_layout", zipfile_view)
    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    obj = read_torch_checkpoint(path)
    assert torch.equal(obj["state_dict"]["ctx"], torch.ones(2, 8)) and "evil" not in obj
    assert len(seen) == 1 and not isinstance(seen[0], (str, Path))  # never the provider's file
    assert not marker.exists() and not any(scratch.iterdir())  # the re-packed copy is gone


def test_repacked_genuine_checkpoint_is_unchanged(tmp_path: Path) -> None:
    base = torch.arange(48.0).reshape(6, 8)
    obj = {
        "state_dict": {"ctx": base[:4], "half": base.half().t(), "view": base[2:, 1::2]},  # shared, strided
        "step": torch.tensor(3, dtype=torch.long),
    }
    path = tmp_path / "model.pth.tar-50"
    torch.save(obj, path)
    loaded = read_torch_checkpoint(path)
    reference = torch.load(path, weights_only=True)
    for key in ("ctx", "half", "view"):
        assert torch.equal(loaded["state_dict"][key], reference["state_dict"][key])
        assert loaded["state_dict"][key].stride() == reference["state_dict"][key].stride()
    assert loaded["step"].item() == 3


def test_truncated_zip_is_reported_as_such(tmp_path: Path) -> None:
    data = benign()
    path = write(tmp_path, data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated or corrupt zip") as info:
        read_torch_checkpoint(path)
    assert "data.pkl" not in one_line(info.value)


# --- 2. bounds on the scan -------------------------------------------------------------------


def _with_data_pkl(data: bytes, compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, content in members(benign()):
            zf.writestr(name, data if name.endswith("/data.pkl") else content, compress_type=compress)
    return out.getvalue()


def test_compressed_noop_bomb_is_refused_fast(tmp_path: Path) -> None:
    bomb = b"\x80\x02" + NOOPS * (16 * 2**20) + b"}."  # 32 MiB of no-ops: 76 s of scan before
    path = write(tmp_path, _with_data_pkl(bomb, zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 100_000
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match="compressed") as info:
        read_torch_checkpoint(path)
    assert time.monotonic() - start < 1.0
    one_line(info.value)


def test_oversize_pickle_is_refused_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path, _with_data_pkl(b"\x80\x02" + NOOPS * (9 * 2**19) + b"}."))  # 9 MiB, stored
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match="per-pickle size limit"):
        read_torch_checkpoint(path)
    assert time.monotonic() - start < 1.0


def test_total_pickle_size_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [*members(benign()), ("archive/extra.pkl", b"\x80\x02" + NOOPS * 400 + b"}.")]
    path = write(tmp_path, build_zip(entries))
    monkeypatch.setattr(safe_pickle, "_MAX_PKL_TOTAL", 600)
    with pytest.raises(ModelFormatError, match="total size limit"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_opcode_limit(tmp_path: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = b"\x80\x02" + NOOPS * 20_000 + b"}."
    path = write(tmp_path, bomb + pickle.dumps(1, protocol=2) * 4 if legacy else _with_data_pkl(bomb))
    monkeypatch.setattr(safe_pickle, "_MAX_OPS", 10_000)
    with pytest.raises(ModelFormatError, match="opcode limit"):
        read_torch_checkpoint(path)


def test_scan_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.ones(2, 8)}}, path)
    monkeypatch.setattr(safe_pickle, "_SCAN_SECONDS", -1.0)
    with pytest.raises(ModelFormatError, match="time budget"):
        read_torch_checkpoint(path)


def test_archive_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, benign())
    monkeypatch.setattr(safe_pickle, "_MAX_ARCHIVE", 1000)
    with pytest.raises(ModelFormatError, match="archive size limit"):
        read_torch_checkpoint(path)


def test_legacy_pickles_are_bounded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, b"\x80\x02" + NOOPS * 5000 + b"}." + pickle.dumps(1, protocol=2) * 4)
    monkeypatch.setattr(safe_pickle, "_MAX_PKL", 4096)
    with pytest.raises(ModelFormatError, match="per-pickle size limit"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_storage_larger_than_the_file_is_refused(tmp_path: Path, legacy: bool) -> None:
    """torch allocates a storage from the pickle's element count before reading its bytes."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"ctx": torch.ones(200)}}, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    if legacy:
        at = data.index(b"K\xc8", data.index(b"cpu"))  # BININT1 200, the numel after the location
        path = write(tmp_path, data[:at] + b"\x8a\x05\x00\x00\x00\x40\x00" + data[at + 2 :])  # LONG1 2**30
    else:
        pkl = data_pkl(data)
        at = pkl.index(b"K\xc8", pkl.index(b"cpu"))
        path = write(tmp_path, _with_data_pkl(pkl[:at] + b"\x8a\x05\x00\x00\x00\x40\x00" + pkl[at + 2 :]))
    with pytest.raises(ModelFormatError, match="declares 1073741824 elements") as info:
        read_torch_checkpoint(path)
    one_line(info.value)


# --- 3. size blow-ups on convert -------------------------------------------------------------


def _sidecar(folder: Path, **extra: Any) -> Path:
    path = folder / "sidecar.yaml"
    path.write_text(
        "backbone: {name: RN50, pretrained: openai}\nclassnames: [a, b]\n"
        + "".join(f"{k}: {v}\n" for k, v in extra.items())
    )
    return path


@pytest.mark.parametrize(
    "ctx",
    [
        torch.ones(1).expand(16, 4_000_000),  # 256 MB once copied, from 4 stored bytes
        torch.ones(1).expand(16, 4_000_000_000),  # would try to allocate 256 GB
        torch.ones(1).expand(16, 8192),  # within the ctx bounds, but still a stride-0 view
        torch.ones(1, dtype=torch.float16).expand(16, 512),
        torch.ones(64).as_strided((16, 16), (1, 1)),  # overlapping rows
    ],
    ids=["stride0-4e6", "stride0-4e9", "stride0-8192", "stride0-fp16", "overlapping"],
)
def test_expanded_ctx_is_refused_without_copying(tmp_path: Path, ctx: torch.Tensor) -> None:
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": ctx}}, path)
    assert path.stat().st_size < 4096
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match=r"expanded or overlapping view|dim <= 8192") as info:
        convert_checkpoint(path, _sidecar(tmp_path), tmp_path / "out")
    assert f"16, {ctx.shape[1]}" in one_line(info.value)  # the shape is quoted
    with pytest.raises(ModelFormatError, match="expanded or overlapping view"):
        load_dassl_checkpoint(path)  # .float() would copy it too
    assert time.monotonic() - start < 1.0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"ctx": torch.ones(65, 8)}, r"n_ctx <= 64"),
        ({"ctx": torch.ones(4, 8193)}, r"dim <= 8192"),
        ({"ctx": torch.ones(32)}, r"\[n_ctx, dim\]"),
        ({"ctx": torch.ones(4, 8, dtype=torch.long)}, "floating-point"),
        (
            {
                "ctx": torch.ones(4, 8),
                "meta_net.linear1.weight": torch.ones(2, 6),
                "meta_net.linear1.bias": torch.ones(2),
                "meta_net.linear2.weight": torch.ones(9, 2),  # ctx is 8 wide
                "meta_net.linear2.bias": torch.ones(9),
            },
            "meta_net shapes",
        ),
        (
            {
                "ctx": torch.ones(4, 8),
                "meta_net.linear1.weight": torch.ones(1).expand(4096, 8192),  # 2**25 elements
                "meta_net.linear1.bias": torch.ones(4096),
                "meta_net.linear2.weight": torch.ones(8, 4096),
                "meta_net.linear2.bias": torch.ones(8),
            },
            "meta_net shapes",
        ),
        (
            {
                "ctx": torch.ones(4, 8),
                "meta_net.linear1.weight": torch.ones(1).expand(2, 6),
                "meta_net.linear1.bias": torch.ones(2),
                "meta_net.linear2.weight": torch.ones(8, 2),
                "meta_net.linear2.bias": torch.ones(8),
            },
            "expanded or overlapping view",
        ),
    ],
    ids=["n_ctx", "dim", "1-d", "integer", "meta-width", "meta-huge", "meta-expanded"],
)
def test_kept_tensor_shapes_are_bounded(tmp_path: Path, state: dict[str, torch.Tensor], needle: str) -> None:
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelFormatError, match=needle) as info:
        convert_checkpoint(path, _sidecar(tmp_path), tmp_path / "out")
    one_line(info.value)
    assert not (tmp_path / "out").exists()


def test_dropped_tensors_are_never_copied(tmp_path: Path) -> None:
    from tests.conftest import BACKBONE

    huge = torch.ones(1, dtype=torch.float16).expand(1000, 77, 10**6)  # 154 GB if ever copied
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.ones(4, 64), "buffer": huge}, "optim": huge}, path)
    done = convert_checkpoint(path, _sidecar(tmp_path, precision="fp16"), tmp_path / "out", backbone=BACKBONE)
    assert done.manifest.n_ctx == 4


def test_expanded_prompt_tokens_are_refused_without_copying(tmp_path: Path) -> None:
    """token_prefix/suffix are read to check the class names: bounded and checked as views first."""
    path = tmp_path / "model.pth.tar-50"
    prefix, suffix = torch.ones(2, 1, 64), torch.ones(1).expand(2, 15 - 4, 64)
    torch.save({"state_dict": {"ctx": torch.ones(4, 64), "token_prefix": prefix, "token_suffix": suffix}}, path)
    with pytest.raises(ModelFormatError, match="token_suffix.* is an expanded or overlapping view"):
        convert_checkpoint(path, _sidecar(tmp_path), tmp_path / "out")
    huge = torch.ones(1, dtype=torch.float16).expand(1000, 77, 10**6)
    torch.save({"state_dict": {"ctx": torch.ones(4, 8), "token_prefix": huge, "token_suffix": huge}}, path)
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match="token_prefix .* are not"):
        convert_checkpoint(path, _sidecar(tmp_path), tmp_path / "out")
    assert time.monotonic() - start < 1.0 and not (tmp_path / "out").exists()


# --- 6. torch's own refusals, in our words ---------------------------------------------------


def test_torch_refusal_names_the_global_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the static scan ever miss a global, torch's refusal comes back as our own line."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.ones(2, 8)}, "evil": RunsShell(marker)}, path)
    monkeypatch.setattr(safe_pickle, "_ALLOWED_PAIRS", safe_pickle._ALLOWED_PAIRS | {("posix", "system")})
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_checkpoint(path)
    text = one_line(info.value)
    assert "refused by torch's weights-only loader (the global posix.system is not allowed)" in text
    assert info.value.globals_found == ("posix.system",)
    assert "weights_only" not in text + info.value.hint and "safetensors" in info.value.hint
    assert not marker.exists()


def test_torch_refusal_without_a_global(tmp_path: Path) -> None:
    path = write(tmp_path, _with_data_pkl(b"\x80\x02(ccollections\nOrderedDict\no."))  # OBJ: scan-clean
    with pytest.raises(
        UnsafeCheckpointError, match=r"refused by torch's weights-only loader \(Unsupported operand"
    ) as info:
        read_torch_checkpoint(path)
    assert "weights_only" not in one_line(info.value) + info.value.hint


def test_provider_text_is_inert_in_messages(tmp_path: Path) -> None:
    name = "x\n::error::pwned"  # a global name that would start a workflow command on its own line
    bomb = b"\x80\x04\x8c\x05posix\x8c" + bytes([len(name)]) + name.encode() + b"\x93."
    path = write(tmp_path, _with_data_pkl(bomb))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_checkpoint(path)
    assert "\\x0a::error" in one_line(info.value)
    assert all("\n" not in g for g in info.value.globals_found)
