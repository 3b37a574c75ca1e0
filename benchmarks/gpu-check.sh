#!/usr/bin/env bash
# The GPU check of the fast CLIP-Inspector path: `gatekeeper-lab bench speed --gpu-check`.
#
# On one GPU, in under ten minutes: a ViT-B/16-shaped CoCoOp with random weights and 50 classes,
# a 1000 + 500 image pool; the fast path on all classes with bf16 autocast on/off and
# torch.compile on/off, the reference on 2 classes compared class by class, achieved TFLOP/s
# against a matmul peak measured on the device, peak memory, and CPU vs CUDA results on the
# committed tiny backbone. A human table goes to stdout, the numbers to a JSON file.
#
#   benchmarks/gpu-check.sh                 on a GPU; JSON in benchmarks/results/gpu-check.json
#   benchmarks/gpu-check.sh --dry-run       the same code on the CPU at tiny shapes (what CI runs)
#   benchmarks/gpu-check.sh --json out.json --budget-s 400
#
# Exit status: 0 all checks passed, 1 a check failed, 4 no CUDA device without --dry-run.
# PYTHON overrides the interpreter (default: the repository's .venv, else python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then
        python="$repo/.venv/bin/python"
    else
        python="python3"
    fi
fi

dry_run=0
has_json=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --json | --json=*) has_json=1 ;;
    esac
done

args=("$@")
if [[ "$has_json" -eq 0 ]]; then
    if [[ "$dry_run" -eq 1 ]]; then
        args+=(--json "${TMPDIR:-/tmp}/gatekeeper-gpu-check-dry-run.json")
    else
        args+=(--json "$repo/benchmarks/results/gpu-check.json")
    fi
fi

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1  # random weights: nothing is downloaded
cd "$repo"
exec "$python" -c 'import sys; from gatekeeper.lab import main; sys.exit(main())' \
    bench speed --gpu-check "${args[@]}"
