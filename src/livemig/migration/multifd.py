"""multifd: RAM pages on parallel channels, device state and sync points on
the main channel (QEMU's migration/multifd.c, much reduced).

Source: the RAM handler hands batches of page numbers to :class:`MultifdSender`;
one thread per channel reads the pages, detects zero pages (QEMU 10.0's
default ``zero-page-detection=multifd``), and sends a packet. A sync puts a
SYNC packet on every channel and a MULTIFD_FLUSH record in the main stream.

Destination: one thread per channel applies packets to RAM. At each SYNC
packet all channel threads meet at a barrier, so a page re-sent in the next
round on another channel can never be overtaken by its older copy; the load
thread waits at each MULTIFD_FLUSH until every channel has passed that sync.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.machine.ram import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.errors import MigrationError
from livemig.migration.ram import zero_pages
from livemig.threadname import name_native_thread
from livemig.transport.channel import IOVEC
from livemig.wire import (
    MULTIFD_FLAG_SYNC,
    decode_multifd_packet_header,
    encode_multifd_init,
    encode_multifd_packet_header,
    multifd_packet_header_size,
)

log = logging.getLogger("livemig.migration")
PACKET_PAGES = 256            # 1 MiB of pages per packet
QUEUE_DEPTH = 4               # packets queued per channel before the caller blocks
_SYNC = object()
_STOP = object()


def page_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first page, page count) of each run of consecutive page numbers, in order."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return pages[starts], ends - starts


def packet_iovec(head: bytes, normal: np.ndarray, ram_base: int) -> np.ndarray:
    """The iovecs of one packet (``normal``: ascending, unique page numbers, as the
    RAM handler hands them): its header, then its normal pages straight from
    guest RAM, one iovec per run of consecutive pages (the packet's data is
    the pages back to back, so a run is one contiguous stretch of RAM)."""
    if normal.size and int(normal[-1]) - int(normal[0]) + 1 == normal.size:
        iov = np.empty(2, dtype=IOVEC)         # one run: the common case
        iov[0] = (np.frombuffer(head, dtype=np.uint8).ctypes.data, len(head))
        iov[1] = (ram_base + (int(normal[0]) << TARGET_PAGE_BITS),
                  normal.size << TARGET_PAGE_BITS)
        return iov
    firsts, counts = page_runs(normal) if normal.size else (normal, normal)
    iov = np.empty(1 + firsts.size, dtype=IOVEC)
    iov["base"][0] = np.frombuffer(head, dtype=np.uint8).ctypes.data
    iov["len"][0] = len(head)
    iov["base"][1:] = np.uint64(ram_base) + \
        (firsts.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS))
    iov["len"][1:] = counts.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)
    return iov


@dataclass(frozen=True)
class MultifdStats:
    """The senders' counters at one moment (``query-migrate``'s multifd share)."""

    bytes_sent: int = 0
    normal_pages: int = 0
    zero_pages: int = 0


class MultifdSender:
    """Source side. ``@bottom_half``: queue_pages/sync from the migration thread;
    one sender thread per channel. The counters are updated by N threads at
    once, so they change under ``_lock`` only (a ``+=`` is not atomic)."""

    def __init__(self, channels: list[Any], ram, uuid: bytes) -> None:
        self.ram = ram
        self.channels = channels
        self._stats = MultifdStats()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._packet_num = 0
        self._ram_base = ram.host_address
        self._queues: list[queue.Queue] = [queue.Queue(QUEUE_DEPTH) for _ in channels]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"mig/src/send_{i}")
                         for i in range(len(channels))]
        for i, ch in enumerate(channels):
            ch.sendall(encode_multifd_init(uuid, i))
        for t in self._threads:
            t.start()

    def stats(self) -> MultifdStats:
        with self._lock:
            return self._stats

    @property
    def bytes_sent(self) -> int:
        return self.stats().bytes_sent

    @property
    def normal_pages(self) -> int:
        return self.stats().normal_pages

    @property
    def zero_pages(self) -> int:
        return self.stats().zero_pages

    def _count(self, nbytes: int, normal: int = 0, zero: int = 0) -> None:
        with self._lock:
            st = self._stats
            self._stats = MultifdStats(st.bytes_sent + nbytes, st.normal_pages + normal,
                                       st.zero_pages + zero)

    def queue_pages(self, idx: np.ndarray, known_zero: np.ndarray) -> None:
        """Send these page numbers (ascending) on the next channel(s), round robin;
        ``known_zero`` marks pages known to be zero without reading them."""
        for lo in range(0, idx.size, PACKET_PAGES):
            self._put(self._next, (idx[lo:lo + PACKET_PAGES], known_zero[lo:lo + PACKET_PAGES]))
            self._next = (self._next + 1) % len(self.channels)

    def sync(self) -> None:
        """A SYNC packet on every channel, after everything queued so far."""
        for i in range(len(self.channels)):
            self._put(i, _SYNC)

    def _put(self, i: int, item: Any) -> None:
        while True:
            if self.error is not None:
                raise MigrationError(self.error)
            try:
                self._queues[i].put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, i: int) -> None:
        name_native_thread()
        ch, q = self.channels[i], self._queues[i]
        name = self.ram.idstr
        try:
            while (item := q.get()) is not _STOP:
                with self._lock:
                    num = self._packet_num
                    self._packet_num += 1
                if item is _SYNC:
                    head = encode_multifd_packet_header(
                        flags=MULTIFD_FLAG_SYNC, normal_offsets=np.empty(0, np.uint64),
                        zero_offsets=np.empty(0, np.uint64), packet_num=num, block=name)
                    ch.sendall(head)
                    self._count(len(head))
                    continue
                idx, known_zero = item
                nonzero = self.ram.nonzero_pages(idx, known_zero)
                normal = idx[nonzero]
                head = encode_multifd_packet_header(
                    flags=0, normal_offsets=normal.astype(np.uint64) << TARGET_PAGE_BITS,
                    zero_offsets=idx[~nonzero].astype(np.uint64) << TARGET_PAGE_BITS,
                    packet_num=num, block=name)
                ch.send_iovec(packet_iovec(head, normal, self._ram_base))
                self._count(len(head) + normal.size * TARGET_PAGE_SIZE,
                            int(normal.size), int(idx.size - normal.size))
        except Exception as exc:  # noqa: BLE001 - reported through self.error
            self.error = getattr(exc, "desc", None) or str(exc)
            log.debug("multifd send %d failed", i, exc_info=True)

    def finish(self) -> None:
        """Wait until every queued packet went out (before EOF)."""
        for i in range(len(self.channels)):
            self._put(i, _STOP)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise MigrationError(self.error)
        self.close()     # EOF on every channel: the receivers are done

    def shutdown(self) -> None:
        for ch in self.channels:
            ch.shutdown()
        self.error = self.error or "multifd: migration cancelled"
        for q in self._queues:
            try:
                q.put_nowait(_STOP)
            except queue.Full:
                pass

    def close(self) -> None:
        for ch in self.channels:
            try:
                ch.close()
            except Exception:  # noqa: BLE001
                log.debug("multifd close failed", exc_info=True)


class MultifdReceiver:
    """Destination side: one thread per channel applying packets to RAM."""

    def __init__(self, channels: list[Any], ram) -> None:
        self.ram = ram
        self.channels = channels
        self.error: str | None = None
        self.pages = 0
        self._released = 0
        self._cond = threading.Condition()
        self._syncs = [0] * len(channels)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"mig/dst/recv_{i}")
                         for i in range(len(channels))]
        for t in self._threads:
            t.start()

    def wait_sync(self, count: int) -> None:
        """Block until every channel has passed its ``count``-th SYNC."""
        with self._cond:
            while min(self._syncs) < count:
                if self.error is not None:
                    raise MigrationError(self.error)
                self._cond.wait(0.1)
            self._released = count
            self._cond.notify_all()

    def _run(self, i: int) -> None:
        name_native_thread()
        ch = self.channels[i]
        head = bytearray(multifd_packet_header_size())
        ram = self.ram
        try:
            while True:
                got = ch.recv_into(head)
                if got == 0:
                    return                       # the source closed: done
                if got < len(head):
                    ch.read_exact_into(memoryview(head)[got:])
                pkt = decode_multifd_packet_header(bytes(head))
                if pkt.block != ram.idstr:
                    raise ValueError(f"multifd: unknown RAM block {pkt.block!r}")
                n = pkt.normal_pages + pkt.zero_pages
                offs = np.empty(n, dtype=">u8")
                if n:
                    ch.read_exact_into(offs.view(np.uint8))
                pages = (offs.astype(np.int64) >> TARGET_PAGE_BITS)
                if pages.size and (pages.min() < 0 or pages.max() >= ram.npages):
                    raise ValueError("multifd: page offset outside RAM")
                normal, zero = pages[:pkt.normal_pages], pages[pkt.normal_pages:]
                if normal.size:
                    # The offsets came first, so the data go straight into guest RAM,
                    # a run of consecutive pages per read (QEMU reads into iovecs of
                    # host pages the same way): no copy in user space.
                    firsts, counts = page_runs(normal)
                    for first, count in zip(firsts.tolist(), counts.tolist(), strict=True):
                        ch.read_exact_into(ram.bytes[first * TARGET_PAGE_SIZE:
                                                     (first + count) * TARGET_PAGE_SIZE])
                    ram.loaded[normal] = True
                if zero.size:
                    zero_pages(ram, zero)
                self.pages += n
                if pkt.sync:
                    # Stop here until the load thread reaches the matching
                    # MULTIFD_FLUSH: no channel runs ahead into the next round.
                    with self._cond:
                        self._syncs[i] += 1
                        self._cond.notify_all()
                        while self._released < self._syncs[i] and self.error is None:
                            self._cond.wait(0.1)
                        if self.error is not None:
                            return
        except Exception as exc:  # noqa: BLE001 - reported through self.error
            self._fail(getattr(exc, "desc", None) or str(exc))

    def _fail(self, desc: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = desc
            self._cond.notify_all()

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def shutdown(self) -> None:
        for ch in self.channels:
            ch.shutdown()
        with self._cond:
            self.error = self.error or "multifd: shut down"
            self._cond.notify_all()

    def close(self) -> None:
        for ch in self.channels:
            try:
                ch.close()
            except Exception:  # noqa: BLE001
                log.debug("multifd close failed", exc_info=True)
