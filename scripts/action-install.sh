#!/usr/bin/env bash
# The GitHub Action's `runtime: install`: gatekeeper in a virtualenv built from the action's own
# checkout ($GITHUB_ACTION_PATH, i.e. the ref written in `uses:`), kept in the runner's tool cache
# and in actions/cache. action.yml calls it twice (nothing else lives there):
#
#   action-install.sh plan     picks the interpreter, the torch flavour and the cache key; writes
#                              the step outputs venv, key, flavour, local (true: already built here)
#   action-install.sh install  builds the venv unless it is complete; writes ready and fresh
#                              (fresh: built by this run, so action.yml saves it to actions/cache)
#
# Torch flavour: cuda (torch from PyPI, CUDA bundled) when the runner's nvidia-smi lists a GPU and
# device is not cpu; otherwise cpu (torch + torchvision from the PyTorch CPU index, no CUDA libraries).
# Cache key: runner OS + arch, the interpreter's version, the flavour, the action's ref and a
# digest of the sources pip installs (a moving ref such as @main, or `uses: ./`, still gets a
# new venv when the code changes). The venv's path contains the key: a venv is never relocated.
#
# Neither command fails the step: a problem is reported on stderr and leaves no venv marked
# complete; the scan step then fails closed (exit 2) with the step outputs and the annotation.
# GATEKEEPER_TORCH_INDEX_URL (caller's env) replaces the PyTorch CPU index, e.g. with a mirror.

set -uo pipefail

# shellcheck source=scripts/action-entry.sh
source "$(dirname "${BASH_SOURCE[0]}")/action-entry.sh" # gk_say, gk_set_output, gk_check_inputs

GK_TORCH_CPU_INDEX=${GATEKEEPER_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# what `pip install <action path>` reads: pyproject's packages and force-include sources, the readme
GK_SOURCE_PATHS=(pyproject.toml README.md gatekeeper policies templates schemas zoo/demo zoo/backbone)
GK_MARKER=.gatekeeper-install # holds the key; written last, so only a complete venv has it
GK_USED=.gatekeeper-used      # touched on every use; venvs unused for GK_PRUNE_DAYS are removed
GK_PRUNE_DAYS=${GK_PRUNE_DAYS:-30}

gk_venv_root() {
  printf '%s/gatekeeper/venvs' "${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}"
}

# The torch flavour: cuda when the runner's nvidia-smi lists a GPU (and device is not cpu), else cpu.
gk_flavour() { # device
  if [[ $1 != cpu ]] && nvidia-smi -L >/dev/null 2>&1; then echo cuda; else echo cpu; fi
}

# sha256 of the installed sources (relative path + bytes of every file), 16 hex digits.
gk_source_digest() { # python root
  "$1" - "$2" "${GK_SOURCE_PATHS[@]}" <<'PY'
import hashlib, os, sys

root, tops = sys.argv[1], sys.argv[2:]
h = hashlib.sha256()
for top in tops:
    path = os.path.join(root, top)
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) if "__pycache__" not in d.split(os.sep)
            for f in names if not f.endswith(".pyc")
        )
    h.update(f"{top}:{len(files)}\0".encode())
    for f in files:
        h.update(os.path.relpath(f, root).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
print(h.hexdigest()[:16])
PY
}

# The interpreter the venv is made from: setup-python's (GK_PYTHON), else python3 from PATH.
gk_python() {
  local py=${GK_PYTHON:-}
  [[ -z $py ]] && py=$(command -v python3)
  [[ -n $py && -x $py ]] && printf '%s' "$py"
}

gk_plan() {
  local py version flavour ref digest key venv local_=false
  if ! gk_check_inputs 2>/dev/null; then
    gk_say "install: the inputs are invalid, nothing to install (the scan step says why)"
    return 0
  fi
  if ! py=$(gk_python); then
    gk_say "install: no python3 on this runner; set the python-version input (actions/setup-python) or install python3"
    return 0
  fi
  if ! version=$("$py" -c 'import platform, sys
assert sys.version_info >= (3, 10), "gatekeeper needs Python >= 3.10"
print(platform.python_implementation().lower() + ".".join(map(str, sys.version_info[:3])))'); then
    gk_say "install: $py cannot run gatekeeper (it needs Python >= 3.10); set the python-version input"
    return 0
  fi
  flavour=$(gk_flavour "${GK_DEVICE:-auto}")
  ref=${GK_ACTION_REF:-}
  ref=${ref//[^A-Za-z0-9._-]/-}
  digest=$(gk_source_digest "$py" "$GITHUB_ACTION_PATH") || { gk_say "install: cannot read the action's sources in $GITHUB_ACTION_PATH"; return 0; }
  key="gatekeeper-venv-${RUNNER_OS:-$(uname -s)}-${RUNNER_ARCH:-$(uname -m)}-${version}-${flavour}-${ref:-local}-${digest}"
  venv="$(gk_venv_root)/$key"
  [[ -f $venv/$GK_MARKER && $(<"$venv/$GK_MARKER") == "$key" ]] && local_=true
  gk_say "install: $flavour torch, $version ($py), key $key$([[ $local_ == true ]] && echo ', already built on this runner')"
  gk_set_output python "$py"
  gk_set_output flavour "$flavour"
  gk_set_output key "$key"
  gk_set_output venv "$venv"
  gk_set_output local "$local_"
}

# Is the venv complete and for this key? (A restored or reused venv must still start.)
gk_venv_ok() { # venv key
  [[ -f $1/$GK_MARKER && $(<"$1/$GK_MARKER") == "$2" && -x $1/bin/gatekeeper ]] && "$1/bin/gatekeeper" --version >/dev/null 2>&1
}

# Remove this runner's other gatekeeper venvs that no run has used for GK_PRUNE_DAYS days.
gk_prune() { # venv-to-keep
  local root used
  root=$(dirname "$1")
  while IFS= read -r -d '' used; do
    [[ $(dirname "$used") == "$1" ]] && continue
    gk_say "install: removing $(dirname "$used") (unused for more than $GK_PRUNE_DAYS days)"
    rm -rf -- "$(dirname "$used")"
  done < <(find "$root" -mindepth 2 -maxdepth 2 -name "$GK_USED" -mtime "+$GK_PRUNE_DAYS" -print0 2>/dev/null)
}

gk_build_venv() { # python venv flavour
  local py=$1 venv=$2 flavour=$3
  "$py" -m venv "$venv" || return 1
  if [[ $flavour == cpu ]]; then
    # first, so that gatekeeper's torch>=2.10 is already satisfied and PyPI's CUDA build never comes in
    "$venv/bin/python" -m pip install --no-cache-dir --index-url "$GK_TORCH_CPU_INDEX" torch torchvision || return 1
  fi
  "$venv/bin/python" -m pip install --no-cache-dir "$GITHUB_ACTION_PATH" || return 1
  # the whole stack must import before the venv is marked complete and cached: a torchvision built
  # for another torch installs fine and only fails here (and a cached broken venv would be restored
  # for every run with this key)
  "$venv/bin/python" -c 'import torch, torchvision, open_clip, gatekeeper.cli
print("gatekeeper install check: torch", torch.__version__, "cuda", torch.version.cuda)' || return 1
}

gk_install() {
  local venv=${GK_VENV:-} key=${GK_KEY:-} py=${GK_PYTHON:-} flavour=${GK_FLAVOUR:-cpu} ready=false fresh=false start
  if [[ -z $venv || -z $key || -z $py ]]; then
    : # the plan step said why
  elif gk_venv_ok "$venv" "$key"; then
    touch "$venv/$GK_USED"
    gk_say "install: reusing $venv"
    ready=true
  else
    start=$SECONDS
    gk_say "install: building $venv ($flavour torch; a cold install downloads torch: minutes)"
    rm -rf -- "$venv"
    mkdir -p "$(dirname "$venv")"
    if gk_build_venv "$py" "$venv" "$flavour" && "$venv/bin/gatekeeper" --version; then
      printf '%s' "$key" >"$venv/$GK_MARKER"
      touch "$venv/$GK_USED"
      gk_say "install: done in $((SECONDS - start)) s ($(du -sh "$venv" 2>/dev/null | cut -f1))"
      ready=true fresh=true
      gk_prune "$venv"
    else
      gk_say "install: installing gatekeeper failed after $((SECONDS - start)) s (pip's log above); the scan cannot run"
      rm -rf -- "$venv"
    fi
  fi
  gk_set_output ready "$ready"
  gk_set_output fresh "$fresh"
  return 0
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  case ${1:-} in
    plan) gk_plan ;;
    install) gk_install ;;
    *) echo "usage: action-install.sh plan|install (run by the gatekeeper GitHub Action)" >&2; exit 4 ;;
  esac
  exit $?
fi
