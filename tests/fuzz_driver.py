"""Run gatekeeper CLI invocations in one process and report what each did (used by test_fuzz.py).

Reads a JSON list of cases ``{"id", "argv", "cwd"}`` from the file named by ``argv[1]`` and writes
one JSON object per case (exit code, stderr, seconds) plus the process's peak memory to the file
named by ``argv[2]``. Running in its own process keeps the peak-memory figure the fuzzed inputs' own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time


def main() -> None:
    from gatekeeper.cli import main as gatekeeper_main

    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    results = []
    for case in cases:
        err, out = io.StringIO(), io.StringIO()
        os.chdir(case["cwd"])
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = gatekeeper_main(case["argv"])
            except BaseException as exc:  # noqa: BLE001 - the property is that nothing escapes main()
                code = f"escaped: {type(exc).__name__}: {exc}"
        results.append(
            {"id": case["id"], "code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0}
        )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump({"results": results, "peak_mib": peak_kib / 1024}, f)


if __name__ == "__main__":
    main()
