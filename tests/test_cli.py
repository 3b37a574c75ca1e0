"""Exit codes, each provoked for real through gatekeeper.cli.main (the console script's entry)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatekeeper.cli import main

FAST = "version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nbatch_size: 32\nnull_copies: 0\n"


@pytest.fixture()
def fast_policy(tmp_path: Path) -> Path:
    p = tmp_path / "fast.yaml"
    p.write_text(FAST)
    return p


def test_help_explains_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["scan", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes" in out and "inconclusive" in out and "--ood" in out


def test_bad_policy_is_exit_4_even_when_the_model_is_missing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epsilon: 4/255\nthreshold: 2\n")
    code = main(["scan", str(tmp_path / "no-model"), "--policy", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 4 and "unknown key 'threshold'" in err and str(bad) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["scan"],  # missing model and --out
        ["scan", "m", "--out", "o", "--ood", "imagenet"],
        ["scan", "s3://bucket/m", "--out", "o"],
        ["scan", "m", "--out", "o", "--device", "tpu:0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_are_exit_4(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 4
    assert "gatekeeper: error:" in capsys.readouterr().err


def test_a_mistyped_model_path_is_a_usage_error_before_any_work(tmp_path, capsys):
    code = main(["scan", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 4 and "model folder not found" in err and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert main(["scan", str(tmp_path / "file"), "--out", str(tmp_path / "o")]) == 4
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bare_commands_print_their_help(capsys):
    from gatekeeper.lab import main as lab_main

    assert main([]) == 4 and "scan" in capsys.readouterr().out
    assert lab_main(["bench", "--help"]) == 0 and "detection" in capsys.readouterr().out
    assert lab_main([]) == 4 and "zoo" in capsys.readouterr().out


def test_zoo_build_help_counts_the_bench_zoo(capsys):
    from gatekeeper.lab import main as lab_main
    from gatekeeper.redteam.zoo import zoo_entries

    with pytest.raises(SystemExit):
        lab_main(["zoo", "build", "--help"])
    assert f"{len(zoo_entries('bench'))} models" in " ".join(capsys.readouterr().out.split())


def test_json_dash_writes_the_full_result_to_stdout(model_factory, tmp_path, fast_policy, capsys):
    folder = model_factory("coop")
    code = main(["scan", str(folder), "--policy", str(fast_policy), "--out", str(tmp_path / "o"), "--json", "-", "--quiet"])
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads((tmp_path / "o" / "result.json").read_text()) and code in (0, 1)
    assert not (tmp_path / "-").exists()
    assert main(["scan", str(folder), "--out", str(tmp_path / "o2"), "--json", "-", "--format", "json"]) == 4


def test_corrupt_model_is_exit_2_and_writes_no_verdict(model_factory, tmp_path, fast_policy, capsys):
    folder = model_factory("cocoop")
    (folder / "prompt_learner.safetensors").write_bytes(b"garbage")
    out = tmp_path / "o"
    code = main(["scan", str(folder), "--policy", str(fast_policy), "--out", str(out)])
    assert code == 2 and "corrupt" in capsys.readouterr().err
    assert not (out / "result.json").exists()


def test_pool_too_small_is_exit_2(model_factory, tmp_path, fast_policy, capsys):
    folder = model_factory("cocoop")
    (tmp_path / "imgs").mkdir()
    code = main(["scan", str(folder), "--policy", str(fast_policy), "--ood", f"dir:{tmp_path / 'imgs'}", "--out", str(tmp_path / "o")])
    assert code == 2 and "0 usable images" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path, capsys):
    main(["scan", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"])
    assert "Traceback" in capsys.readouterr().err


def _nan_model(folder: Path) -> None:
    path = folder / "prompt_learner.safetensors"
    state = load_file(str(path))
    state["ctx"] = torch.full_like(state["ctx"], float("nan"))
    save_file(state, str(path))


def test_degenerate_model_is_inconclusive_exit_3_unless_policy_says_pass(model_factory, tmp_path, fast_policy):
    folder = model_factory("coop")
    _nan_model(folder)
    out = tmp_path / "o"
    assert main(["scan", str(folder), "--policy", str(fast_policy), "--out", str(out), "--quiet"]) == 3
    result = json.loads((out / "result.json").read_text())
    assert result["verdict"] == "inconclusive"
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(FAST + "on_inconclusive: pass\n")
    assert main(["scan", str(folder), "--policy", str(lenient), "--out", str(tmp_path / "o2"), "--quiet"]) == 0


def test_scan_writes_report_json_and_triggers(model_factory, tmp_path, fast_policy):
    folder = model_factory("cocoop")
    out = tmp_path / "o"
    code = main(["scan", str(folder), "--policy", str(fast_policy), "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code in (0, 1)
    result = json.loads((out / "result.json").read_text())
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert {"verdict", "s_max", "threshold", "suspect_class", "classes"} <= set(result)
    assert len(result["classes"]) == 4 and all({"name", "asr", "loss", "score", "z"} <= set(c) for c in result["classes"])
    assert result["provenance"]["content_hash"] and result["policy_hash"] and result["environment"]["torch"]
    report = (out / "report.md").read_text()
    assert report.lstrip().startswith("#") and "gatekeeper scan" in report
    assert all((out / p).is_file() for p in result["triggers"].values()) and len(result["triggers"]) == 4


def test_same_inputs_same_numbers(model_factory, tmp_path, fast_policy):
    folder = model_factory("cocoop")
    runs = []
    for i in range(2):
        main(["scan", str(folder), "--policy", str(fast_policy), "--out", str(tmp_path / f"o{i}"), "--quiet"])
        runs.append(json.loads((tmp_path / f"o{i}" / "result.json").read_text())["classes"])
    assert runs[0] == runs[1]


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "gatekeeper" in proc.stdout


def test_model_that_does_not_fit_in_memory_is_exit_2(model_factory, tmp_path):
    """A real allocation failure: the scan runs under an address-space limit it cannot fit in."""
    folder = model_factory("cocoop", ("red circle", "blue square", "green star", "white ring", "pink bar", "red bar", "blue bar", "green bar"))
    policy = tmp_path / "huge.yaml"
    policy.write_text("version: 1\nepsilon: 8/255\nood_budget: 4096\nholdout: 8\nbatch_size: 4096\nimplementation: reference\nnull_copies: 0\n")
    # the limit is set inside the child, from its own address space once torch and the CLI are loaded:
    # 1 GiB of headroom, far less than one step over 4096 images x 8 classes of CoCoOp activations (> 6 GiB)
    script = (
        "import resource, sys, torch;"
        "from gatekeeper.cli import main;"
        "import gatekeeper.models.loader, gatekeeper.pipeline, gatekeeper.report;"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'));"
        "soft = vm + 1024**3;"
        "resource.setrlimit(resource.RLIMIT_AS, (soft, soft));"
        "sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "scan", str(folder), "--policy", str(policy), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit in memory" in proc.stderr or "out of host memory" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o" / "result.json").exists()
