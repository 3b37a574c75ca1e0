"""Scan progress: the whole scan planned up front, one count over every pass, truthful to the end."""

from __future__ import annotations

import pytest

from gatekeeper.progress import plain_line
from gatekeeper.tracking import Stage, Tick, Tracker, pass_labels


def _record() -> tuple[list[Tick], Tracker]:
    ticks: list[Tick] = []
    return ticks, Tracker([Stage("model ε=8/255", 4), Stage("public backbone ε=8/255", 4), Stage("clean copy 1/1 ε=8/255: tuning", 3, "epoch")], ticks.append)


def _run_pass(track: Tracker, label: str, n: int, group: int = 1) -> None:
    progress = track.inversion_pass(label)
    for start in range(0, n, group):
        progress(start, n, f"class {start}")
    progress(n, n, "")


def test_a_pass_advances_the_whole_scan_and_ends_at_its_total():
    ticks, track = _record()
    assert track.total == 11
    _run_pass(track, "model ε=8/255", 4, group=3)  # a detector that inverts several classes per step
    _run_pass(track, "public backbone ε=8/255", 4)
    log = track.training("clean copy 1/1 ε=8/255: tuning", 3)
    for _ in range(3):
        log("epoch")
    track.finish()
    assert [t.done for t in ticks] == sorted(t.done for t in ticks)  # never goes back
    assert ticks[-1].done == ticks[-1].total == 11 and all(t.total == 11 for t in ticks)
    mid = next(t for t in ticks if t.stage.startswith("public") and t.stage_done == 2)
    assert (mid.stage_done, mid.stage_total, mid.done, mid.total) == (2, 4, 6, 11)


def test_stages_from_the_cache_or_never_run_leave_the_total_and_unplanned_ones_join_it():
    ticks, track = _record()
    _run_pass(track, "model ε=8/255", 4)
    track.cached(["public backbone ε=8/255"])
    assert ticks[-1].cached and ticks[-1].total == 7 and ticks[-1].done == 4
    _run_pass(track, "clean copy 9/9 ε=8/255", 2)  # not in the plan: counted as it runs
    track.finish()  # the planned tuning never ran
    assert ticks[-1].done == ticks[-1].total == 6


def test_plain_lines_name_the_pass_and_show_both_counts():
    tick = Tick("public backbone ε=8/255", 2, 12, 13, 48, "class", "cat\nsay")
    assert plain_line("scan", tick, 37.2) == "[scan] public backbone ε=8/255: class 3/12 'cat\\x0asay' (step 14/48, 37s)"
    assert plain_line("scan", Tick("positive control: planting", 12, 12, 40, 48, "epoch"), 5) == (
        "[scan] positive control: planting: 12/12 epochs done (step 40/48, 5s)"
    )
    assert plain_line("scan", Tick("model ε=8/255", 12, 12, 12, 48, "class"), 5) == "[scan] model ε=8/255: 12/12 classes done (step 12/48, 5s)"
    assert plain_line("scan", Tick("", 0, 0, 48, 48), 90) == "[scan] done: 48/48 steps in 90s"


def test_pass_labels_name_the_budget_and_the_restart():
    assert pass_labels("model", 8 / 255, 2) == ["model ε=8/255 restart 1/2", "model ε=8/255 restart 2/2"]
    assert pass_labels("public backbone", 16 / 255, 1) == ["public backbone ε=16/255"]


@pytest.mark.slow
def test_a_real_scan_reports_every_pass_and_ends_at_its_planned_total(model_factory, tmp_path, monkeypatch):
    """A tiny scan with every kind of stage (two budgets, two restarts, the public backbone, a clean
    copy, the positive control's planting and re-scan), the cache off so that every planned stage
    runs: the first tick's total is the last tick's done."""
    import gatekeeper.control as control
    import gatekeeper.null as null
    from gatekeeper.scan import ScanRequest, run_scan

    monkeypatch.setenv("GATEKEEPER_CACHE", "off")
    monkeypatch.setattr(null, "NULL_TRAIN_EPOCHS", 1)
    monkeypatch.setattr(control, "PLANT_EPOCHS", 2)
    monkeypatch.setattr(control, "N_PLANT", 16)
    monkeypatch.setattr(control, "MIN_PLANTED_ASR", 0.0)  # the re-scan runs whatever the tiny plant reached
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nepsilon: 8/255\nextra_epsilons: [16/255]\nood_budget: 16\nholdout: 8\nbatch_size: 8\n"
        "restarts: 2\nnull_copies: 1\npositive_control: badclip\nmin_trigger_asr: 0.0\n"
    )
    ticks: list[Tick] = []
    outcome = run_scan(ScanRequest(str(model_factory("coop")), tmp_path / "out", policy=str(policy), device="cpu"), ticks.append)
    assert outcome.result["positive_control"]["verdict"] != "not run", outcome.result["reason"]  # planted and re-scanned
    assert ticks[-1].stage == "" and ticks[-1].done == ticks[-1].total == ticks[0].total
    assert [t.done for t in ticks] == sorted(t.done for t in ticks) and not any(t.cached for t in ticks)
    stages = {t.stage for t in ticks}
    for eps in ("ε=8/255", "ε=16/255"):
        for r in (1, 2):
            for who in ("model", "public backbone", "clean copy 1/1", "positive control: scan, model"):
                assert f"{who} {eps} restart {r}/2" in stages, (who, eps, r, sorted(stages))
        assert f"clean copy 1/1 {eps}: tuning" in stages
    assert "positive control: planting" in stages
    ends = [t for t in ticks if t.stage and t.stage_done == t.stage_total]
    assert sum(t.stage_total for t in {t.stage: t for t in ends}.values()) == ticks[-1].total  # each stage counted once, in full
