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
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.machine.ram import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.errors import MigrationError
from livemig.migration.ram import zero_pages
from livemig.threadname import name_native_thread
from livemig.transport.channel import IOVEC
from livemig.wire import (
    MULTIFD_MAGIC,
    MULTIFD_PACKET_PAGES,
    MULTIFD_PACKET_SIZE,
    MULTIFD_VERSION,
    decode_multifd_packet_header,
    encode_multifd_init,
    encode_multifd_ram_packets,
    encode_multifd_sync_packet,
)

log = logging.getLogger("livemig.migration")
# Pages one channel takes at a time: 8 of QEMU's 128-page packets, built with
# one numpy step and sent with one writev (the per-packet cost is per batch).
CHANNEL_BATCH_PAGES = 8 * MULTIFD_PACKET_PAGES
QUEUE_DEPTH = 4               # batches queued per channel before the caller blocks
_SYNC = object()
_STOP = object()
_HEAD_LEN = np.uint64(MULTIFD_PACKET_SIZE)
_PAGE_BITS = np.uint64(TARGET_PAGE_BITS)
# The receiver's fast check: a RAM packet's first 16 bytes (magic, version,
# flags 0, pages_alloc 128), where its block name and offsets lie, and the
# offsets of a run relative to its first page.
_RUN_PREFIX = struct.pack(">IIII", MULTIFD_MAGIC, MULTIFD_VERSION, 0, MULTIFD_PACKET_PAGES)
_NAME_AT, _OFFSETS_AT = 64, 320
_RUN_STEPS = np.arange(MULTIFD_PACKET_PAGES, dtype=np.uint64) << _PAGE_BITS


def page_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first page, page count) of each run of consecutive page numbers, in order."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return pages[starts], ends - starts


def packets_iovec(heads: np.ndarray, pages: np.ndarray, nonzero: np.ndarray,
                  ram_base: int) -> np.ndarray:
    """The iovecs of a batch of packets (``heads`` from
    ``encode_multifd_ram_packets`` for ``pages``, ascending, with ``nonzero``):
    packet by packet its header, then its normal pages straight from guest
    RAM, one iovec per run of consecutive pages within the packet. Built for
    all packets at once: numpy work per batch, none per packet."""
    k = int(heads.size)
    heads_base = np.uint64(heads.ctypes.data)
    n = int(pages.size)
    if n and int(pages[-1]) - int(pages[0]) + 1 == n and nonzero.all() and \
            (n < 3 or bool((np.diff(pages) == 1).all())):
        # One run of normal pages (the common case): header, run, header, run...
        iov = np.empty(2 * k, dtype=IOVEC)
        steps = np.arange(k, dtype=np.uint64)
        iov["base"][0::2] = heads_base + steps * _HEAD_LEN
        iov["len"][0::2] = _HEAD_LEN
        iov["base"][1::2] = np.uint64(ram_base) + ((np.uint64(int(pages[0])) + steps *
                                                    np.uint64(MULTIFD_PACKET_PAGES)) << _PAGE_BITS)
        iov["len"][1::2] = np.uint64(MULTIFD_PACKET_PAGES << TARGET_PAGE_BITS)
        iov["len"][-1] = (n - (k - 1) * MULTIFD_PACKET_PAGES) << TARGET_PAGE_BITS
        return iov
    pos = np.flatnonzero(nonzero)               # batch positions of the normal pages
    normal = pages[pos]
    pkt = pos // MULTIFD_PACKET_PAGES           # the packet of each normal page
    if normal.size:
        brk = np.flatnonzero((np.diff(normal) != 1) | (np.diff(pkt) != 0)) + 1
        starts = np.concatenate(([0], brk))
        counts = np.diff(np.append(starts, normal.size))
        run_pkt = pkt[starts]
    else:
        starts = counts = run_pkt = np.empty(0, dtype=np.int64)
    iov = np.empty(k + starts.size, dtype=IOVEC)
    # Header j goes after the runs of packets < j and the j headers before it.
    head_at = np.arange(k) + np.searchsorted(run_pkt, np.arange(k), side="left")
    run_at = np.arange(starts.size) + run_pkt + 1
    iov["base"][head_at] = heads_base + np.arange(k, dtype=np.uint64) * _HEAD_LEN
    iov["len"][head_at] = _HEAD_LEN
    iov["base"][run_at] = np.uint64(ram_base) + (normal[starts].astype(np.uint64) << _PAGE_BITS)
    iov["len"][run_at] = counts.astype(np.uint64) << _PAGE_BITS
    return iov


@dataclass(frozen=True)
class MultifdStats:
    """The senders' counters at one moment (``query-migrate``'s multifd share)."""

    bytes_sent: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    # QEMU's dirty-sync-missed-zero-copy: syncs after which a channel found
    # every zero-copy send of the round copied by the kernel after all.
    missed_zero_copy: int = 0


class MultifdSender:
    """Source side. ``@bottom_half``: queue_pages/sync from the migration thread;
    one sender thread per channel. The counters are updated by N threads at
    once, so they change under ``_lock`` only (a ``+=`` is not atomic)."""

    def __init__(self, channels: list[Any], ram, uuid: bytes, *, zero_copy: bool = False) -> None:
        """``zero_copy`` (QEMU's ``zero-copy-send``; the channels have
        ``enable_zero_copy()`` done): page data go out with MSG_ZEROCOPY, and
        each SYNC waits until the kernel has finished with the round's sends."""
        self.ram = ram
        self.channels = channels
        self.zero_copy = zero_copy
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

    def _count(self, nbytes: int, normal: int = 0, zero: int = 0, missed: int = 0) -> None:
        with self._lock:
            st = self._stats
            self._stats = MultifdStats(st.bytes_sent + nbytes, st.normal_pages + normal,
                                       st.zero_pages + zero, st.missed_zero_copy + missed)

    def _take_numbers(self, k: int) -> int:
        """The first of ``k`` packet numbers, unique across channels (QEMU's
        ``multifd_send_state->packet_num``)."""
        with self._lock:
            num = self._packet_num
            self._packet_num += k
        return num

    def queue_pages(self, idx: np.ndarray, known_zero: np.ndarray) -> None:
        """Send these page numbers (ascending) on the next channel(s), round robin
        by ``CHANNEL_BATCH_PAGES``; ``known_zero`` marks pages known to be zero
        without reading them."""
        for lo in range(0, idx.size, CHANNEL_BATCH_PAGES):
            hi = lo + CHANNEL_BATCH_PAGES
            self._put(self._next, (idx[lo:hi], known_zero[lo:hi]))
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
                if item is _SYNC:
                    head = encode_multifd_sync_packet(packet_num=self._take_numbers(1))
                    ch.sendall(head)
                    # QEMU flushes each channel after its SYNC: no page of the
                    # next round goes out before the kernel is done with this one.
                    missed = ch.flush_zero_copy() if self.zero_copy else 0
                    self._count(head.nbytes, missed=missed)
                    continue
                idx, known_zero = item
                nonzero = self.ram.nonzero_pages(idx, known_zero)
                k = -(-idx.size // MULTIFD_PACKET_PAGES)
                heads = encode_multifd_ram_packets(idx, nonzero, block=name,
                                                   first_packet_num=self._take_numbers(k))
                # Zero copy: the headers go in the same sendmsg as the pages
                # (one system call; the wire is QEMU's), held until sent.
                ch.send_iovec(packets_iovec(heads, idx, nonzero, self._ram_base),
                              zero_copy=self.zero_copy, keep=heads)
                n_normal = int(np.count_nonzero(nonzero))
                self._count(heads.nbytes + n_normal * TARGET_PAGE_SIZE, n_normal,
                            int(idx.size) - n_normal)
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


class _OneRun:
    """The receiver's check of its usual packet (QEMU's and livemig's senders'):
    normal pages only, consecutive, of this RAM block, none outside it. Reads
    the header buffer a channel reuses through views made once, so a packet
    costs a few byte compares and one vectorised step; anything else (SYNC,
    zero pages, holes, a bad header) goes to the full decode and its checks."""

    def __init__(self, head: np.ndarray, name: bytes, ram_size: int) -> None:
        self._mv = memoryview(head.data)
        self._offs = np.frombuffer(head, dtype=">u8", count=MULTIFD_PACKET_PAGES,
                                   offset=_OFFSETS_AT)
        self._name = name
        self._name_end = _NAME_AT + len(name)
        self._size = ram_size

    def __call__(self) -> tuple[int, int] | None:
        """(first page, count), or None."""
        mv = self._mv
        if mv[:16] != _RUN_PREFIX or mv[32:36] != b"\0\0\0\0" or \
                mv[_NAME_AT:self._name_end] != self._name:
            return None
        normal = int.from_bytes(mv[16:20], "big")
        o0 = int.from_bytes(mv[_OFFSETS_AT:_OFFSETS_AT + 8], "big")
        if not 0 < normal <= MULTIFD_PACKET_PAGES or o0 & (TARGET_PAGE_SIZE - 1) or \
                o0 + (normal << TARGET_PAGE_BITS) > self._size:
            return None
        if normal > 1:
            offs = self._offs[:normal]
            if not bool((offs - np.uint64(o0) == _RUN_STEPS[:normal]).all()):
                return None
        return o0 >> TARGET_PAGE_BITS, normal

    def packet_num(self) -> int:
        return int.from_bytes(self._mv[24:32], "big")


class MultifdReceiver:
    """Destination side: one thread per channel applying packets to RAM."""

    def __init__(self, channels: list[Any], ram, extra: Sequence[Any] = ()) -> None:
        """``extra``: the machine's other RAM blocks (microvm's firmware and ROMs),
        which a QEMU source sends on these channels too."""
        self.ram = ram
        self.extra = {b.idstr: b for b in extra}
        self.channels = channels
        self.error: str | None = None
        self.pages = 0
        self._released = 0
        self._cond = threading.Condition()
        self._syncs = [0] * len(channels)
        self._ram_base = ram.host_address
        self._name_bytes = ram.idstr.encode() + b"\0"     # ramblock[256], NUL-terminated
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
        head = np.zeros(MULTIFD_PACKET_SIZE, dtype=np.uint8)
        head_iov = np.array([(head.ctypes.data, MULTIFD_PACKET_SIZE)], dtype=IOVEC)
        one_run = np.zeros(2, dtype=IOVEC)
        one_run[1] = head_iov[0]
        run_base, run_len = one_run["base"], one_run["len"]
        one_run_of = _OneRun(head, self._name_bytes, self.ram.size)
        loaded = self.ram.loaded
        ram_base = self._ram_base
        try:
            got = ch.recv_iovec(head_iov, total=MULTIFD_PACKET_SIZE)
            while got:                           # 0: the source closed: done
                if got != MULTIFD_PACKET_SIZE:
                    raise ValueError(f"multifd: short packet header ({got} bytes)")
                run = one_run_of()
                if run is not None:
                    # The common packet, checked without decoding it in full:
                    # one run of normal pages, read with the next header.
                    first, n = run
                    data = n << TARGET_PAGE_BITS
                    run_base[0] = ram_base + (first << TARGET_PAGE_BITS)
                    run_len[0] = data
                    got = ch.recv_iovec(one_run, total=data + MULTIFD_PACKET_SIZE) - data
                    if got < 0:
                        raise ValueError(f"multifd: packet {one_run_of.packet_num()} ends "
                                         f"early ({got + data} of {data} data bytes)")
                    loaded[first:first + n] = True
                    self.pages += n
                    continue
                pkt = decode_multifd_packet_header(head)
                block, normal, zero = self._pages(pkt)
                # The offsets came first, so the data go straight into guest RAM,
                # a run of consecutive pages per iovec (QEMU reads into iovecs of
                # host pages the same way), and the next packet's header with
                # them in the same readv: one system call per packet, no copy.
                # A SYNC waits before anything more is read.
                iov = self._data_iovec(normal, None if pkt.sync else head_iov,
                                       block.host_address)
                want = int(normal.size) << TARGET_PAGE_BITS
                got = ch.recv_iovec(iov) - want if iov.size else 0
                if got < 0:
                    raise ValueError(f"multifd: packet {pkt.packet_num} ends early "
                                     f"({got + want} of {want} data bytes)")
                if normal.size:
                    block.loaded[normal] = True
                if zero.size:
                    zero_pages(block, zero)
                self.pages += int(normal.size + zero.size)
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
                    got = ch.recv_iovec(head_iov, total=MULTIFD_PACKET_SIZE)
        except Exception as exc:  # noqa: BLE001 - reported through self.error
            self._fail(getattr(exc, "desc", None) or str(exc))

    def _pages(self, pkt) -> tuple[Any, np.ndarray, np.ndarray]:
        """A packet's block and (normal, zero) page numbers, checked as QEMU checks them."""
        offs = pkt.offsets
        if not offs.size:
            return self.ram, offs, offs
        ram = self.ram if pkt.block == self.ram.idstr else self.extra.get(pkt.block)
        if ram is None:
            raise ValueError(f"multifd: unknown ram block {pkt.block}")
        top = int(offs.max())
        if top > ram.size - TARGET_PAGE_SIZE:
            raise ValueError(f"multifd: offset too long {top} (max {ram.size:x})")
        if np.bitwise_or.reduce(offs) & (TARGET_PAGE_SIZE - 1):
            raise ValueError("multifd: page offset not page aligned")
        pages = (offs >> _PAGE_BITS).astype(np.int64)
        return ram, pages[:pkt.normal_pages], pages[pkt.normal_pages:]

    def _data_iovec(self, normal: np.ndarray, then: np.ndarray | None,
                    base_address: int | None = None) -> np.ndarray:
        """iovecs for these pages' data in guest RAM (or the block at
        ``base_address``), a run per iovec, then ``then``."""
        extra = 0 if then is None else 1
        if not normal.size:
            return then if then is not None else np.empty(0, dtype=IOVEC)
        base = np.uint64(self._ram_base if base_address is None else base_address)
        if int(normal[-1]) - int(normal[0]) + 1 == normal.size and \
                (normal.size < 3 or bool((np.diff(normal) == 1).all())):
            iov = np.empty(1 + extra, dtype=IOVEC)       # one run: the common case
            iov[0] = (int(base) + (int(normal[0]) << TARGET_PAGE_BITS),
                      normal.size << TARGET_PAGE_BITS)
        else:
            firsts, counts = page_runs(normal)
            iov = np.empty(firsts.size + extra, dtype=IOVEC)
            iov["base"][:firsts.size] = base + (firsts.astype(np.uint64) << _PAGE_BITS)
            iov["len"][:firsts.size] = counts.astype(np.uint64) << _PAGE_BITS
        if then is not None:
            iov[-1] = then[0]
        return iov

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
