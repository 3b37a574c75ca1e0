"""Progress display for scans on a terminal or in a CI log (the library itself prints nothing)."""

from __future__ import annotations

import sys
import time
from typing import Any

from gatekeeper.untrusted import inert, say


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label = quiet, label
        self.bar: Any = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.quiet:
            return
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.label, unit="class", file=sys.stderr)
            self.bar.n = done
            self.bar.set_postfix_str(inert(name, 60))
            self.bar.refresh()
            if done == total:
                self.bar.close()
        elif done < total:
            say(f"[{self.label}] class {done + 1}/{total}: {name} ({time.time() - self.t0:.0f}s)")
        else:
            say(f"[{self.label}] {total} classes inverted in {time.time() - self.t0:.0f}s")
