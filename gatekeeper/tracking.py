"""How far a scan has got: its work planned up front as labelled stages over one shared count.

A scan is a sequence of *stages*: inversion passes (one unit per class: the model at each budget
and restart, the public backbone, each clean copy of the null model, the positive control's
re-scan) and training runs (one unit per epoch: each clean copy's tuning, the control's planting).
The pipeline plans them all before the first pass (``gatekeeper.pipeline.plan_scan``), then each
pass reports its own ``(done, total, class)`` as usual and the :class:`Tracker` turns that into a
:class:`Tick` on the whole scan. A planned stage that turns out not to be needed (a cache hit, a
control that does not run) leaves the total when the scan passes it, so the count never claims
work that was not done and ends at ``done == total``. The library only reports ticks; the CLI
draws them (``gatekeeper.progress``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module without torch
    from gatekeeper.inversion.base import Progress


@dataclass(frozen=True)
class Stage:
    """One planned stage of a scan: its label, its size and what one unit of it is."""

    label: str
    units: int
    unit: str = "class"  # "class": an inversion pass; "epoch": a training run


@dataclass(frozen=True)
class Tick:
    """Where a scan is: the current stage and its own count, the whole scan's count, and the
    class being inverted (empty between classes); ``cached``: the stage came from the cache and left the total."""

    stage: str
    stage_done: int
    stage_total: int
    done: int
    total: int
    unit: str = "class"
    item: str = ""
    cached: bool = False


ScanProgress = Callable[[Tick], None]


def no_ticks(tick: Tick) -> None:
    return None


def budget_label(epsilon: float) -> str:
    """ε as a policy writes it: ``ε=8/255`` (3 significant digits of n/255 when n is not whole)."""
    n = epsilon * 255
    return f"ε={round(n)}/255" if abs(n - round(n)) < 1e-6 else f"ε={n:.3g}/255"


def pass_labels(who: str, epsilon: float, restarts: int) -> list[str]:
    """The labels of ``who``'s inversion passes at one budget: ``model ε=8/255 restart 1/2``, ...
    (no restart suffix when there is one pass)."""
    base = f"{who} {budget_label(epsilon)}"
    return [base] if restarts == 1 else [f"{base} restart {r + 1}/{restarts}" for r in range(restarts)]


def training_label(who: str, epsilon: float) -> str:
    """The label of ``who``'s training run for one budget: ``clean copy 1/2 ε=8/255: tuning``."""
    return f"{who} {budget_label(epsilon)}: tuning"


@dataclass
class _Count:
    """The state every scoped view of one tracker shares."""

    report: ScanProgress
    planned: dict[str, Stage]
    done: int = 0
    started: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)  # parts of a scan may run side by side

    @property
    def total(self) -> int:
        return sum(s.units for s in self.planned.values())


class Tracker:
    """A scan's plan and running count; hands each stage a callback and reports :class:`Tick`\\ s.

    Args:
        stages: the plan, in the order the scan runs it (labels unique).
        report: called with every tick.
    """

    def __init__(self, stages: Sequence[Stage] = (), report: ScanProgress = no_ticks, _scope: str = "", _count: _Count | None = None) -> None:
        if _count is None:
            planned = {s.label: s for s in stages}
            if len(planned) != len(stages):
                raise ValueError("stage labels must be unique")
            _count = _Count(report, planned)
        self._count, self._scope = _count, _scope

    @property
    def total(self) -> int:
        return self._count.total

    @property
    def done(self) -> int:
        return self._count.done

    def scoped(self, prefix: str) -> Tracker:
        """A view of the same count whose stage labels start with ``prefix`` (a nested scan)."""
        return Tracker(_scope=self._scope + prefix, _count=self._count)

    def _start(self, label: str, units: int, unit: str) -> Stage:
        c = self._count
        full = self._scope + label
        stage = c.planned.get(full)
        if stage is None or stage.units != units:  # unplanned, or sized differently: count what runs
            stage = c.planned[full] = Stage(full, units, unit)
        c.started.add(full)
        return stage

    def _tick(self, stage: Stage, stage_done: int, item: str = "", cached: bool = False) -> None:
        c = self._count
        c.report(Tick(stage.label, stage_done, stage.units, c.done, c.total, stage.unit, item, cached))

    def inversion_pass(self, label: str) -> Progress:
        """The ``(done, total, class)`` callback for one inversion pass (a detector's ``invert``)."""
        opened: list[Stage] = []
        seen = [0]

        def progress(done: int, total: int, name: str) -> None:
            with self._count.lock:
                if not opened:
                    opened.append(self._start(label, total, "class"))
                step = max(0, min(done, opened[0].units) - seen[0])
                seen[0] += step
                self._count.done += step
                self._tick(opened[0], seen[0], name)

        return progress

    def training(self, label: str, epochs: int) -> Callable[[str], None]:
        """A ``log`` for :func:`gatekeeper.models.tuning.train_on`: it calls once per epoch."""
        with self._count.lock:
            stage = self._start(label, epochs, "epoch")
            self._tick(stage, 0)
        seen = [0]

        def log(line: str) -> None:
            with self._count.lock:
                if seen[0] < epochs:
                    seen[0] += 1
                    self._count.done += 1
                    self._tick(stage, seen[0])

        return log

    def cached(self, labels: Iterable[str]) -> None:
        """Planned stages whose result came from the cache: they leave the total, announced."""
        c = self._count
        with c.lock:
            for label in labels:
                full = self._scope + label
                stage = c.planned.get(full)
                if stage is None or full in c.started:
                    continue
                del c.planned[full]
                self._tick(Stage(full, 0, stage.unit), 0, cached=True)

    def finish(self) -> None:
        """The scan is over: stages that never started leave the total; one last tick."""
        c = self._count
        with c.lock:
            for label in [s for s in c.planned if s not in c.started]:
                del c.planned[label]
            self._count.report(Tick("", 0, 0, c.done, c.total))
