"""Gathered writes put the same bytes on the wire as the copying encoders.

The RAM handler's writev path (headers from a small buffer, pages straight
from guest RAM) is checked against the encode-into-a-buffer path, for
random dirty sets and page contents (multifd's: tests/unit/test_wire_multifd.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.ram import RamBlock
from livemig.migration.ram import RamSaveHandler

pytestmark = pytest.mark.timeout(120)

NPAGES = 256


class _Machine:
    def __init__(self, ram: RamBlock) -> None:
        self.ram = ram

    def is_running(self) -> bool:
        return True


class _Out:
    """An OutStream that records the bytes, iovecs included."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += bytes(memoryview(data).cast("B")) if not isinstance(data, bytes) else data

    def write_iovec(self, iov: np.ndarray, nbytes: int) -> None:
        before = len(self.data)
        for base, length in iov.tolist():
            self.data += ctypes.string_at(base, length)
        assert len(self.data) - before == nbytes

    def rate_exceeded(self) -> bool:
        return False

    def budget_left(self) -> None:
        return None


def _send_all(ram: RamBlock, dirty: np.ndarray, gather: bool, batch: int) -> bytes:
    h = RamSaveHandler(_Machine(ram), on_sync=lambda n: None, gather=gather)
    h.bitmap[:] = dirty
    out = _Out()
    while (idx := h._next_dirty(batch)).size:
        h._send_pages(out, idx, downtime=False)
    return bytes(out.data)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.floats(0, 1), st.floats(0, 1),
       st.sampled_from([1, 7, 64, 1024]))
def test_gathered_ram_pages_equal_encoded_pages(seed, dirty_share, zero_share, batch):
    rng = np.random.default_rng(seed)
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        pages = rng.integers(0, 256, (NPAGES, 4096), dtype=np.uint8)
        pages[rng.random(NPAGES) < zero_share] = 0
        pages[rng.random(NPAGES) < 0.2, 0] = 0      # non-zero pages with a zero first word
        ram.pages[:] = pages
        dirty = rng.random(NPAGES) < dirty_share
        assert _send_all(ram, dirty, True, batch) == _send_all(ram, dirty, False, batch)
    finally:
        ram.close()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, NPAGES - 1), st.integers(1, NPAGES),
       st.booleans())
def test_nonzero_pages_matches_a_full_scan(seed, start, count, contiguous):
    """Zero detection (first word, then the rest only where that word is 0; a
    view for runs, a gather otherwise) against numpy's plain answer."""
    rng = np.random.default_rng(seed)
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
        kinds = rng.integers(0, 3, NPAGES)   # 0: zero, 1: first byte set, 2: a byte deep inside
        pages[kinds == 1, 0] = 1
        deep = np.flatnonzero(kinds == 2)
        pages[deep, rng.integers(8, 4096, deep.size)] = 7
        ram.pages[:] = pages
        if contiguous:
            idx = np.arange(start, min(NPAGES, start + count), dtype=np.int64)
        else:
            idx = np.sort(rng.choice(NPAGES, size=min(count, NPAGES), replace=False))
        got = ram.nonzero_pages(idx, np.zeros(idx.size, dtype=bool))
        assert np.array_equal(got, pages[idx].any(axis=1))
    finally:
        ram.close()
