"""Seeded fuzzing of everything a provider or a policy author hands the gate.

Random and mutated checkpoints, safetensors headers, sidecars, manifests, prompt learners and
policies go through the real CLI (``convert`` and ``scan``) in one separate process
(``tests/fuzz_driver.py``). Every case must end with exit 2 (model cannot be checked) or 4
(usage/policy), one line on stderr, no traceback and no "internal error", within a time bound,
with nothing written outside its ``--out``; the process's peak memory is bounded too. A mutation
that leaves a checkpoint semantically intact (e.g. a flipped byte in a zip timestamp) may convert,
but only to exactly the model the intact checkpoint converts to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
BACKBONE = REPO / "zoo" / "backbone"
SEED = 20261202
CASE_SECONDS = 30.0
PEAK_MIB = 3072
FAST = {"version": 1, "epsilon": "8/255", "ood_budget": 64, "holdout": 32, "null_copies": 0, "restarts": 1}
SIDECAR = {"backbone": {"name": "ViT-B-16", "pretrained": "openai"}, "classnames": ["cat", "dog", "bird"]}
BAD_VALUES: list[Any] = [True, "x" * 5000, [], {}, [1, 2], {"a": [1]}, float("nan"), 1e308, -1e308, "::error::x\n"]


def _checkpoint(path: Path) -> None:
    """A CoOp checkpoint on the committed tiny backbone (convert checks its prompt tokens against it)."""
    from tests.models.test_convert import dassl_state

    state = OrderedDict(dassl_state(list(SIDECAR["classnames"])))
    torch.save({"state_dict": state, "epoch": 5, "optimizer": None, "scheduler": None}, path)


def _safetensors_variants(rng: random.Random, good: bytes) -> list[bytes]:
    """Valid data with a hostile header: dtypes, shapes, offsets, lengths."""
    (n,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    out = []
    for _ in range(8):
        h = json.loads(json.dumps(header))
        name = next(k for k in h if k != "__metadata__")
        choice = rng.randrange(6)
        if choice == 0:
            h[name]["dtype"] = rng.choice(["X9", "I64", "BOOL", "F8_E4M3", ""])
        elif choice == 1:
            h[name]["shape"] = rng.choice([[-1, 32], [4, 2**40], [2**31, 2**31], [4, 32, 1, 1], [0, 32]])
        elif choice == 2:
            h[name]["data_offsets"] = rng.choice([[0, 10**12], [5, 1], [0, len(data) + 64], [-8, 8]])
        elif choice == 3:
            h["__metadata__"] = {"a": [1, 2, {"b": None}]}
        elif choice == 4:
            h[name] = rng.choice(BAD_VALUES[:6])
        blob = json.dumps(h).encode()
        length = len(blob) if choice != 5 else rng.choice([0, 1, len(blob) + 10**6, 2**63])
        out.append(struct.pack("<Q", length) + blob + data)
    return out


def _checkpoint_mutants(rng: random.Random, good: bytes, st_good: bytes) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(10):
        out.append(good[: rng.randrange(1, len(good))])
    for _ in range(10):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 9)):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        out.append(bytes(b))
    for prefix in (b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05", struct.pack("<Q", 40) + b"{"):
        out.append(prefix + rng.randbytes(rng.randrange(0, 2048)))
    out += [good + good, b"junk" * 100 + good, good + rng.randbytes(300), good[:200] + good]
    out += _safetensors_variants(rng, st_good)
    return out


def _yaml_text_mutants(rng: random.Random, base: dict[str, Any]) -> list[str]:
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9)
    )
    first = next(iter(base))
    return [
        rng.randbytes(200).decode("latin-1"),
        bomb,
        "[" * 20000 + "]" * 20000,
        yaml.safe_dump(base) + f"{first}: {json.dumps(base[first])}\n",  # a repeated key
        "- just\n- a list\n",
        "x: " + "9" * 5000 + "\n",
        ": : :\n\t\x00",
    ]


def _replace_one(
    rng: random.Random, base: dict[str, Any], keys: list[str], n: int, required: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """``n`` copies of ``base`` with one key given a bad value, an unknown key added, or a required key dropped."""
    out = []
    for _ in range(n):
        d = json.loads(json.dumps(base))
        key = rng.choice(keys)
        if key == "<unknown>":
            d[rng.choice(["zzz", "trust_remote_code", "Kind", "__class__"])] = 1
        elif key == "<drop>":
            d.pop(rng.choice(list(required or d)))
        else:
            d[key] = rng.choice(BAD_VALUES)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory, random_backbone) -> tuple[Path, list[dict[str, Any]], bytes]:
    from tests.conftest import make_model_folder

    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    base.mkdir()
    _checkpoint(base / "model.pth.tar-5")
    good = (base / "model.pth.tar-5").read_bytes()
    save_file({"ctx": torch.randn(4, 64)}, str(base / "ctx.safetensors"))
    st_good = (base / "ctx.safetensors").read_bytes()
    (base / "sidecar.yaml").write_text(yaml.safe_dump(SIDECAR))
    model = make_model_folder(random_backbone, base / "model", "coop", ("red circle", "blue square", "green star"))
    manifest = json.loads((model / "gatekeeper.json").read_text())
    learner = (model / "prompt_learner.safetensors").read_bytes()
    (base / "fast.yaml").write_text(yaml.safe_dump(FAST))

    out: list[dict[str, Any]] = []

    def case(kind: str, build: Any, argv: Any) -> None:
        folder = root / f"{len(out):03d}-{kind}"
        folder.mkdir()
        build(folder)
        out.append({"id": folder.name, "kind": kind, "cwd": str(folder), "argv": argv(folder)})

    def convert(ckpt: Path, sidecar: Path) -> Any:
        return lambda f: ["convert", str(ckpt), "--sidecar", str(sidecar), "--out", str(f / "out"), "--backbone", str(BACKBONE)]

    for blob in _checkpoint_mutants(rng, good, st_good):
        case("checkpoint", lambda f, b=blob: (f / "model.pth.tar-5").write_bytes(b), lambda f: convert(f / "model.pth.tar-5", base / "sidecar.yaml")(f))
    sidecar_docs = [yaml.safe_dump(d) for d in _replace_one(rng, SIDECAR, ["backbone", "classnames", "classnames_file", "image_size", "kind", "precision", "<unknown>", "<drop>"], 16)]
    for text in sidecar_docs + _yaml_text_mutants(rng, SIDECAR):
        case("sidecar", lambda f, t=text: (f / "s.yaml").write_text(t, encoding="utf-8", errors="surrogateescape"), lambda f: convert(base / "model.pth.tar-5", f / "s.yaml")(f))

    def model_copy(f: Path, manifest_text: str | None = None, learner_bytes: bytes | None = None) -> None:
        shutil.copytree(model, f / "model", symlinks=True)
        if manifest_text is not None:
            (f / "model" / "gatekeeper.json").write_text(manifest_text, encoding="utf-8", errors="surrogateescape")
        if learner_bytes is not None:
            (f / "model" / "prompt_learner.safetensors").write_bytes(learner_bytes)

    def scan(f: Path) -> list[str]:
        return ["scan", str(f / "model"), "--policy", str(base / "fast.yaml"), "--out", str(f / "out"), "--quiet"]

    manifest_keys = ["kind", "classnames", "backbone", "image_size", "n_ctx", "precision", "template", "format_version", "format", "<drop>"]
    manifests = [json.dumps(d) for d in _replace_one(rng, manifest, manifest_keys, 16, ("kind", "classnames", "backbone", "image_size"))]
    manifests += [rng.randbytes(100).decode("latin-1"), "[" * 200_000 + "]" * 200_000, json.dumps(manifest)[:-7]]
    for text in manifests:
        case("manifest", lambda f, t=text: model_copy(f, manifest_text=t), scan)
    for blob in _safetensors_variants(rng, learner) + [learner[: len(learner) // 2], b""]:
        case("prompt-learner", lambda f, b=blob: model_copy(f, learner_bytes=b), scan)

    policy_keys = ["epsilon", "ood_budget", "holdout", "k", "alpha", "scoring", "detector", "restarts", "candidates", "calibration", "positive_control", "seed", "<unknown>"]
    policies = [yaml.safe_dump(d) for d in _replace_one(rng, FAST, policy_keys, 16)] + _yaml_text_mutants(rng, FAST)
    for text in policies:
        case(
            "policy",
            lambda f, t=text: (f / "p.yaml").write_text(t, encoding="utf-8", errors="surrogateescape"),
            lambda f: ["scan", "hf://acme/never-fetched", "--policy", str(f / "p.yaml"), "--out", str(f / "out")],
        )
    return root, out, good


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root but the cases' --out folders: files with size and mtime, folders by name."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "out"]
        for name in dirnames:
            snap[str((Path(dirpath) / name).relative_to(root))] = (-1, 0)
        for name in filenames:
            st = (Path(dirpath) / name).lstat()
            snap[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, int(st.st_mtime_ns))
    return snap


def _converted(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((folder / "gatekeeper.json").read_text()), load_file(str(folder / "prompt_learner.safetensors"))


def test_fuzzed_inputs_end_in_a_clear_refusal(cases, tmp_path):
    root, todo, good = cases
    # the intact checkpoint converts: the reference for mutants that change nothing that matters
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "m.pth").write_bytes(good)
    from gatekeeper.cli import main

    assert main(["convert", str(ref_dir / "m.pth"), "--sidecar", str(root / "base" / "sidecar.yaml"), "--out", str(ref_dir / "out"), "--backbone", str(BACKBONE)]) == 0
    ref_manifest, ref_tensors = _converted(ref_dir / "out")

    before = _tree(root)
    (tmp_path / "cases.json").write_text(json.dumps(todo))
    env = {**os.environ, "GATEKEEPER_CACHE": "off", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_driver", str(tmp_path / "cases.json"), str(tmp_path / "res.json")],
        capture_output=True, text=True, env=env, timeout=1200, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "res.json").read_text())
    assert _tree(root) == before, "a case wrote or changed something outside its --out"

    kinds = {c["id"]: c["kind"] for c in todo}
    problems, accepted = [], 0
    for r in report["results"]:
        lines = r["stderr"].strip().splitlines()
        out = root / r["id"] / "out"
        if r["code"] == 0 and kinds[r["id"]] in ("checkpoint", "sidecar"):  # a sidecar may drop what --backbone gives
            same = _converted(out)[0] == ref_manifest and all(torch.equal(v, ref_tensors[k]) for k, v in _converted(out)[1].items())
            accepted += 1
            if not same or set(_converted(out)[1]) != set(ref_tensors):
                problems.append(f"{r['id']}: converted to a different model")
            continue
        if r["code"] not in (2, 4):
            problems.append(f"{r['id']}: exit {r['code']!r}: {r['stderr'][-300:]}")
        elif len(lines) != 1 or "Traceback" in r["stderr"] or "internal error" in r["stderr"]:
            problems.append(f"{r['id']}: stderr is not one clear line: {r['stderr'][-500:]!r}")
        elif any(line.lstrip().startswith("::") for line in lines) or len(lines[0]) > 1200:
            problems.append(f"{r['id']}: stderr line not inert or too long ({len(lines[0])} chars)")
        if r["seconds"] > CASE_SECONDS:
            problems.append(f"{r['id']}: took {r['seconds']:.1f}s")
        if kinds[r["id"]] in ("checkpoint", "sidecar") and out.exists():
            problems.append(f"{r['id']}: convert failed but left {out}")
        if kinds[r["id"]] == "policy" and r["code"] != 4:
            problems.append(f"{r['id']}: a bad policy must be exit 4 before any fetch, got {r['code']}")
    assert not problems, "\n".join(problems)
    assert len(report["results"]) >= 100 and accepted <= 10
    assert report["peak_mib"] < PEAK_MIB, f"peak memory {report['peak_mib']:.0f} MiB"
