"""The allocator setting the console script applies: large blocks stay mapped between steps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gatekeeper._alloc import _libc

# a fresh process per setting (heap_mode is one-way); 20 rounds of a 64 MiB tensor, above glibc's
# largest dynamic mmap threshold (32 MiB), each written in full so every page is touched
_PROBE = """
import sys
import torch
from gatekeeper._alloc import heap_mode, minor_faults
if sys.argv[1] == "heap":
    assert heap_mode()
for _ in range(10):  # warm-up: the first rounds map pages in either setting
    x = torch.ones(16 * 2**20)
    del x
before = minor_faults()
for _ in range(20):
    x = torch.ones(16 * 2**20)
    del x
print(minor_faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(_libc() is None, reason="not glibc: heap_mode changes nothing")
def test_heap_mode_stops_refaulting_large_blocks() -> None:
    default, heap = _faults("default"), _faults("heap")
    pages = 20 * 64 * 2**20 // 4096
    assert default > pages // 2  # glibc maps each 64 MiB block afresh: about one fault per page
    assert heap < pages // 20  # kept on the heap: the pages are reused, not faulted in again
