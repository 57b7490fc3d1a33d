"""The source's "known zero" shortcut never sends a written page as zero.

At setup the pages not resident (mincore) are known zero, so their first send
reads nothing. A page written after setup but before its first send used to
keep that mark while a dirty sync took its dirty mark: the send then trusted
the stale mark and no later sync corrected it. In postcopy, whose final sync
comes before most pages' first send, that left pages as zero on the
destination (issue 15's stale page: a KVM walk migrated right after boot, the
pages past the zeroing pass's 2 MiB frontier at setup arrived as zero).

The property: for any sequence of guest writes, syncs and sends, what the
source sent, applied in order to a fresh image, equals the source's RAM once
a last sync and send have emptied the bitmap (the stop-and-copy, or postcopy
after its discard sync).
"""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.ram import RamBlock
from livemig.migration.ram import RamSaveHandler
from livemig.wire.constants import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadvm_hosts import LoggedRamMachine  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NPAGES = 64
PAGE = 4096


class _Recorder:
    """An OutStream keeping every byte (iovecs read out of RAM at write time,
    as the kernel's writev would)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += bytes(memoryview(data).cast("B"))

    def write_iovec(self, iov: np.ndarray, nbytes: int) -> None:
        for base, length in iov.tolist():
            self.data += ctypes.string_at(base, length)

    def flush(self) -> None: ...

    def rate_exceeded(self) -> bool:
        return False

    def budget_left(self) -> None:
        return None


def apply_ram_records(data: bytes, image: np.ndarray) -> None:
    """The obvious per-record reading of QEMU's RAM records into ``image``."""
    pos = 0
    while pos < len(data):
        (word,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        flags, offset = word & 0xFFF, word & ~0xFFF
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            total = offset
            while total:
                n = data[pos]
                (size,) = struct.unpack_from(">Q", data, pos + 1 + n)
                pos += 1 + n + 8
                total -= size
            continue
        if flags & RAM_SAVE_FLAG_EOS:
            continue
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            pos += 1 + data[pos]
        page = offset // PAGE
        if flags & RAM_SAVE_FLAG_PAGE:
            image[page] = np.frombuffer(data, np.uint8, PAGE, pos)
            pos += PAGE
        elif flags & RAM_SAVE_FLAG_ZERO:
            assert data[pos] == 0
            image[page] = 0
            pos += 1
        else:
            raise AssertionError(f"unexpected RAM flags 0x{flags:x}")


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, NPAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("send"), st.integers(1, NPAGES))), max_size=40)


def _migrate(pre_touched: list[int], steps) -> tuple[np.ndarray, np.ndarray]:
    ram = RamBlock("pc.ram", NPAGES * PAGE)
    try:
        machine = LoggedRamMachine(ram)
        for p in pre_touched:                  # resident before setup
            ram.pages[p, 0] = 0x5A
        h = RamSaveHandler(machine, on_sync=lambda n: None)
        out = _Recorder()
        h.save_setup(out, None)
        for op in steps:
            if op[0] == "write":
                machine.guest_write(op[1], op[2])
            elif op[0] == "sync":
                h.bitmap_sync()
            elif (idx := h._next_dirty(op[1])).size:
                h._send_pages(out, idx, downtime=False)
        h.bitmap_sync()                        # the final sync, then everything left
        while (idx := h._next_dirty(NPAGES)).size:
            h._send_pages(out, idx, downtime=True)
        image = np.zeros((NPAGES, PAGE), np.uint8)
        apply_ram_records(bytes(out.data), image)
        return image, ram.pages.copy()
    finally:
        ram.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, NPAGES - 1), unique=True, max_size=8), ops)
def test_what_was_sent_is_the_source_ram(pre_touched, steps):
    got, want = _migrate(pre_touched, steps)
    assert np.array_equal(got, want), np.flatnonzero((got != want).any(axis=1)).tolist()


def test_page_written_before_its_first_send_is_read():
    """The postcopy case: written after setup, its dirty mark taken by the final
    sync, first sent afterwards. It used to go out as a zero page."""
    got, want = _migrate([], [("write", 5, 3)])
    assert got[5, 0] == want[5, 0] == 3
