"""Independent parts of a scan at once: on the CPU, one part per core, one torch thread each.

A scan holds several computations that do not depend on each other: the restarts of one
inversion, the model's inversion and the public backbone's, the clean copies of the null model,
two models of the demo. At the shapes gatekeeper scans on a CPU, one operator split over two
intra-op threads runs barely faster than on one (measured on the 2-core machine: a 12-class
inversion takes the same wall time with 1 and with 2 torch threads), while two inversions on
one thread each run side by side in the time of one. So on the CPU the scan runs its parts in
Python threads (torch releases the GIL inside its operators, and autograd runs a CPU backward on
the calling thread) with torch's intra-op threads set to one, and at most ``workers`` parts
compute at once.

Exactness: each part computes what it computes alone; which thread runs it and in what order does
not enter its arithmetic (one intra-op thread: the same summation order every time), so a scan's
results do not depend on the number of workers beyond the intra-op thread count itself
(``tests/test_parallel.py`` checks a parallel scan against a sequential one, bit for bit). The
global torch RNG is the one shared state the parts touch: code that seeds and draws from it holds
:data:`RNG_LOCK`.

Only the *leaves* (:func:`slot`: an inversion pass, a prompt tuning) hold one of the ``workers``
slots; :func:`run_all` starts a thread per part and waits without holding one, so parts may nest
(a null copy's tuning, then its restarts) without deadlock. On CUDA, or with one worker, every
part runs in turn on the calling thread, as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import torch

T = TypeVar("T")

RNG_LOCK = threading.RLock()  # held by code that seeds and draws from torch's global RNG

_state = threading.Lock()
_slots: threading.Semaphore | None = None  # None: run everything in turn (one worker, or CUDA)


def cpu_workers(device: torch.device | str) -> int:
    """How many parts may compute at once on ``device``: torch's intra-op thread count on the CPU
    (so ``OMP_NUM_THREADS=1`` runs a scan on one core, in turn), one on any accelerator."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


@contextlib.contextmanager
def workers(n: int) -> Iterator[None]:
    """Within this block, :func:`run_all` runs parts side by side, at most ``n`` computing at once,
    with torch's intra-op threads at one; restored on exit. Nested blocks keep the outer setting."""
    global _slots
    with _state:
        outer = _slots is not None
        if not outer and n > 1:
            _slots = threading.BoundedSemaphore(n)
    if outer or n <= 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        with _state:
            _slots = None


def active() -> bool:
    """Whether parts run side by side now (inside :func:`workers` with more than one)."""
    return _slots is not None


@contextlib.contextmanager
def slot() -> Iterator[None]:
    """Hold one of the workers' slots while a leaf computation runs (nothing to hold in turn)."""
    held = _slots
    if held is None:
        yield
        return
    with held:
        yield


def run_all(parts: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``parts`` (independent of each other) and return their results in order. Side by side
    inside :func:`workers`, else in turn. The first failure is raised once every part has ended."""
    if _slots is None or len(parts) <= 1:
        return [p() for p in parts]
    results: list[T | None] = [None] * len(parts)
    errors: list[BaseException | None] = [None] * len(parts)

    def run(i: int) -> None:
        try:
            results[i] = parts[i]()
        except BaseException as exc:  # re-raised on the calling thread below
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(parts))]
    for t in threads:
        t.start()
    run(0)  # the calling thread takes the first part itself
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return cast(list[T], results)


def start(part: Callable[[], T]) -> Callable[[], T]:
    """Begin ``part`` now, beside the caller, inside :func:`workers` (else it runs when its result
    is first asked for); returns a function that waits for the result, or raises the part's error."""
    if _slots is None:
        done: list[T] = []

        def later() -> T:
            if not done:
                done.append(part())
            return done[0]

        return later
    box: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            box.append(part())
        except BaseException as exc:  # re-raised by the waiting function
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait() -> T:
        thread.join()
        if error:
            raise error[0]
        return box[0]

    return wait
