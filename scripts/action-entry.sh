#!/usr/bin/env bash
# The GitHub Action's scan step (action.yml maps inputs to GK_* variables; nothing else lives there).
#
# Runs `gatekeeper scan` (command: scan) or `gatekeeper audit` (command: audit) with gatekeeper
# from the venv scripts/action-install.sh built (runtime: install), from the container image
# (container) or from PATH (native), then publishes the outcome: step outputs (verdict, s-max,
# suspect-class, report-path, json-path, sarif-path, exit-code), job-summary.md (report.md without
# image links, top 20 classes; audit: summary.md) in the job summary unless `summary: false`
# (truncated below GitHub's 1 MiB limit), one annotation, and the exit code the `fail-on` input
# maps the CLI's exit code to.
#
#   fail-on       fails the step on
#   inconclusive  backdoor (1), inconclusive (3), scan error (2), usage error (4)   [default]
#   backdoor      backdoor (1), scan error (2), usage error (4); inconclusive only warns
#   nothing       usage error (4) only: a misconfigured gate never fixes itself; findings warn
#
# A failing step exits with the scan's own exit code (anything outside 0-4, e.g. docker's 125,
# becomes 2). Needs bash and python3 (stdlib only) on the runner. Source this file to reuse the
# functions (the tests do); it only runs `gk_main` when executed.
#
# HF_TOKEN is inherited from the environment and handed to the container by name (-e HF_TOKEN);
# its value never appears on a command line, in the log or in any output.

set -uo pipefail # no -e: the scan's exit code is data, not a reason to stop

GK_SUMMARY_LIMIT=${GK_SUMMARY_LIMIT:-1000000} # bytes; GitHub refuses step summaries over 1 MiB
GK_CONTAINER_WORKDIR=/github/workspace
GK_CONTAINER_OUT=/github/gatekeeper-out
GK_LINE=.scan-line.json # the scan's stdout: its `--format json` line, the one source of the step's outputs
GK_AUDIT_SUMMARY=summary.json # audit: the CLI's own summary (overall.exit_code), the source of the outputs

# Workflow-command escaping (toolkit's escapeData): % first, then CR and LF.
gk_escape_data() {
  local s=$1
  s=${s//'%'/%25}
  s=${s//$'\r'/%0D}
  s=${s//$'\n'/%0A}
  printf '%s' "$s"
}

gk_say() { echo "gatekeeper action: $(gk_escape_data "$*")" >&2; } # one line, whatever the input holds

gk_annotate() { # level message
  printf '::%s title=gatekeeper::%s\n' "$1" "$(gk_escape_data "$2")"
}

# Print FILE cut to at most LIMIT bytes (a UTF-8 boundary, a line end when one is near), plus a
# note that points at the full report. Prints the file unchanged when it fits.
gk_truncate() { # file limit [full-report-path]
  python3 - "$1" "$2" "${3:-$1}" <<'PY'
import sys

path, limit, full = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
out = sys.stdout.buffer
if len(data) <= limit:
    out.write(data)
    sys.exit(0)
note = (
    f"\n\n---\n> **Report truncated** to fit GitHub's 1 MiB job-summary limit ({len(data):,} bytes in full). "
    f"The complete report is `{full}` in the job's artifact.\n"
).encode()
head = data[: max(0, limit - len(note))]
head = head.decode("utf-8", "ignore").encode()  # drops a multi-byte character cut in half
cut = head.rfind(b"\n")
if cut >= len(head) - 4096:  # end on a whole line when one is near, so a table row is not split
    head = head[: cut + 1]
out.write(head + note)
PY
}

# Markdown on stdin without relative image links, which do not resolve in a job summary: a line that
# is only an image goes, a table's "[image](...)" cell is left empty. Absolute URLs are kept.
gk_drop_image_links() {
  sed -E -e '/^!\[.*\]\([^):]*\)$/d' -e 's/\[image\]\([^):]*\)//g'
}

# Write NAME=VALUE to $GITHUB_OUTPUT in the heredoc form, with a random delimiter that is not in VALUE.
gk_set_output() { # name value
  local delim
  while :; do
    delim="EOF_$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
    [[ $2 != *"$delim"* ]] && break
  done
  printf '%s<<%s\n%s\n%s\n' "$1" "$delim" "$2" "$delim" >>"$GITHUB_OUTPUT"
}

# verdict, s_max, threshold, suspect class and exit code from the CLI's own `--format json` line,
# one per line (empty when null). The Action never derives a verdict itself: it reports the CLI's.
gk_read_line() { # file holding the scan's stdout
  python3 - "$1" <<'PY'
import json, math, sys

try:
    lines = [ln for ln in open(sys.argv[1], encoding="utf-8").read().splitlines() if ln.strip()]
    d = json.loads(lines[-1])
    assert isinstance(d, dict)
except (OSError, ValueError, IndexError, AssertionError):
    sys.exit(1)
def num(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return f"{v:.4f}" if ok else ""
cls = d.get("suspect_class")
code = d.get("exit_code")
print(d.get("verdict") or "")
print(num(d.get("s_max")))
print(num(d.get("threshold")))
# one line per field: a class name with a line break is flattened (it is only displayed)
print("" if cls is None else " ".join(str(cls).splitlines()))
print(code if isinstance(code, int) and not isinstance(code, bool) else "")
PY
}

# The same five lines from an audit's summary.json: the verdict of its overall exit code (the worst
# model's: 2 error > 1 fail > 3 inconclusive > 0 pass), no s_max, threshold or class.
gk_read_audit() { # summary.json
  python3 - "$1" <<'PY'
import json, sys

try:
    code = json.load(open(sys.argv[1], encoding="utf-8"))["overall"]["exit_code"]
    assert isinstance(code, int) and not isinstance(code, bool)
except (OSError, ValueError, KeyError, TypeError, AssertionError):
    sys.exit(1)
print({0: "pass", 1: "fail", 3: "inconclusive"}.get(code, "error"))
print("\n\n")
print(code)
PY
}

# Should the step fail? Prints the step's exit code: 0, or the scan's code (unknown codes -> 2).
gk_gate() { # scan-exit-code fail-on
  local code=$1 fail_on=$2
  case $code in 0 | 1 | 2 | 3 | 4) ;; *) code=2 ;; esac
  case $fail_on:$code in
    *:0) echo 0 ;;
    nothing:4 | backdoor:[124] | inconclusive:*) echo "$code" ;;
    *) echo 0 ;;
  esac
}

# Where `gatekeeper audit` keeps its verdict cache between runs (the runner's tool cache persists on
# self-hosted runners); extra-args `--cache DIR` replaces it.
gk_audit_cache() {
  printf '%s/gatekeeper/audit-cache' "${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}"
}

# The CLI's argv into the array GK_ARGS (extra-args split like a shell would, never evaluated).
gk_build_args() { # out-dir-as-seen-by-gatekeeper [audit-cache-as-seen-by-gatekeeper]
  local out=$1 model=${GK_MODEL:-} policy=${GK_POLICY:-default} inventory=${GK_INVENTORY:-}
  local ws=${GITHUB_WORKSPACE:-$PWD}
  # a path under the workspace is passed relative, so it resolves inside the container too
  [[ $model == "$ws"/* ]] && model=${model#"$ws"/}
  [[ $policy == "$ws"/* ]] && policy=${policy#"$ws"/}
  [[ $inventory == "$ws"/* ]] && inventory=${inventory#"$ws"/}
  if [[ ${GK_COMMAND:-scan} == audit ]]; then
    # the inventory names its models, policies and pool; `policy` replaces its shared policy only when set
    GK_ARGS=(audit "$inventory" --out "$out" --cache "${2:-$(gk_audit_cache)}" --device "${GK_DEVICE:-auto}")
    [[ -n ${GK_POLICY:-} && $GK_POLICY != default ]] && GK_ARGS+=(--policy "$policy")
  else
    GK_ARGS=(scan "$model" --policy "$policy" --ood "${GK_OOD:-procedural}" --out "$out"
      --sarif "$out/results.sarif" --device "${GK_DEVICE:-auto}" --format json)
    [[ -n ${GK_REVISION:-} ]] && GK_ARGS+=(--revision "$GK_REVISION")
    [[ -n ${GK_SARIF_CATEGORY:-} ]] && GK_ARGS+=(--sarif-category "$GK_SARIF_CATEGORY")
  fi
  if [[ -n ${GK_EXTRA_ARGS:-} ]]; then
    local extra
    mapfile -d '' extra < <(python3 -c 'import os, shlex, sys
for a in shlex.split(os.environ["GK_EXTRA_ARGS"]): sys.stdout.write(a + "\0")') || return 4
    GK_ARGS+=("${extra[@]}")
  fi
  return 0
}

# The gatekeeper executable of runtime native (PATH) or install (the venv action-install.sh built
# and marked complete); says why and fails when there is none.
gk_executable() {
  if [[ ${GK_RUNTIME:-install} == native ]]; then
    if ! command -v gatekeeper; then
      gk_say "runtime: native, but gatekeeper is not on PATH (pip install gatekeeper-clip, or use runtime: install)"
      return 4
    fi
  elif [[ -n ${GK_VENV:-} && -f $GK_VENV/.gatekeeper-install && -x $GK_VENV/bin/gatekeeper ]]; then
    printf '%s\n' "$GK_VENV/bin/gatekeeper"
  else
    gk_say "runtime: install, but gatekeeper could not be installed on this runner (the install step's log says why)"
    return 2 # the model was not checked: fails closed like any scan that could not complete
  fi
}

# Run the scan (or audit); returns its exit code. The log is fenced with stop-commands so that text
# from the model (class names in progress lines and errors) cannot issue workflow commands.
gk_run_scan() { # out-dir
  local out=$1 code token exe
  token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  if [[ ${GK_RUNTIME:-install} != container ]]; then
    exe=$(gk_executable) || return $?
    gk_build_args "$out" || return 4
    echo "::stop-commands::$token"
    "$exe" "${GK_ARGS[@]}" >"$out/$GK_LINE"
    code=$?
  else
    if ! command -v docker >/dev/null; then
      gk_say "runtime: container, but docker is not installed on this runner (use runtime: native)"
      return 4
    fi
    local ws=${GITHUB_WORKSPACE:-$PWD} cache verdicts docker_args
    cache=${GK_HF_CACHE:-${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}/gatekeeper/huggingface}
    verdicts=$(gk_audit_cache)
    mkdir -p "$cache" "$verdicts"
    gk_build_args "$GK_CONTAINER_OUT" /cache/verdicts || return 4
    docker_args=(run --rm --user "$(id -u):$(id -g)"
      -e HF_TOKEN -e HF_ENDPOINT -e HF_HUB_OFFLINE -e GATEKEEPER_DEBUG
      -v "$ws:$GK_CONTAINER_WORKDIR" -w "$GK_CONTAINER_WORKDIR"
      -v "$(cd "$out" && pwd):$GK_CONTAINER_OUT" -v "$cache:/cache/huggingface")
    [[ ${GK_COMMAND:-scan} == audit ]] && docker_args+=(-v "$verdicts:/cache/verdicts")
    case ${GK_DEVICE:-auto} in
      cuda*) docker_args+=(--gpus all) ;;
      auto) command -v nvidia-smi >/dev/null && docker_args+=(--gpus all) ;;
    esac
    echo "::stop-commands::$token"
    docker "${docker_args[@]}" "$GK_IMAGE" "${GK_ARGS[@]}" >"$out/$GK_LINE"
    code=$?
  fi
  cat "$out/$GK_LINE" 2>/dev/null # the CLI's line in the log too, still inside the fence
  echo "::$token::"
  return "$code"
}

# Validate the inputs the script itself interprets; says what is wrong and fails on the first bad one.
gk_check_inputs() {
  case ${GK_FAIL_ON:-inconclusive} in inconclusive | backdoor | nothing) ;; *)
    gk_say "fail-on must be inconclusive, backdoor or nothing (got '${GK_FAIL_ON}')"
    return 1 ;;
  esac
  case ${GK_RUNTIME:-install} in install | container | native) ;; *)
    gk_say "runtime must be install, container or native (got '${GK_RUNTIME}')"
    return 1 ;;
  esac
  case ${GK_SUMMARY:-true} in true | false) ;; *)
    gk_say "summary must be true or false (got '${GK_SUMMARY}')"
    return 1 ;;
  esac
  case ${GK_COMMAND:-scan} in
    scan)
      if [[ -z ${GK_MODEL:-} ]]; then
        gk_say "the model input is empty (command: scan needs a model)"
        return 1
      fi ;;
    audit)
      if [[ -z ${GK_INVENTORY:-} ]]; then
        gk_say "the inventory input is empty (command: audit needs an inventory YAML)"
        return 1
      fi
      # the inventory names the models, their revisions and the pool: a scan-only input is a mistake
      local name value
      for name in model revision ood sarif-category; do
        case $name in
          model) value=${GK_MODEL:-} ;;
          revision) value=${GK_REVISION:-} ;;
          ood) value=${GK_OOD:-procedural}; [[ $value == procedural ]] && value="" ;;
          sarif-category) value=${GK_SARIF_CATEGORY:-} ;;
        esac
        if [[ -n $value ]]; then
          gk_say "the $name input applies to command: scan only (the inventory names models, revisions and the pool; audit writes no SARIF)"
          return 1
        fi
      done ;;
    *)
      gk_say "command must be scan or audit (got '${GK_COMMAND}')"
      return 1 ;;
  esac
  if [[ ${GK_RUNTIME:-install} == container && ( -z ${GK_IMAGE:-} || ${GK_IMAGE} == *OWNER* ) ]]; then
    gk_say "runtime: container needs the image input set to your published gatekeeper image (got '${GK_IMAGE:-}')"
    return 1
  fi
}

gk_main() {
  if [[ -z ${GITHUB_OUTPUT:-} ]]; then
    echo "action-entry.sh: GITHUB_OUTPUT is unset; this script runs as the gatekeeper GitHub Action" >&2
    return 4
  fi
  local out=${GK_OUTPUT_DIR:-gatekeeper-report} fail_on=${GK_FAIL_ON:-inconclusive}
  local code verdict="" s_max="" threshold="" suspect="" step_code audit=false subject=${GK_MODEL:-}
  if [[ ${GK_COMMAND:-scan} == audit ]]; then
    audit=true subject="inventory ${GK_INVENTORY:-}"
  fi
  # summary: false writes no job summary (the report stays in output-dir); the summary code below
  # then sees no GITHUB_STEP_SUMMARY
  [[ ${GK_SUMMARY:-true} == false ]] && local GITHUB_STEP_SUMMARY=""
  # never report a previous run's verdict: a scan that dies early must leave no result behind
  rm -f "$out/result.json" "$out/report.md" "$out/results.sarif" "$out/$GK_LINE" \
    "$out/$GK_AUDIT_SUMMARY" "$out/summary.md" "$out/job-summary.md"
  if ! gk_check_inputs || ! mkdir -p "$out"; then
    code=4 fail_on=inconclusive # a misconfigured gate fails, whatever fail-on says
  else
    gk_run_scan "$out"
    code=$?
  fi

  local result=$out/result.json report=$out/report.md sarif=$out/results.sarif fields=()
  if [[ $audit == true ]]; then
    result=$out/$GK_AUDIT_SUMMARY report=$out/summary.md sarif=""
    [[ -f $result ]] && mapfile -t fields < <(gk_read_audit "$result")
  elif [[ -f $out/$GK_LINE ]]; then
    mapfile -t fields < <(gk_read_line "$out/$GK_LINE")
  fi
  if ((${#fields[@]} == 5)); then
    verdict=${fields[0]} s_max=${fields[1]} threshold=${fields[2]} suspect=${fields[3]}
    [[ ${fields[4]} == "$code" ]] || verdict=error # the line and the process must tell the same story
  fi
  # the verdict must agree with the exit code; anything else fails closed as an error
  case $code:$verdict in
    0:pass | 0:inconclusive | 1:fail | 3:inconclusive) ;;
    *) verdict=error ;;
  esac
  [[ $verdict == error && $code == 0 ]] && code=2

  gk_set_output verdict "$verdict"
  gk_set_output s-max "$s_max"
  gk_set_output suspect-class "$suspect"
  gk_set_output report-path "$([[ -f $report ]] && echo "$report")"
  gk_set_output json-path "$([[ -f $result ]] && echo "$result")"
  gk_set_output sarif-path "$([[ -n $sarif && -f $sarif ]] && echo "$sarif")"
  gk_set_output exit-code "$code"

  if [[ -n ${GITHUB_STEP_SUMMARY:-} ]]; then
    # a scan writes job-summary.md for this: report.md without links to files of the run (they do
    # not resolve in a summary; the images are in output-dir) and with the top 20 classes only
    if [[ $audit == false && -f $out/job-summary.md ]]; then
      gk_truncate "$out/job-summary.md" "$GK_SUMMARY_LIMIT" "$report" >>"$GITHUB_STEP_SUMMARY"
    elif [[ -f $report ]]; then # (an older gatekeeper writes no job-summary.md: its image links go)
      gk_truncate "$report" "$GK_SUMMARY_LIMIT" "$report" | gk_drop_image_links >>"$GITHUB_STEP_SUMMARY"
    else
      printf '## gatekeeper: scan could not complete (exit %s)\n\nNo verdict: the model was not checked. The step log has the error and what to do next.\n' \
        "$code" >>"$GITHUB_STEP_SUMMARY"
    fi
  fi

  local message
  case $audit:$verdict in
    false:fail) message="Backdoor detected in $GK_MODEL: suspect class '$suspect' (s_max $s_max >= threshold $threshold). Report: $report" ;;
    true:fail) message="Re-audit of $subject: a backdoor was detected in at least one model (exit 1). Summary: $report" ;;
    false:inconclusive) message="Scan of $GK_MODEL was inconclusive (exit $code): the model is not verified. Report: $report" ;;
    true:inconclusive) message="Re-audit of $subject: at least one model was inconclusive (exit $code), not verified. Summary: $report" ;;
    *:error)
      if ((code == 4)); then
        message="Usage, policy or action-input error (exit 4): ${subject:-(no model)} was not checked. See the step log."
      elif [[ $audit == true && -f $report ]]; then
        message="Re-audit of $subject: at least one model could not be checked (exit $code). Summary: $report"
      elif [[ $audit == true ]]; then
        message="Re-audit of $subject could not complete (exit $code): no model was checked. See the step log."
      else
        message="Scan of $GK_MODEL could not complete (exit $code): the model was not checked. See the step log."
      fi ;;
    *) message="" ;;
  esac
  step_code=$(gk_gate "$code" "$fail_on")
  if ((step_code != 0)); then
    gk_annotate error "$message"
  elif [[ -n $message ]]; then
    gk_annotate warning "$message (fail-on: $fail_on, not failing the step)"
  fi
  return "$step_code"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  gk_main
  exit $?
fi
