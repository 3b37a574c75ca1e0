"""Progress display for scans on a terminal or in a CI log (the library itself prints nothing)."""

from __future__ import annotations

import sys
import time
from typing import Any

from gatekeeper.tracking import Tick
from gatekeeper.untrusted import inert, say


def plural(unit: str) -> str:
    """``class`` -> ``classes``, ``epoch`` -> ``epochs``."""
    return unit + ("es" if unit.endswith("s") else "s")


def plain_line(label: str, tick: Tick, seconds: float) -> str:
    """One CI log line for ``tick``: the pass, its own count and the whole scan's, e.g.
    ``[scan] public backbone ε=8/255: class 3/12 'cat' (step 14/48, 37s)``."""
    clock = f"{seconds:.0f}s"
    if not tick.stage:
        return f"[{label}] done: {tick.done}/{tick.total} steps in {clock}"
    if tick.cached:
        return f"[{label}] {tick.stage}: reused from the cache (step {tick.done}/{tick.total}, {clock})"
    if tick.stage_done >= tick.stage_total:
        return f"[{label}] {tick.stage}: {tick.stage_total}/{tick.stage_total} {plural(tick.unit)} done (step {tick.done}/{tick.total}, {clock})"
    item = f" '{inert(tick.item, 60)}'" if tick.item else ""
    step = min(tick.done + 1, tick.total)
    return f"[{label}] {tick.stage}: {tick.unit} {tick.stage_done + 1}/{tick.stage_total}{item} (step {step}/{tick.total}, {clock})"


class Progress:
    """A tqdm bar over the whole scan on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label = quiet, label
        self.bar: Any = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()

    def __call__(self, tick: Tick) -> None:
        if self.quiet:
            return
        if not self.tty:
            say(plain_line(self.label, tick, time.time() - self.t0))
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=tick.total, desc=self.label, unit="step", file=sys.stderr)
        self.bar.total = tick.total
        self.bar.n = tick.done
        if tick.stage:
            self.bar.set_description_str(f"{self.label}: {inert(tick.stage, 80)}", refresh=False)
            self.bar.set_postfix_str(inert(tick.item, 60), refresh=False)
        self.bar.refresh()
        if not tick.stage:
            self.bar.close()
            self.bar = None
