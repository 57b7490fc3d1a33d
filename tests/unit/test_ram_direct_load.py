"""The destination's direct reads (page data read straight into guest RAM on
a guess that the run of page records goes on) against the decoder's copy:
for random streams cut into random reads over a real socket, RAM ends byte
for byte as the copying path leaves it, also when a stream turns bad. A
wrong guess never leaves a wrong byte in RAM."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.ram import RamBlock
from livemig.migration import savevm
from livemig.migration.errors import LoadError
from livemig.migration.ram import DIRECT_PAGES, RamDirectLoad, RamLoadHandler
from livemig.transport import Channel
from livemig.wire import (
    SectionType,
    StreamDecoder,
    StreamError,
    encode_eof,
    encode_footer,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_vmdesc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadvm_hosts import ChannelHost, RamMachine  # noqa: E402
from streams import QEMU_MACHINE, ram_stream_start, section  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NPAGES = 2 * DIRECT_PAGES + 37


def _stream(rounds, rng, garbage: bool) -> bytes:
    """RAM rounds (each a list of (first page, count, zero?) runs) in PART
    sections, EOF and a VM description; ``garbage``: a bad record instead."""
    out = [ram_stream_start([("pc.ram", NPAGES * 4096)]), encode_ram_eos(), encode_footer(0)]
    named = False
    for runs in rounds:
        out.append(section(SectionType.SECTION_PART, 0))
        for first, count, zero in runs:
            offs = (np.arange(first, first + count, dtype=np.int64)) << 12
            if zero:
                out.append(encode_ram_zero_pages("pc.ram", offs, first_has_block_name=not named)
                           .tobytes())
            else:
                data = rng.integers(0, 256, (count, 4096), dtype=np.uint8)
                data[:, 0] |= 1
                out.append(encode_ram_pages("pc.ram", offs, data,
                                            first_has_block_name=not named).tobytes())
            named = True
        out.append(encode_ram_eos() + encode_footer(0))
        if garbage:
            return b"".join(out[:-1]) + b"\x00" * 7 + b"\x77" + bytes(4096)
    return b"".join(out) + encode_eof() + encode_vmdesc(b"{}")


def _load(stream: bytes, chunks: list[int], direct: bool, max_read: int = 1 << 16):
    """(RAM pages, loaded, error text, pages placed directly) after loading ``stream``
    sent over a socketpair in ``chunks``-sized writes."""
    ram = RamBlock("pc.ram", NPAGES * 4096)
    a, b = Channel.socketpair()

    def send() -> None:
        pos, i = 0, 0
        try:
            while pos < len(stream):
                n = chunks[i % len(chunks)]
                a.sendall(stream[pos:pos + n])
                pos, i = pos + n, i + 1
        except Exception:  # noqa: BLE001 - the reader stopped on a bad stream
            pass
        a.close()
    t = threading.Thread(target=send, daemon=True)
    t.start()
    state = savevm.SaveVMState()
    handler = RamLoadHandler(RamMachine(ram))
    state.register_savevm_live(handler)
    reader = RamDirectLoad(ram, handler, b.recv_iovec_some) if direct else None
    error = None
    try:
        savevm.qemu_loadvm_state(state, ChannelHost(b, max_read),
                                 StreamDecoder(state.payload_kinds()),
                                 machine_type=QEMU_MACHINE, uuid=None, direct=reader)
    except (LoadError, StreamError, ValueError) as exc:
        error = str(exc)
    finally:
        b.close()
        t.join(10)
    pages, loaded = ram.pages.copy(), ram.loaded.copy()
    ram.close()
    return pages, loaded, error, reader.placed if reader else 0


def runs_strategy():
    run = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 2 * DIRECT_PAGES), st.booleans())
    return st.lists(st.lists(run, min_size=1, max_size=4), min_size=1, max_size=3).map(
        lambda rounds: [[(f, min(c, NPAGES - f), z) for f, c, z in r] for r in rounds])


@settings(max_examples=30, deadline=None)
@given(runs_strategy(), st.lists(st.sampled_from([13, 100, 4096, 4104, 4105, 65536,
                                                  1 << 20]), min_size=1, max_size=5),
       st.sampled_from([4104, 5000, 1 << 16, 1 << 22]), st.integers(0, 2**32),
       st.booleans())
def test_direct_reads_leave_ram_as_the_copy_does(rounds, chunks, max_read, seed, garbage):
    stream = _stream(rounds, np.random.default_rng(seed), garbage)
    want_pages, want_loaded, want_err, _ = _load(stream, [len(stream)], direct=False)
    got_pages, got_loaded, got_err, _ = _load(stream, chunks, direct=True, max_read=max_read)
    assert got_err == want_err
    assert (want_err is not None) == garbage
    assert np.array_equal(got_pages, want_pages)          # not one byte differs
    assert np.array_equal(got_loaded, want_loaded)


def test_a_long_run_is_placed_without_the_copy():
    rounds = [[(0, NPAGES, False)], [(5, 40, False), (45, 100, False), (300, 20, True)]]
    stream = _stream(rounds, np.random.default_rng(1), False)
    want_pages, _, _, _ = _load(stream, [len(stream)], direct=False)
    for chunks in ([1 << 20], [100]):
        got_pages, _, err, placed = _load(stream, chunks, direct=True)
        assert err is None and np.array_equal(got_pages, want_pages)
        # The first pass is one run: nearly every page goes straight to RAM,
        # also when the data come in small pieces (a read that ends inside a
        # record finishes it in place); decoded: the first records of the
        # stream, the run breaks of the second round.
        assert placed >= NPAGES - 20


def test_wrong_guess_at_a_loaded_page_is_never_made():
    """The second round re-sends pages: they are loaded, so no guess lands on them."""
    rounds = [[(0, 100, False)], [(0, 100, False)]]
    stream = _stream(rounds, np.random.default_rng(2), False)
    want_pages, _, _, _ = _load(stream, [len(stream)], direct=False)
    got_pages, _, err, placed = _load(stream, [4104], direct=True)
    assert err is None and np.array_equal(got_pages, want_pages)
    assert placed <= 100
