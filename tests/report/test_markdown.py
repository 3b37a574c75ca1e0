"""report.md and the job summary as a reviewer reads them raw: no HTML entities, no long floats,
ε as n/255, a "What to do next" for every verdict, and a job summary that stays small and links
no file of the run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.report.jsonout import result_to_dict, validate_result
from gatekeeper.report.markdown import SUMMARY_ROWS, md_escape, render_markdown, render_summary
from gatekeeper.result import (
    ClassScore,
    ControlOutcome,
    Decision,
    ModelInfo,
    NullModel,
    PoolInfo,
    Provenance,
    ScanResult,
    Verdict,
)

ENTRY = Path(__file__).resolve().parents[2] / "scripts" / "action-entry.sh"
EPS = 8 / 255  # 0.03137254901960784
LONG_FLOAT = re.compile(r"\d\.\d{10,}")  # a float printed with its full binary precision
ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);")
FENCE = re.compile(r"^(`{3,})[a-z]*\n.*?^\1$", re.M | re.S)


def _outside_fences(md: str) -> str:
    """The report without its verbatim blocks (the policy record and the command are exact on purpose)."""
    return FENCE.sub("", md)


def _result(n: int, **fields: Any) -> ScanResult:
    """A result of an n-class 32 px CoOp model with what every report test shares; ``fields`` the rest."""
    return ScanResult(
        policy_hash="ab" * 32, model=ModelInfo(kind="coop", n_classes=n, backbone="ViT-B-32", image_size=32),
        environment={"device": "cpu"}, seed=0, **fields,
    )


def _lift_result(verdict: Verdict = Verdict.FAIL, n: int = 3) -> ScanResult:
    """A lift-scoring result at two budgets (8/255 and 16/255) with a positive control; the numbers
    carry their full binary precision, as a real scan's do."""
    names = ["stop <sign>", "cat & dog", *[f"class {i}" for i in range(n - 2)]]
    classes = tuple(
        ClassScore(
            i, name, asr=0.9123456789012345 - i / (10 * n), loss=0.123456789012345, z_asr=0.0, z_loss=0.0, score=0.0,
            z=0.3141592653589793 - i / n, valid=True, reference_asr=0.1234567890123456, reference_loss=1.0987654321,
            lift=0.7888888888888889 - i / n, lift_lower=0.3141592653589793 - i / n, flagged=i == 0 and verdict is Verdict.FAIL,
            epsilon=EPS if i % 2 else 16 / 255,
        )
        for i, name in enumerate(names)
    )
    fail = verdict is Verdict.FAIL
    reason = {
        Verdict.FAIL: "1 class ('stop <sign>') became far easier to reach: lower bound (+31) >= margin 12 (ASR < 50% elsewhere) & more",
        Verdict.PASS: "no class became easier to reach than clean tuning allows: lower bound <= null margin",
        Verdict.INCONCLUSIVE: "non-finite losses or scores",
        Verdict.ERROR: "the backbone could not be loaded -> check backbone in gatekeeper.json",
    }[verdict]
    return _result(
        n,
        decision=Decision(verdict, 0.3141592653589793, 0.1234567891234567, "null margin", names[0] if fail else None, reason,
                          (names[0],) if fail else ()),
        classes=classes,
        policy={"epsilon": EPS, "extra_epsilons": [16 / 255], "scoring": "lift", "min_trigger_asr": 0.5, "holdout": 64},
        provenance=Provenance("hf://acme/clip-pt@main", "hf", "/cache/acme", "0123abcd", {"gatekeeper.json": "cd" * 32},
                              "12" * 32, {"security_status": "safe"}),
        pool=PoolInfo("procedural:0", 128, 0, 64, 64, 32, "34" * 32),
        timings={"invert": 12.345678901234567},
        command="gatekeeper scan hf://acme/clip-pt@main --policy p.yaml",
        triggers={name: f"triggers/t{i}.png" for i, name in enumerate(names[:5])},
        positive_control=ControlOutcome("cat & dog", EPS, 0.9765432109876543, True, "fail", 0.4123456789012345,
                                        "cat & dog", 12.345678901234567, "caught: statistic 0.41 > 0.12"),
        null_model=NullModel(0.1234567891234567, 0.05, "clean copies", 2, (0.0712345678901234, 0.0812345678901234),
                             0.05, 2.878162144383, 2 * n, 64, 3.3333333333333335),
    )


def _paper_result(verdict: Verdict, n: int = 3) -> ScanResult:
    classes = tuple(
        ClassScore(i, f"class {i}", asr=0.97 - i / (2 * n), loss=0.2 + i / n, z_asr=1.0 - i / n, z_loss=-1.0 + i / n,
                   score=2.0 - 2 * i / n, z=2.5 - 5 * i / n, valid=i == 0)
        for i in range(n)
    )
    fail = verdict is Verdict.FAIL
    return _result(
        n,
        decision=Decision(verdict, 2.5, 2.0, "k", "class 0" if fail else None, "s_max = 2.50 >= k = 2.00" if fail else "s_max < k"),
        classes=classes,
        policy={"epsilon": EPS, "k": 2.0, "min_trigger_asr": 0.5, "scoring": "paper"},
        provenance=Provenance("models/m", "local", "/repo/models/m", None, {}, "12" * 32),
        pool=PoolInfo("procedural:0", 96, 0, 64, 32, 32, "34" * 32),
        timings={"invert": 1.0},
        command="gatekeeper scan models/m",
        triggers={f"class {i}": f"triggers/class-{i}.png" for i in range(min(n, 5))},
    )


def _sized_result(n: int) -> ScanResult:
    """A baseline detector's result (trigger sizes): the third table of the report."""
    base = _paper_result(Verdict.PASS, n)
    classes = tuple(ClassScore(**{**c.__dict__, "size": 10.0 + c.index}) for c in base.classes)
    return ScanResult(**{**base.__dict__, "classes": classes, "policy": {**base.policy, "detector": "neural-cleanse"}})


# ---------------------------------------------------------------------------- raw text: entities, floats, ε


def test_md_escape_writes_no_entities_and_still_stops_injection():
    assert md_escape("a <= b >= c & d") == "a <= b >= c & d"  # as written
    assert md_escape("x < 50% > y") == "x < 50% > y"
    assert md_escape("<img src=x>") == "\\<img src=x>"  # a tag cannot open
    assert md_escape("</details><!-- x --><?php") == "\\</details><\\!-- x -->\\<?php"  # '<\\!' opens nothing
    assert md_escape("&lt;script&gt; &#60; &#x3c;") == "\\&lt;script\\&gt; &\\#60; &\\#x3c;"  # no reference decodes
    assert md_escape("> quoted") == "\\> quoted" and md_escape("  > q") == "  \\> q"  # no block quote
    assert md_escape("[a](http://e) *b* `c` | d") == "\\[a\\](http://e) \\*b\\* \\`c\\` \\| d"
    assert md_escape(0.03137254901960784) == "0.0313725" and md_escape(3) == "3"


def test_raw_markdown_has_no_html_entities_and_no_long_floats():
    for result in (_lift_result(Verdict.FAIL), _lift_result(Verdict.PASS), _paper_result(Verdict.FAIL)):
        d = result_to_dict(result)
        validate_result(d)
        d["environment"]["probe"] = 0.03137254901960784  # floats that slipped into free-form fields
        d["provenance"]["extra"]["epsilon"] = EPS
        for md in (render_markdown(d), render_summary(d)):
            assert not ENTITY.search(md), ENTITY.search(md)
            outside = _outside_fences(md)
            assert not LONG_FLOAT.search(outside), outside[max(0, LONG_FLOAT.search(outside).start() - 80) :][:160]  # type: ignore[union-attr]
            assert "8/255" in outside
    md = render_markdown(result_to_dict(_lift_result(Verdict.FAIL)))
    assert "0.03137254901960784" in md.split("## Policy")[1]  # the policy block stays the exact record
    assert "lower bound (+31) >= margin 12 (ASR < 50% elsewhere) & more" in md  # the reason, as decide wrote it
    assert "ℓ∞ ≤ 8/255" in md  # the positive control's budget as the policy writes it
    assert "| 8/255 |" in md and "| 16/255 |" in md  # the budget column
    assert "**stop \\<sign>**" in md  # an untrusted class name: escaped, without entities
    paper = render_markdown(result_to_dict(_paper_result(Verdict.FAIL)))
    assert "(ℓ∞ ≤ ε = 8/255)" in paper


# ---------------------------------------------------------------------------- what to do next


_NEXT = {
    Verdict.FAIL: ("Do not deploy", "scan again", "accepted_findings"),
    Verdict.PASS: ("scan again when",),
    Verdict.INCONCLUSIVE: ("not verified", "ood_budget", "--ood", "on_inconclusive"),
    Verdict.ERROR: ("not checked", "never a pass", "scan again"),
}


def _section(md: str, title: str) -> str:
    head = f"\n## {title}\n"
    assert md.count(head) == 1, f"{title!r} appears {md.count(head)} times"
    body = md.split(head, 1)[1]
    return body.split("\n## ", 1)[0].strip()


@pytest.mark.parametrize("scoring", ["lift", "paper"])
@pytest.mark.parametrize("verdict", list(Verdict))
def test_what_to_do_next_is_there_for_every_verdict_and_says_what_to_do(verdict, scoring):
    result = _lift_result(verdict) if scoring == "lift" else _paper_result(verdict)
    md = render_markdown(result_to_dict(result))
    text = _section(md, "What to do next")
    for phrase in _NEXT[verdict]:
        assert phrase in text, (verdict, scoring, text)
    others = {p for v, phrases in _NEXT.items() if v is not verdict for p in phrases} - set(_NEXT[verdict])
    assert not [p for p in others if p in text and p not in ("scan again",)], text  # one verdict's advice only
    assert md.index("## What to do next") < md.index("## Per-class scores")
    assert _section(render_summary(result_to_dict(result)), "What to do next") == text


# ---------------------------------------------------------------------------- the job summary


def _table_rows(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]


@pytest.mark.parametrize("make", [_paper_result, _lift_result, _sized_result], ids=["paper", "lift", "sized"])
def test_a_1000_class_summary_has_20_rows_and_no_relative_links(make):
    result = make(Verdict.PASS, 1000) if make is not _sized_result else make(1000)
    d = result_to_dict(result)
    report, summary = render_markdown(d), render_summary(d)
    assert len(_table_rows(report)) == 1000 and report.count("![trigger for ") == 5
    rows = _table_rows(summary)
    assert len(rows) == SUMMARY_ROWS == 20
    assert [r.split("|")[1].strip() for r in rows] == [str(i) for i in range(1, 21)]  # the top 20, in order
    assert "\n980 more classes in report.md.\n" in summary
    # no link to a file of the run: no image, no relative link target at all
    assert "![" not in summary and not re.search(r"\]\((?![a-z][a-z0-9+.-]*:)", summary)
    assert "`triggers/" in summary and "output folder" in summary  # where the images are instead
    assert len(summary.encode()) < len(report.encode()) / 5


def test_a_small_summary_keeps_every_row_and_says_nothing_is_left_out():
    d = result_to_dict(_paper_result(Verdict.FAIL))
    summary = render_summary(d)
    assert len(_table_rows(summary)) == 3 and "more classes in report.md" not in summary
    assert summary.startswith("# FAIL")  # the Action's annotation and tests read the headline first


def test_the_action_drops_image_links_from_a_report_without_a_job_summary():
    """An older gatekeeper writes no job-summary.md; the Action then shows its report.md without the
    links that do not resolve in a summary (tables keep their columns, absolute URLs stay)."""
    md = render_markdown(result_to_dict(_paper_result(Verdict.FAIL)))
    md += "![absolute](https://example.com/x.png)\n"
    proc = subprocess.run(
        ["bash", "-c", f'source "{ENTRY}"; gk_drop_image_links'], input=md, capture_output=True, text=True, check=True
    )
    out = proc.stdout
    assert "![trigger for" not in out and "](triggers/" not in out
    assert "![absolute](https://example.com/x.png)" in out
    assert [r.count("|") for r in _table_rows(out)] == [r.count("|") for r in _table_rows(md)]


def test_the_model_section_states_the_backbones_normalisation():
    from dataclasses import replace

    base = _lift_result(Verdict.PASS)
    info = replace(base.model, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.26862954, 0.26130258, 0.27577711))
    md = render_markdown(result_to_dict(replace(base, model=info)))
    assert "- normalisation (the backbone's own): mean 0.500, 0.500, 0.500, std 0.269, 0.261, 0.276" in md
    assert "normalisation" not in render_markdown(result_to_dict(base))  # a result that recorded none says nothing
