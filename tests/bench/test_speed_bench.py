"""bench speed at tiny shapes, in a process of its own (it switches the allocator one way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_RUN = """
import json, sys
from gatekeeper.bench.speed import run_speed_bench
out = run_speed_bench(vision_width=64, vision_layers=1, text_width=64, text_layers=1, n_classes=4, pool=8,
                      device="cpu", candidates=1, holdout=4, threads=1, breakdown=False, log=lambda s: None)
json.dump(out, open(sys.argv[1], "w"), default=str)
"""


def test_speed_bench_compares_both_allocators_and_reports_efficiency(tmp_path: Path) -> None:
    path = tmp_path / "speed.json"
    subprocess.run([sys.executable, "-c", _RUN, str(path)], check=True, timeout=600)
    out = json.loads(path.read_text())
    assert out["equal"]["asr_equal"] and out["equal"]["same_cstar"]
    assert out["allocator"] == "heap"  # glibc here: the headline is the allocator-neutral run
    assert out["speedup"] == out["reference_s"] / out["fast_s"]
    assert out["default_allocator"]["speedup"] > 0
    eff = out["cpu_efficiency"]
    assert eff["matmul_peak_gflop_per_cpu_s"] > 0
    assert eff["fast_of_peak"] == eff["fast_gflop_per_cpu_s"] / eff["matmul_peak_gflop_per_cpu_s"]
    # per CPU-second of the headline (heap allocator) runs
    assert eff["fast_gflop_per_cpu_s"] == out["flops"]["fast"] / out["headline_cpu_s"]["fast"] / 1e9
    assert set(out["heap_allocator_faults"]) == {"fast", "reference"}


def test_full_class_costs_grow_faster_than_the_number_of_classes():
    """Every candidate's step runs all K class prompts: doubling K more than doubles a full-class scan
    (the text part is K^2) but less than quadruples it (the image tower is per candidate), and the
    fast path stays cheaper."""
    from gatekeeper.bench.speed import QUICK_SIZES, full_class_costs

    rows = full_class_costs((2, 4, 8), n_pool=8, n_hold=4, sizes=QUICK_SIZES)
    for small, big in zip(rows, rows[1:], strict=False):
        for key in ("reference_pflop", "fast_pflop"):
            assert 2.0 < big[key] / small[key] < 4.0
        assert big["work_ratio"] > 1.0 and small["work_ratio"] > 1.0


def test_the_screening_makes_a_full_class_scan_cost_grow_with_the_classes_kept():
    """Behind the screening, a K-class scan inverts only ``keep`` classes in full; below ``keep`` it
    costs what the full-class scan does."""
    from gatekeeper.bench.speed import QUICK_SIZES, full_class_costs, measured_full_class

    rows = full_class_costs((2, 8, 32), n_pool=64, n_hold=32, sizes=QUICK_SIZES, keep=4, n_screen=8)
    assert rows[0]["screened_pflop"] == rows[0]["fast_pflop"] and rows[0]["screened_keep"] == 2
    assert rows[1]["screened_pflop"] < rows[1]["fast_pflop"] and rows[2]["screened_pflop"] < rows[2]["fast_pflop"] / 3
    assert [r["screened_keep"] for r in rows] == [2, 4, 4]
    measured = measured_full_class((2, 3), n_pool=4, n_hold=2)
    assert [r["classes"] for r in measured] == [2, 3] and all(r["seconds"] > 0 for r in measured)


def test_a_whole_scans_cost_counts_every_part_the_policy_runs():
    from dataclasses import replace

    import torch

    from gatekeeper.bench.speed import QUICK_SIZES, build_bench_model, shipped_policy_costs, whole_scan_pflop
    from gatekeeper.policy import PositiveControl, Scoring, load_policy

    costs = shipped_policy_costs(sizes=QUICK_SIZES, k=6)
    assert "positive control" not in costs["default"] and costs["tiny-world"]["positive control"] > 0
    model = build_bench_model(torch.device("cpu"), 6, vit_b16=False, sizes=QUICK_SIZES)
    lift = load_policy("tiny-world")
    assert lift.restarts == 1
    two = whole_scan_pflop(model, replace(lift, restarts=2))
    assert two["model"] == 2 * costs["tiny-world"]["model"]  # two restarts: twice the model's inversion
    # the lift rule re-scans the planted class alone; a z rule re-scans every class
    z = whole_scan_pflop(model, replace(lift, scoring=Scoring.DIFFERENTIAL, null_copies=0))
    assert z["positive control"] > costs["tiny-world"]["positive control"] and z["null copies"] == 0.0
    screened = whole_scan_pflop(model, replace(lift, screen_keep=2, positive_control=PositiveControl.OFF))
    assert screened["screening"] > 0 and screened["model"] == costs["tiny-world"]["model"] / 3


def test_the_tower_split_times_the_whole_step_and_the_image_tower_alone():
    import math

    import torch

    from gatekeeper.bench.speed import QUICK_SIZES, build_bench_model, image_text_flops, tower_split

    row = tower_split(6, batch=2, repeats=1, sizes=QUICK_SIZES)
    assert row["classes"] == 6 and row["batch"] == 2
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("step_s_per_image", "image_s_per_image"))
    assert row["image_share_measured"] == row["image_s_per_image"] / row["step_s_per_image"]
    img, txt = image_text_flops(build_bench_model(torch.device("cpu"), 6, sizes=QUICK_SIZES), fast=True)
    assert row["image_share_analytic"] == img / (img + txt)
