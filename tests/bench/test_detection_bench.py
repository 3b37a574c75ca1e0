"""`gatekeeper-lab bench detection` end to end on the committed demo zoo (fast settings): outputs, resume."""

from __future__ import annotations

import json

from gatekeeper.lab import main
from tests.bench.conftest import demo_zoo_copy, rebuild_under_same_name
from tests.conftest import DEMO_ZOO


def test_bench_detection_writes_reports_and_resumes_from_its_cache(tmp_path, capsys):
    policy = tmp_path / "fast.yaml"
    policy.write_text("epsilon: 8/255\nood_budget: 64\nholdout: 32\nnull_copies: 0\n")
    out = tmp_path / "bench"
    argv = ["bench", "detection", "--zoo", str(DEMO_ZOO), "--out", str(out), "--policy", str(policy),
            "--only", "clip-inspector", "clip-inspector+differential", "--restarts", "1", "--json", str(tmp_path / "d.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "d.json").read_text())
    assert set(summary["detectors"]) == {"clip-inspector", "clip-inspector+differential"}
    for d in summary["detectors"].values():
        assert set(d) >= {"auroc", "accuracy", "fpr", "tpr", "f1"}
        assert d["n_clean"] == 1 and d["n_backdoored"] == 1
    assert summary["zoo"]["n_models"] == 2 and summary["commit"]
    full = json.loads((out / "detection-full.json").read_text())
    models = {m["model"]: m for m in full["detectors"]["clip-inspector"]["models"]}
    assert models["backdoored"]["target"] == "orange square" and models["clean"]["target"] is None
    assert (out / "detection-roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| clip-inspector |" in (out / "detection.md").read_text()
    cached = sorted(out.glob("cache/*/*.json"))
    assert len(cached) == 3  # CI on both models + one shared reference run for the task's class names
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()
    assert main(argv) == 0  # resumes: nothing recomputed
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert "ci-s0 [" not in capsys.readouterr().err


def test_bench_detection_reruns_a_model_rebuilt_under_the_same_name(tmp_path, capsys):
    """The cache is keyed by model *content*, not only its name: a rebuilt model is scanned again."""
    zoo, policy = demo_zoo_copy(tmp_path, ood_budget=32, holdout=16)
    out = tmp_path / "bench"
    argv = ["bench", "detection", "--zoo", str(zoo), "--out", str(out), "--policy", str(policy), "--only", "clip-inspector", "--restarts", "1"]
    assert main(argv) == 0
    entry = {p.stem: p for p in out.glob("cache/ci-s0-*/*.json")}
    before = {k: v.read_text() for k, v in entry.items()}
    rebuild_under_same_name(zoo, source="backdoored", target="clean")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ci-s0 [1/2] backdoored" not in err and "ci-s0 [2/2] clean" in err
    assert entry["backdoored"].read_text() == before["backdoored"]
    # recomputed on the new weights: the backdoored prompt learner's per-class ASRs, not the old ones
    assert json.loads(entry["clean"].read_text())["classes"] != json.loads(before["clean"])["classes"]


def test_bench_detection_refuses_unknown_detectors(tmp_path, capsys):
    code = main(["bench", "detection", "--zoo", str(DEMO_ZOO), "--out", str(tmp_path), "--only", "strip"])
    assert code == 4
    assert "unknown detector variants" in capsys.readouterr().err


def test_bench_lift_at_two_budgets_scores_each_class_at_its_strongest_budget(tmp_path):
    """The two-budget lift variant reads its own cached runs at 16/255 and scores exactly what a
    scan with ``extra_epsilons: [16/255]`` would decide on the same numbers."""
    from dataclasses import replace

    from gatekeeper.bench.detection import variant_metrics, variants
    from gatekeeper.decide import decide, floor_null, score_classes
    from gatekeeper.policy import load_policy
    from gatekeeper.result import ClassMetrics

    policy = tmp_path / "fast.yaml"
    policy.write_text("epsilon: 8/255\nood_budget: 64\nholdout: 32\nnull_copies: 0\n")
    out = tmp_path / "bench"
    argv = ["bench", "detection", "--zoo", str(DEMO_ZOO), "--out", str(out), "--policy", str(policy),
            "--only", "clip-inspector+lift+eps16", "--restarts", "1", "--null-copies", "0"]
    assert main(argv) == 0
    runs = {p.parent.name.rsplit("-", 1)[0] for p in out.glob("cache/*/*.json")} - {"null"}
    assert runs == {"ci-s0", "ref-s0", "ci-e16-s0", "ref-e16-s0"}, runs
    full = json.loads((out / "detection-full.json").read_text())["detectors"]["clip-inspector+lift+eps16"]
    assert full["null_models"] and all(n["n_tests"] == 24 for n in full["null_models"].values())  # 12 classes x 2 budgets
    # the same decision from the cached runs, through the scan's own combination
    v = next(v for v in variants(1, 0) if v.name == "clip-inspector+lift+eps16")
    p = replace(load_policy(policy), **dict(v.policy_changes))
    for m in full["models"]:
        runs_of = {}
        for r in v.all_runs:
            (path,) = [q for q in out.glob(f"cache/{r}-*/*.json") if q.stem in (m["model"],) or r.startswith("ref")]
            runs_of[r] = [ClassMetrics(**c) for c in json.loads(path.read_text())["classes"]]
        null = floor_null(p, 12)
        metrics = variant_metrics(v, runs_of, p, null)
        assert {x.epsilon for x in metrics} <= {8 / 255, 16 / 255}
        assert decide(score_classes(metrics, p, null), p, null).verdict.value == ("fail" if m["flagged"] else "pass")
