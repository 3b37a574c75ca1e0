"""`gatekeeper bench repair` end to end on the committed demo zoo (fast settings): reports, resume, rebuilt models."""

from __future__ import annotations

import json
import shutil

from gatekeeper.cli import main
from tests.conftest import DEMO_ZOO


def test_bench_repair_reports_resumes_and_reruns_a_rebuilt_model(tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(DEMO_ZOO, zoo)
    policy = tmp_path / "fast.yaml"
    policy.write_text("epsilon: 8/255\nood_budget: 64\nholdout: 16\n")
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

    # "rebuild" the backdoored model as a clean one (same name): the cached row must not be reused
    shutil.copy(zoo / "clean" / "prompt_learner.safetensors", zoo / "backdoored" / "prompt_learner.safetensors")
    assert main(argv) == 0
    assert "[1/1] backdoored" in capsys.readouterr().err
    (row2,) = json.loads((out / "repair.json").read_text())["models"]
    assert row2["before"]["id_asr"] < 0.1 and row2["fingerprint"] != row["fingerprint"]
