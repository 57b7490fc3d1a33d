"""multifd's counters stay exact while N sender threads update them at once
(``query-migrate`` reads them from another thread)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from livemig.machine.ram import RamBlock
from livemig.migration.multifd import MultifdSender
from livemig.transport import Channel

NPAGES = 4096


def _drain(ch, counts: list[int], i: int) -> None:
    buf = bytearray(1 << 20)
    while (n := ch.recv_into(buf)) > 0:
        counts[i] += n


@pytest.mark.timeout(60)
def test_counters_are_exact_under_concurrency():
    ram = RamBlock("pc.ram", NPAGES * 4096)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)        # switch threads as often as possible
    pairs = [Channel.socketpair() for _ in range(4)]
    received = [0] * len(pairs)
    readers = [threading.Thread(target=_drain, args=(b, received, i), daemon=True)
               for i, (_, b) in enumerate(pairs)]
    try:
        ram.pages[::2, 0] = 1           # every other page normal, the others zero
        for t in readers:
            t.start()
        sender = MultifdSender([a for a, _ in pairs], ram, bytes(16))
        queued = 0
        for _ in range(20):
            idx = np.arange(NPAGES, dtype=np.int64)
            sender.queue_pages(idx, np.zeros(NPAGES, dtype=bool))
            queued += NPAGES
            sender.sync()
        sender.finish()                 # every packet out, channels closed
        for t in readers:
            t.join(30)
        st = sender.stats()
        assert st.normal_pages == queued // 2
        assert st.zero_pages == queued // 2
        # Every byte the receivers read, less the init packets, was counted.
        from livemig.wire import MULTIFD_INIT_SIZE
        assert st.bytes_sent == sum(received) - len(pairs) * MULTIFD_INIT_SIZE
    finally:
        sys.setswitchinterval(old)
        for a, b in pairs:
            a.close()
            b.close()
        ram.close()


@pytest.mark.timeout(60)
def test_counter_updates_from_many_threads_are_never_lost():
    """The update itself, hammered: a read-modify-write without the lock
    loses counts here within a few thousand updates."""
    ram = RamBlock("pc.ram", 16 * 4096)
    sender = MultifdSender([], ram, bytes(16))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    per_thread, nthreads = 20_000, 8

    def hammer() -> None:
        for _ in range(per_thread):
            sender._count(4096, 1, 1)
    threads = [threading.Thread(target=hammer) for _ in range(nthreads)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        st = sender.stats()
        total = per_thread * nthreads
        assert (st.bytes_sent, st.normal_pages, st.zero_pages) == (total * 4096, total, total)
    finally:
        sys.setswitchinterval(old)
        ram.close()
