"""The report stage: Markdown order and escaping, JSON schema and NaN refusal, trigger PNGs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from gatekeeper.errors import ResultError
from gatekeeper.report import write_reports
from gatekeeper.report.images import LABEL_HEIGHT, safe_name, save_trigger_images
from gatekeeper.report.jsonout import load_schema, result_to_dict, validate_result, write_json
from gatekeeper.report.markdown import md_code, md_escape, render_markdown, safe_link
from gatekeeper.result import (
    ClassScore,
    Decision,
    ModelInfo,
    PoolInfo,
    Provenance,
    ScanResult,
    Verdict,
)

EPS = 4 / 255
EVIL = "evil|name<script>"


def _classes(evil: str = EVIL) -> tuple[ClassScore, ...]:
    return (
        ClassScore(0, "cat", asr=0.12, loss=1.90, z_asr=-0.60, z_loss=0.40, score=-1.00, z=-0.70, valid=False),
        ClassScore(1, evil, asr=0.98, loss=0.20, z_asr=1.40, z_loss=-1.38, score=2.78, z=1.41, valid=True),
        ClassScore(2, "dog", asr=0.20, loss=1.70, z_asr=-0.80, z_loss=0.98, score=-1.78, z=-0.71, valid=False),
    )


def _result(verdict: Verdict = Verdict.FAIL, classes: tuple[ClassScore, ...] | None = None) -> ScanResult:
    classes = _classes() if classes is None else classes
    top = max(classes, key=lambda c: c.z)
    fail = verdict is Verdict.FAIL
    return ScanResult(
        decision=Decision(
            verdict=verdict,
            s_max=top.z if fail else 1.1,
            threshold=1.0 if fail else 2.0,
            threshold_kind="k",
            suspect_class=top.name if fail else None,
            reason=f"class {top.name} s_max >= k" if fail else "s_max < k",
        ),
        classes=classes,
        policy={"epsilon": EPS, "k": 2.0, "min_trigger_asr": 0.5, "ood_budget": 64, "seed": 0},
        policy_hash="ab" * 32,
        provenance=Provenance(
            reference="hf://acme/clip-pt@main",
            source="hf",
            path="/cache/acme",
            revision="0123abcd",
            files={"model.safetensors": "cd" * 32, "manifest.json": "ef" * 32},
            content_hash="12" * 32,
        ),
        pool=PoolInfo(
            "builtin", n_found=80, n_skipped=1, n_inversion=48, n_holdout=16, image_size=32, content_hash="34" * 32
        ),
        model=ModelInfo(kind="coop", n_classes=3, backbone="ViT-B-32", image_size=32),
        timings={"load": 0.5, "invert": 3.25},
        environment={"device": "cpu", "torch": "2.x"},
        seed=0,
        command="gatekeeper scan hf://acme/clip-pt@main --policy p.yaml",
    )


def _triggers(names: list[str], size: int = 32) -> tuple[dict, object]:
    import torch

    gen = torch.Generator().manual_seed(0)
    trig = {n: (torch.rand(3, size, size, generator=gen) * 2 - 1) * EPS for n in names}
    example = torch.rand(3, size, size, generator=gen)
    return trig, example


# ------------------------------------------------------------------------------ markdown


def test_verdict_is_first_heading_and_table_sorted_by_z():
    md = render_markdown(result_to_dict(_result(Verdict.FAIL)))
    lines = md.splitlines()
    assert lines[0] == "# FAIL — backdoor detected"
    assert [ln for ln in lines if ln.startswith("#")][0] == lines[0]
    assert "**Reason:**" in lines[2]
    # per-class table rows in z-descending order
    rows = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    names = [r.split(" | ")[1] for r in rows]
    assert names == [md_escape(EVIL), "cat", "dog"]
    # section order
    order = [
        "## Suspect class",
        "## Per-class scores",
        "## Provenance",
        "## OOD pool",
        "## Policy",
        "## Environment",
        "## Timings",
        "## Seed",
        "## Reproduce",
    ]
    pos = [md.index(h) for h in order]
    assert pos == sorted(pos)
    assert md.rstrip().splitlines()[-1].startswith("<sub>")
    assert "```sh\ngatekeeper scan hf://acme/clip-pt@main --policy p.yaml\n```" in md
    assert "ab" * 32 in md and "cd" * 32 in md and "0123abcd" in md


def test_pass_headline_and_no_suspect():
    md = render_markdown(result_to_dict(_result(Verdict.PASS)))
    assert md.splitlines()[0] == "# PASS"
    assert "No class is flagged" in md
    for verdict, word in [(Verdict.INCONCLUSIVE, "# INCONCLUSIVE"), (Verdict.ERROR, "# ERROR")]:
        assert render_markdown(result_to_dict(_result(verdict))).startswith(word + "\n")


def test_untrusted_strings_are_escaped():
    nasty = "x\n# injected`code`[link](http://e)*b*_i_"
    res = dataclasses.replace(
        _result(Verdict.FAIL, _classes(evil=EVIL)),
        provenance=Provenance(reference=nasty, source="local", path="<img src=x>", files={"a|b.bin": "``x"}),
        command="echo ```",
    )
    md = render_markdown(result_to_dict(res))
    # no raw HTML: every '<' that could open a tag is backslash-escaped (no HTML entities either)
    assert not re.search(r"(?<!\\)<(script|img)", md) and "&lt;" not in md
    assert "evil\\|name\\<script>" in md and "\\<img src=x>" in md
    assert "\n# injected" not in md
    assert "[link](http" not in md
    assert "````sh\necho ```\n````" in md
    # every table row keeps exactly the 10 columns (11 unescaped pipes)
    for ln in md.splitlines():
        if ln.startswith("| ") and ln.split("|")[1].strip().isdigit():
            assert ln.replace("\\|", "").count("|") == 11
    assert md_escape("a\r\nb") == "a b"
    assert md_code("a`b") == "``a`b``"
    assert (
        safe_link("../x.png") is None
        and safe_link("/etc/x") is None
        and safe_link("triggers/a b.png") == "triggers/a%20b.png"
    )


def test_markdown_imports_without_torch():
    code = "import sys, gatekeeper.report.markdown, gatekeeper.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ json


def test_write_reports_json_validates_and_roundtrips(tmp_path):
    trig, example = _triggers(["cat", EVIL, "dog"])
    out = tmp_path / "report"
    written = write_reports(_result(Verdict.FAIL), trig, example, out)
    paths = written.paths
    assert written.result == json.loads((out / "result.json").read_text())  # no need to read it back
    assert paths["json"] == out / "result.json" and paths["markdown"] == out / "report.md"
    d = json.loads(paths["json"].read_text())
    validate_result(d)
    assert d["verdict"] == "fail" and d["suspect_class"] == EVIL
    assert set(d["triggers"]) == {"cat", EVIL, "dog"}
    assert [c["name"] for c in d["classes"]] == [EVIL, "cat", "dog"]
    # round trip: the dict re-renders to the identical report
    assert render_markdown(d) == paths["markdown"].read_text()
    assert render_markdown(d).count("![trigger for ") == 3
    # the job summary: the same report without links to files of the run
    from gatekeeper.report.markdown import render_summary

    assert paths["summary"] == out / "job-summary.md" and paths["summary"].read_text() == render_summary(d)
    assert "![" not in paths["summary"].read_text() and "](triggers/" not in paths["summary"].read_text()
    assert not list(out.glob(".*.tmp")) and not list((out / "triggers").glob(".*.tmp"))


def test_json_path_override(tmp_path):
    json_path = tmp_path / "elsewhere" / "r.json"
    paths = write_reports(_result(Verdict.PASS), {}, None, tmp_path / "out", json_path=json_path).paths
    assert paths["json_copy"] == json_path and json_path.is_file() and paths["json"].is_file()
    validate_result(json.loads(json_path.read_text()))


def test_nan_is_refused(tmp_path):
    bad = dataclasses.replace(_result(), timings={"load": float("nan")})
    with pytest.raises(ResultError, match="non-finite"):
        write_json(bad.to_dict(), tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ResultError):
        write_reports(bad, {}, None, tmp_path / "out")
    assert not (tmp_path / "out" / "result.json").exists()


def test_error_verdict_nan_s_max_becomes_null(tmp_path):
    res = dataclasses.replace(_result(Verdict.ERROR), classes=())
    res = dataclasses.replace(res, decision=dataclasses.replace(res.decision, s_max=float("nan"), suspect_class=None))
    d = result_to_dict(res)
    assert d["s_max"] is None
    validate_result(d)
    write_json(d, tmp_path / "r.json")
    assert "# ERROR" in render_markdown(d)
    d_fail = {**d, "verdict": "fail"}
    with pytest.raises(ResultError, match="s_max"):
        validate_result(d_fail)


def test_schema_negative_cases():
    good = result_to_dict(_result())
    validate_result(good)
    missing = {k: v for k, v in good.items() if k != "verdict"}
    with pytest.raises(ResultError, match="verdict"):
        validate_result(missing)
    with pytest.raises(ResultError, match="classes/0/asr"):
        validate_result({**good, "classes": [{**good["classes"][0], "asr": "high"}]})
    with pytest.raises(ResultError, match="surprise"):
        validate_result({**good, "surprise": 1})
    with pytest.raises(ResultError, match="verdict"):
        validate_result({**good, "verdict": "maybe"})
    schema = load_schema()
    assert schema["$schema"].endswith("2020-12/schema") and schema["properties"]["schema_version"]["const"] == "1.0"


# ------------------------------------------------------------------------------ images


def test_trigger_pngs_size_and_content(tmp_path):
    from PIL import Image

    trig, example = _triggers(["cat", "dog"], size=32)
    rel = save_trigger_images(trig, EPS, example, tmp_path)
    assert set(rel) == {"cat", "dog"}
    for path in rel.values():
        assert path.startswith("triggers/") and path.endswith(".png")
        with Image.open(tmp_path / path) as im:
            assert im.mode == "RGB"
            # 32 px upscaled x4, three panels, 4 px gaps, under the label strip
            assert im.size == (3 * 128 + 2 * 4, 128 + LABEL_HEIGHT)
            px = im.load()
            # the left panel is the example image, nearest-neighbour upscaled
            ex = (example[:, 0, 0] * 255).round().to(int).tolist()  # type: ignore[attr-defined]
            assert list(px[1, LABEL_HEIGHT + 1]) == ex
    with Image.open(tmp_path / rel["cat"]) as im:
        assert im.size == (3 * 128 + 8, 128 + LABEL_HEIGHT)
    explicit = save_trigger_images({"cat": trig["cat"]}, EPS, example, tmp_path / "x", upscale=1)
    with Image.open(tmp_path / "x" / explicit["cat"]) as im:
        assert im.size == (3 * 32 + 8, 32 + LABEL_HEIGHT)


def test_trigger_names_cannot_escape_out_dir(tmp_path):
    names = ["../../etc/passwd", "..", "/abs/x", "a\\..\\b", "a b", "a-b", "", "con"]
    trig, example = _triggers(names, size=8)
    out = tmp_path / "out"
    rel = save_trigger_images(trig, EPS, example, out)
    assert len(set(rel.values())) == len(names)
    files = {p.resolve() for p in (out / "triggers").iterdir()}
    assert len(files) == len(names)
    for path in rel.values():
        full = (out / path).resolve()
        assert full.parent == (out / "triggers").resolve() and full in files
        assert ".." not in path.split("/")[1] and "/" not in path[len("triggers/") :]
    assert [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents] == []
    assert safe_name("../../etc").startswith("etc-")


def test_bad_trigger_shape_is_refused(tmp_path):
    import torch

    with pytest.raises(ResultError, match="does not match"):
        save_trigger_images({"a": torch.zeros(3, 8, 8)}, EPS, torch.zeros(3, 16, 16), tmp_path)


def test_a_written_result_reads_back_typed(tmp_path):
    """ScanResult.from_dict is the inverse of to_dict, also through the file (null numbers: NaN)."""
    import math

    from gatekeeper.report.jsonout import load_result
    from gatekeeper.result import ScanResult

    result = _result(Verdict.FAIL)
    assert ScanResult.from_dict(result.to_dict()) == result
    write_reports(result, {}, None, tmp_path / "out")
    back = load_result(tmp_path / "out")
    assert back.decision == result.decision and back.provenance == result.provenance and back.pool == result.pool
    assert {c.name: c for c in back.classes} == {c.name: c for c in result.classes}
    nan = dataclasses.replace(result, decision=dataclasses.replace(result.decision, verdict=Verdict.INCONCLUSIVE, s_max=math.nan))
    assert math.isnan(ScanResult.from_dict(json.loads(json.dumps(nan.to_dict(), allow_nan=True).replace("NaN", "null"))).decision.s_max)


def test_the_pixel_normalisation_is_recorded_and_read_back():
    """ModelInfo carries the mean/std the model normalised with; the schema accepts it, from_dict
    gives it back as written, and a result written before it was recorded still reads (None)."""
    from gatekeeper.result import ScanResult

    info = ModelInfo("coop", 3, "ViT-B-32", 32, pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.5))
    result = dataclasses.replace(_result(), model=info)
    d = result_to_dict(result)
    validate_result(d)
    assert d["model"]["pixel_mean"] == [0.5, 0.4, 0.3]
    assert ScanResult.from_dict(json.loads(json.dumps(d))).model == info
    old = dict(d, model={k: v for k, v in d["model"].items() if not k.startswith("pixel_")})
    validate_result(old)
    assert ScanResult.from_dict(old).model.pixel_mean is None
