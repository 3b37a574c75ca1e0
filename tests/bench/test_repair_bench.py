"""`gatekeeper-lab bench repair` end to end on the committed demo zoo (fast settings): reports, resume, rebuilt models."""

from __future__ import annotations

import json

from gatekeeper.lab import main
from tests.bench.conftest import demo_zoo_copy, rebuild_under_same_name


def test_bench_repair_reports_resumes_and_reruns_a_rebuilt_model(tmp_path, capsys):
    zoo, policy = demo_zoo_copy(tmp_path, ood_budget=64, holdout=16)
    out = tmp_path / "bench"
    argv = ["bench", "repair", "--zoo", str(zoo), "--out", str(out), "--policy", str(policy), "--epochs", "1"]
    assert main(argv) == 0
    assert "[1/1] backdoored" in capsys.readouterr().err
    res = json.loads((out / "repair.json").read_text())
    (row,) = res["models"]  # the clean demo model is not a repair candidate
    assert row["model"] == "backdoored" and set(row["after"]) == {"ci", "clean-only", "random", "wrong-class"}
    assert row["before"]["id_asr"] > 0.9  # the demo backdoor's true trigger works before repair
    assert "| backdoored |" in (out / "repair.md").read_text()

    assert main(argv) == 0  # resumes: nothing recomputed
    assert "[1/1]" not in capsys.readouterr().err

    rebuild_under_same_name(zoo, source="clean", target="backdoored")  # the cached row must not be reused
    assert main(argv) == 0
    assert "[1/1] backdoored" in capsys.readouterr().err
    (row2,) = json.loads((out / "repair.json").read_text())["models"]
    assert row2["before"]["id_asr"] < 0.1 and row2["fingerprint"] != row["fingerprint"]
