"""The source's dirty-page scan takes each dirty page once per call, in
ascending order from the cursor on, even when it wraps past where it began;
and the destination places a page record batch exactly as its headers say,
even when offsets repeat (a run check that looks only at the ends was fooled
by [249, 252, 249, 252])."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.ram import RamBlock
from livemig.migration.ram import RamLoadHandler, RamSaveHandler
from livemig.wire import RamPages

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadvm_hosts import RamMachine  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NPAGES = 256


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, NPAGES - 1), unique=True), st.integers(0, NPAGES - 1),
       st.integers(1, 2 * NPAGES), st.sampled_from([7, 64, 100_000]))
def test_next_dirty_takes_each_page_once(dirty, cursor, limit, scan):
    import livemig.migration.ram as ram_mod
    ram = RamBlock("pc.ram", NPAGES * 4096)
    old = ram_mod.SCAN_PAGES
    ram_mod.SCAN_PAGES = scan
    try:
        h = RamSaveHandler(RamMachine(ram), on_sync=lambda n: None)
        h.bitmap[dirty] = True
        h._cursor = cursor
        taken = h._next_dirty(limit)
        assert len(set(taken.tolist())) == taken.size        # no page twice
        assert taken.size == min(limit, len(dirty))
        # in scan order from the cursor, wrapping once
        rot = (taken - cursor) % NPAGES
        assert (np.diff(rot) > 0).all()
        assert not h.bitmap[taken].any()
    finally:
        ram_mod.SCAN_PAGES = old
        ram.close()


def test_load_places_repeated_offsets_as_their_headers_say():
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        load = RamLoadHandler(RamMachine(ram))
        pages = np.array([249, 252, 249, 252])
        data = np.zeros((4, 4096), np.uint8)
        data[:, 0] = [1, 2, 3, 4]
        load.load_event(RamPages("pc.ram", pages.astype(np.int64) << 12, data))
        assert ram.pages[249, 0] == 3 and ram.pages[252, 0] == 4
        assert not ram.pages[250].any() and not ram.pages[251].any()
    finally:
        ram.close()
