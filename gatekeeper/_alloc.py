"""glibc malloc settings for CPU scans.

An inversion step allocates activation tensors of tens to hundreds of MB. glibc serves blocks above
its mmap threshold (32 MiB at most, adjusted dynamically) with fresh ``mmap`` pages and returns them
on free, so every step faults in its activations again: measured, millions of minor page faults and
seconds of system time per scan. ``heap_mode`` serves every block from the heap and keeps freed
memory for reuse, so the next step finds its pages already mapped. The cost is that the process
keeps its peak memory until it exits, which is what a scan does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from functools import cache

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NO_TRIM = 2**31 - 1  # an int: mallopt takes one


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - musl and other libcs lack it
    except (OSError, AttributeError):
        return None
    return libc


def heap_mode() -> bool:
    """Serve large blocks from the heap and keep freed memory, for the rest of the process.

    One-way on purpose (glibc's dynamic mmap threshold cannot be restored once set). Returns False,
    changing nothing, where the C library is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
