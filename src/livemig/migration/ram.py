"""RAM migration: the ``ram`` section (QEMU's migration/ram.c, version 4).

Source: a migration bitmap (one bool per page) fed by dirty-log syncs; pages
leave in batches: gathered with one numpy fancy index, split into zero and
normal pages vectorised, encoded as one contiguous buffer per batch and sent
uncopied. Destination: page batches from the decoder are scattered into the
mapping with one fancy index. No Python loop ever runs per page.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from livemig.machine.ram import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.machine.vmstate import LoadContext, OutStream, SaveContext, SaveVMHandlers
from livemig.transport.channel import IOVEC
from livemig.wire import (
    PayloadKind,
    RamBlockList,
    RamEos,
    RamPages,
    RamZeroPages,
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_multifd_flush,
    encode_ram_page_headers,
    encode_ram_pages,
    encode_ram_zero_pages,
    placed_page_records,
)
from livemig.wire.constants import RAM_PAGE_STRIDE
from livemig.wire.ram import PAGE_CONTINUE

BATCH_PAGES = 1024                 # 4 MiB of pages per encode/send
DIRECT_PAGES = 256                 # records one direct read on the destination guesses
DOWNTIME_BATCH_PAGES = BATCH_PAGES * 4
SCAN_PAGES = 1 << 15               # bitmap stretch scanned per lookup
MAX_WAIT_S = 0.05                  # QEMU's MAX_WAIT: one iterate call sends at most 50 ms
POSTCOPY_BATCH_PAGES = 64          # background pages between looks at the requests


class PageRequests(Protocol):
    """Postcopy's faulted pages (``postcopy.PostcopySource``): they go first."""

    def take(self) -> np.ndarray:
        """Page numbers the destination asked for since the last call (may repeat)."""


class PagePlacer(Protocol):
    """Postcopy's destination (``postcopy.PostcopyIncoming``): pages are placed
    whole through userfaultfd, never written in place, once it listens."""

    def place_pages(self, idx: np.ndarray, data: np.ndarray) -> None: ...

    def place_zero_pages(self, idx: np.ndarray) -> None: ...


class MultifdPages(Protocol):
    """What RAM hands pages to when multifd is on (``multifd.MultifdSender``)."""

    @property
    def normal_pages(self) -> int: ...

    def queue_pages(self, idx: np.ndarray, known_zero: np.ndarray) -> None: ...

    def sync(self) -> None: ...


@dataclass
class RamCounters:
    """``query-migrate``'s ram members that RAM itself maintains."""

    duplicate: int = 0             # zero pages sent
    normal: int = 0                # full pages sent
    precopy_bytes: int = 0         # RAM bytes sent while the guest ran
    downtime_bytes: int = 0        # RAM bytes sent with the guest stopped
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    dirty_bytes_last_sync: int = 0
    pages_in_window: int = 0
    postcopy_bytes: int = 0        # RAM bytes sent once postcopy began
    periods: int = 0               # dirty-rate periods (>= 1 s) closed so far
    period_dirty_bytes: int = 0    # newly dirtied bytes in the last closed period


class RamSaveHandler(SaveVMHandlers):
    """Source side of the ``ram`` section. Runs on the migration thread only."""

    idstr = "ram"
    version_id = 4
    payload_kind = PayloadKind.RAM
    iterable = True

    def __init__(self, machine, on_sync: Callable[[int], None], *,
                 multifd: MultifdPages | None = None, gather: bool = True) -> None:
        """``multifd``: where pages go when the capability is on (the main
        stream then carries only sync points). ``gather``: send pages as
        iovecs straight from guest RAM; False encodes them into a buffer
        first (the reference the property tests compare against)."""
        self.machine = machine
        self.ram = machine.ram
        self.section_id = getattr(machine, "ram_section_id", None)   # microvm: QEMU's 1
        self.on_sync = on_sync
        self.counters = RamCounters()
        self.bitmap = np.zeros(self.ram.npages, dtype=bool)
        self._cursor = 0
        self._last_block: str | None = None
        # Reused encode buffer: QEMUFile sends large writes before returning.
        self._scratch = np.empty(BATCH_PAGES * 4 * (TARGET_PAGE_SIZE + 8) + 256, dtype=np.uint8)
        self._rate_t0 = time.monotonic()
        self._rate_pages = 0
        self.multifd = multifd
        self.gather = gather
        self.multifd_pages_at_stop: int | None = None
        self.known_zero = np.zeros(self.ram.npages, dtype=bool)
        self._zero_known = False           # known_zero may still hold a page
        self._flush_pending = False
        # Gathered writes: iovec i*2 is record i's header, i*2+1 its page in RAM.
        self._ram_base = self.ram.host_address
        self._iov = np.zeros(2 * DOWNTIME_BATCH_PAGES, dtype=IOVEC)
        self._iov["len"][1::2] = TARGET_PAGE_SIZE
        self._iov["len"][2::2] = 8
        self._hdr_scratch = np.empty(8 * DOWNTIME_BATCH_PAGES + 256, dtype=np.uint8)
        self._hdr_steps = np.arange(DOWNTIME_BATCH_PAGES, dtype=np.uint64) * np.uint64(8)
        self.has_postcopy = False          # postcopy-ram: RAM may follow the guest
        self.requests: PageRequests | None = None   # set when postcopy begins
        # The machine's other blocks (microvm's firmware and ROMs): small, never
        # written by the guest, sent whole once (main channel, even with multifd).
        self.extra = list(getattr(machine, "extra_ram", ()))
        self._extra_unsent = bool(self.extra)

    # -- dirty tracking ---------------------------------------------------------
    def bitmap_sync(self) -> None:
        """QEMU's migration_bitmap_sync: pull the dirty log into the bitmap."""
        self.machine.cpu.log_dirty_sync()
        # A page written since setup is no longer known zero, even if it was never
        # sent: this sync consumes its dirty mark (known_zero only ever shrinks).
        new = self.machine.dirty_log.sync(
            self.bitmap, written=self.known_zero if self._zero_known else None)
        c = self.counters
        c.dirty_sync_count += 1
        self._rate_pages += new
        now = time.monotonic()
        if now - self._rate_t0 >= 1.0:
            c.dirty_pages_rate = int(self._rate_pages / (now - self._rate_t0))
            c.period_dirty_bytes = self._rate_pages * TARGET_PAGE_SIZE
            c.periods += 1
            self._rate_t0, self._rate_pages = now, 0
        c.dirty_bytes_last_sync = self.remaining_bytes()
        # Pages re-dirtied by this sync must not overtake their older copies on
        # another multifd channel: a sync point goes out before the next page.
        self._flush_pending = self.multifd is not None
        self.on_sync(c.dirty_sync_count)

    def remaining_bytes(self) -> int:
        return int(np.count_nonzero(self.bitmap)) * TARGET_PAGE_SIZE

    # -- SaveVMHandlers ---------------------------------------------------------
    def save_setup(self, out: OutStream, ctx: SaveContext) -> None:
        self.machine.cpu.log_dirty_start()
        self.machine.dirty_log.enabled = True
        # After logging starts: pages not resident now were never written, so their
        # first send needs no read. A later write marks them dirty, and the sync that
        # takes that mark drops them from known_zero (bitmap_sync), so a page written
        # before its first send is read, not trusted (the postcopy stale-page bug:
        # such a page first sent after the final sync arrived as zero).
        self.known_zero = ~self.ram.resident_pages()
        self._zero_known = bool(self.known_zero.any())
        self.bitmap[:] = True
        self.bitmap_sync()
        self._extra_unsent = bool(self.extra)
        out.write(encode_ram_block_list([(self.ram.idstr, self.ram.size),
                                         *((b.idstr, b.size) for b in self.extra)]))
        out.write(encode_ram_eos())

    def state_pending_estimate(self) -> int:
        return self.remaining_bytes() + self._extra_pending()

    def state_pending_exact(self) -> int:
        self.bitmap_sync()
        return self.remaining_bytes() + self._extra_pending()

    def _extra_pending(self) -> int:
        return sum(b.size for b in self.extra) if self._extra_unsent else 0

    def _send_extra(self, out: OutStream) -> None:
        """Every page of the other blocks, once (zero pages as ZERO records)."""
        self._extra_unsent = False
        c = self.counters
        for block in self.extra:
            idx = np.arange(block.npages)
            nonzero = block.nonzero_pages(idx, np.zeros(block.npages, dtype=bool))
            offsets = idx.astype(np.int64) << TARGET_PAGE_BITS
            if not nonzero.all():
                out.write(encode_ram_zero_pages(block.idstr, offsets[~nonzero],
                                                first_has_block_name=True))
            if nonzero.any():
                out.write(encode_ram_pages(block.idstr, offsets[nonzero], block.pages[nonzero],
                                           first_has_block_name=not (~nonzero).any()))
            self._last_block = block.idstr
            c.duplicate += int(np.count_nonzero(~nonzero))
            c.normal += int(np.count_nonzero(nonzero))
            c.precopy_bytes += int(np.count_nonzero(nonzero)) * TARGET_PAGE_SIZE
            c.pages_in_window += block.npages

    def _multifd_flush(self, out: OutStream, *, force: bool = False) -> None:
        if self.multifd is not None and (self._flush_pending or force):
            self.multifd.sync()
            out.write(encode_ram_multifd_flush())
            # The channels stop at the SYNC until the destination reads this record:
            # it must not wait in our buffer.
            out.flush()
            self._flush_pending = False

    def save_live_iterate(self, out: OutStream) -> bool:
        self._multifd_flush(out)
        if self._extra_unsent:
            self._send_extra(out)
        deadline = time.monotonic() + MAX_WAIT_S
        done = False
        if self.requests is not None:
            # Requested pages go even over the rate limit (QEMU: while not
            # exceeded *or* postcopy_has_request): the guest waits on them.
            self._send_requested(out)
        while not out.rate_exceeded():
            left = out.budget_left()
            limit = BATCH_PAGES if left is None else max(1, min(BATCH_PAGES, left // 4096))
            if self.requests is not None:     # postcopy: faulted pages jump the queue
                self._send_requested(out)
                limit = min(limit, POSTCOPY_BATCH_PAGES)
            idx = self._next_dirty(limit)
            if idx.size == 0:
                done = True
                break
            self._send_pages(out, idx, downtime=False)
            if time.monotonic() > deadline:
                break
        out.write(encode_ram_eos())
        return done

    def forget_last_block(self) -> None:
        """A new channel (postcopy recovery): the next page names its block."""
        self._last_block = None

    def _send_requested(self, out: OutStream) -> None:
        """The pages asked for that are still to send (the others went already)."""
        assert self.requests is not None
        want = self.requests.take()
        if want.size:
            want = np.unique(want)
            want = want[self.bitmap[want]]
            if want.size:
                self.bitmap[want] = False
                self._send_pages(out, want, downtime=True)
                out.flush()

    def save_live_complete_precopy(self, out: OutStream) -> None:
        if self.multifd is not None:
            self.multifd_pages_at_stop = self.multifd.normal_pages
        self.bitmap_sync()
        self._multifd_flush(out)
        if self._extra_unsent:
            self._send_extra(out)
        while True:
            idx = self._next_dirty(DOWNTIME_BATCH_PAGES)
            if idx.size == 0:
                break
            self._send_pages(out, idx, downtime=True)
        self._multifd_flush(out, force=True)   # every page is in before the devices load
        out.write(encode_ram_eos())

    def save_cleanup(self) -> None:
        self.machine.dirty_log.enabled = False
        self.machine.cpu.log_dirty_stop()

    # -- page batches -------------------------------------------------------------
    def _next_dirty(self, limit: int) -> np.ndarray:
        """Up to ``limit`` dirty page numbers from the cursor on (wrapping once),
        cleared in the bitmap as they are taken."""
        n = self.ram.npages
        pos, scanned, count = self._cursor, 0, 0
        found: list[np.ndarray] = []
        while count < limit and scanned < n:
            # Never past where the scan began: a page found on the way round
            # is still set in the bitmap and would be taken twice.
            end = min(pos + SCAN_PAGES, n, pos + n - scanned)
            hits = np.flatnonzero(self.bitmap[pos:end])
            if hits.size > limit - count:
                hits = hits[: limit - count]
                end = pos + int(hits[-1]) + 1  # resume right after the last page taken
            if hits.size:
                found.append(hits + pos)
                count += hits.size
            scanned += end - pos
            pos = end % n
        self._cursor = pos
        if not found:
            return np.empty(0, dtype=np.int64)
        idx = np.concatenate(found) if len(found) > 1 else found[0]
        self.bitmap[idx] = False
        return idx

    def _send_pages(self, out: OutStream, idx: np.ndarray, *, downtime: bool) -> None:
        """Send one batch of page numbers (ascending). Contiguous batches, the
        common case, are read in place: no gather copy before the encode copy."""
        known_zero = self.known_zero[idx]
        if known_zero.any():
            self.known_zero[idx] = False       # only a page's first send may trust it
        if self.multifd is not None:
            # Zero detection happens on the channel threads; normal/duplicate and
            # the bytes come from the sender (precopy/downtime split: not kept).
            self.multifd.queue_pages(idx, known_zero)
            self.counters.pages_in_window += int(idx.size)
            return
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        contiguous = hi - lo == idx.size
        nonzero = self.ram.nonzero_pages(idx, known_zero)
        c = self.counters
        name = self.ram.idstr
        # QEMU's ram_transferred_add: by run state, not by phase.
        downtime = downtime or not self.machine.is_running()
        n_normal = int(np.count_nonzero(nonzero))
        if n_normal != idx.size:
            zero_idx = idx[~nonzero]
            out.write(encode_ram_zero_pages(name, zero_idx.astype(np.int64) << TARGET_PAGE_BITS,
                                            first_has_block_name=self._last_block != name))
            self._last_block = name
            c.duplicate += int(zero_idx.size)
        if n_normal:
            norm_idx = idx if n_normal == idx.size else idx[nonzero]
            offsets = norm_idx.astype(np.int64) << TARGET_PAGE_BITS
            first_named = self._last_block != name
            if self.gather and n_normal <= DOWNTIME_BATCH_PAGES:
                self._write_gathered(out, name, norm_idx, offsets, first_named)
            else:
                pages = (self.ram.pages[lo:hi] if contiguous and n_normal == idx.size
                         else self.ram.pages[norm_idx])
                out.write(encode_ram_pages(name, offsets, pages,
                                           first_has_block_name=first_named,
                                           scratch=self._scratch))
            self._last_block = name
            c.normal += n_normal
            if self.requests is not None:
                c.postcopy_bytes += n_normal * TARGET_PAGE_SIZE
            elif downtime:
                c.downtime_bytes += n_normal * TARGET_PAGE_SIZE
            else:
                c.precopy_bytes += n_normal * TARGET_PAGE_SIZE
        c.pages_in_window += int(idx.size)

    def _write_gathered(self, out: OutStream, name: str, norm_idx: np.ndarray, offsets: np.ndarray,
                        first_named: bool) -> None:
        """Headers from a small buffer, pages straight from guest RAM, one
        gathered write: the page bytes are copied once, by the kernel."""
        n = int(norm_idx.size)
        hdr, first_len = encode_ram_page_headers(name, offsets, first_has_block_name=first_named,
                                                 scratch=self._hdr_scratch)
        iov = self._iov[:2 * n]
        base = np.uint64(hdr.ctypes.data)
        iov["base"][0] = base
        iov["len"][0] = first_len
        iov["base"][2::2] = base + np.uint64(first_len) + self._hdr_steps[:n - 1]
        iov["base"][1::2] = np.uint64(self._ram_base) + \
            (norm_idx.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS))
        out.write_iovec(iov, int(hdr.size) + n * TARGET_PAGE_SIZE)


def zero_pages(ram, idx: np.ndarray) -> None:
    """Make these pages zero on the destination. Only pages this migration
    wrote can be non-zero (the mapping starts zeroed), so the others are not
    even read: untouched memory stays unmapped (no RSS, no faults)."""
    idx = idx[ram.loaded[idx]]
    if idx.size:
        ram.pages[idx] = 0


class RamLoadHandler(SaveVMHandlers):
    """Destination side of the ``ram`` section. Runs on the load thread only."""

    idstr = "ram"
    version_id = 4
    payload_kind = PayloadKind.RAM
    iterable = True

    def __init__(self, machine) -> None:
        self.ram = machine.ram
        # The machine's other blocks by name (microvm's firmware and ROMs).
        self.extra = {b.idstr: b for b in getattr(machine, "extra_ram", ())}
        self.pages_loaded = 0
        self.has_postcopy = True           # its pages may come after the guest runs
        self.placer: PagePlacer | None = None   # set at POSTCOPY_LISTEN

    def load_setup(self, ctx: LoadContext) -> None:
        self.pages_loaded = 0

    def load_event(self, event) -> None:
        if self.extra and isinstance(event, (RamPages, RamZeroPages)) \
                and event.block in self.extra:
            self._load_extra(event)
        elif self.placer is not None and isinstance(event, (RamPages, RamZeroPages)):
            idx = self._page_numbers(event.block, event.offsets)
            if isinstance(event, RamPages):
                self.placer.place_pages(idx, event.data)
            else:
                self.placer.place_zero_pages(idx)
            self.pages_loaded += int(idx.size)
        elif isinstance(event, RamPages):
            idx = self._page_numbers(event.block, event.offsets)
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo == idx.size and (idx.size < 3 or bool((np.diff(idx) == 1).all())):
                self.ram.pages[lo:hi] = event.data      # a run: one strided copy
                self.ram.loaded[lo:hi] = True
            else:
                self.ram.pages[idx] = event.data
                self.ram.loaded[idx] = True
            self.pages_loaded += int(idx.size)
        elif isinstance(event, RamZeroPages):
            idx = self._page_numbers(event.block, event.offsets)
            self._zero(idx)
            self.pages_loaded += int(idx.size)
        elif isinstance(event, RamBlockList):
            self._check_blocks(event)
        elif isinstance(event, RamEos):
            pass

    def _zero(self, idx: np.ndarray) -> None:
        zero_pages(self.ram, idx)

    def pages_placed(self, first: int, count: int) -> None:
        """Pages a direct read put in place (``RamDirectLoad``)."""
        self.ram.loaded[first:first + count] = True
        self.pages_loaded += count

    def _load_extra(self, event: RamPages | RamZeroPages) -> None:
        block = self.extra[event.block]
        offsets = event.offsets
        if offsets.size and (int(offsets.max()) >= block.size or int(offsets.min()) < 0):
            raise ValueError(f"Illegal RAM offset {int(offsets.max()):x}")
        idx = offsets >> TARGET_PAGE_BITS
        block.pages[idx] = event.data if isinstance(event, RamPages) else 0
        self.pages_loaded += int(idx.size)

    def _check_blocks(self, event: RamBlockList) -> None:
        for name, size in event.blocks:
            block = self.ram if name == self.ram.idstr else self.extra.get(name)
            if block is None:
                raise ValueError(f'Unknown ramblock "{name}", cannot accept migration')
            if size != block.size:
                raise ValueError(f"Size mismatch: {name}: 0x{size:x} != 0x{block.size:x}: "
                                  "Invalid argument")

    def _page_numbers(self, block: str, offsets: np.ndarray) -> np.ndarray:
        if block != self.ram.idstr:
            raise ValueError(f"Can't find block {block}")
        if offsets.size and (int(offsets.max()) >= self.ram.size or int(offsets.min()) < 0):
            bad = int(offsets.max())
            raise ValueError(f"Illegal RAM offset {bad:x}")
        return offsets >> TARGET_PAGE_BITS


class RamDirectLoad:
    """The destination's main channel without the copy: page data read
    straight into guest RAM (``StreamDecoder.ram_run_point``).

    Where the stream is inside a run of page records, the next records are
    guessed to continue it: one readv puts each guessed record's 8-byte header
    into a small buffer and its 4096 data bytes into the page it would be
    for. The headers are then checked (``placed_page_records``); records that
    match are loaded with no copy at all. Only pages this migration has not
    loaded yet are guessed at: they are zero (a fresh mapping), so the bytes
    of a wrong guess are handed back to the decoder as stream bytes and those
    pages are discarded, zero again. A wrong guess costs the copy the decoder
    would have made anyway; it never leaves a wrong byte in RAM.
    """

    def __init__(self, ram, handler: RamLoadHandler,
                 read_iovec: Callable[[np.ndarray], int]) -> None:
        self.ram = ram
        self.handler = handler
        self.read_iovec = read_iovec        # one readv: some bytes, 0 at EOF
        self._hdr = np.zeros((DIRECT_PAGES, 8), dtype=np.uint8)
        self._iov = np.zeros(2 * DIRECT_PAGES, dtype=IOVEC)
        self._iov["base"][0::2] = np.uint64(self._hdr.ctypes.data) + \
            np.arange(DIRECT_PAGES, dtype=np.uint64) * np.uint64(8)
        self._iov["len"][0::2] = 8
        self._iov["len"][1::2] = TARGET_PAGE_SIZE
        self._steps = np.arange(DIRECT_PAGES, dtype=np.uint64) << np.uint64(TARGET_PAGE_BITS)
        self._base = np.uint64(ram.host_address)
        self.placed = 0                     # pages placed with no copy
        self.returned = 0                   # bytes a wrong guess handed back

    def _guess(self, offset: int) -> int:
        """How many pages from ``offset`` on may be guessed (not loaded yet)."""
        if self.ram.postcopy_armed:
            return 0             # postcopy: pages are placed whole (UFFDIO_COPY), never read in
        first = offset >> TARGET_PAGE_BITS
        ahead = self.ram.loaded[first:first + DIRECT_PAGES]
        hit = np.flatnonzero(ahead)
        return int(hit[0]) if hit.size else int(ahead.size)

    def align(self, dec) -> int:
        """Bytes to read so the decoder's buffer ends on a record boundary before
        a page worth guessing, else 0 (read as usual)."""
        partial = dec.partial_page_record()
        if partial is None or self._guess(partial[1]) == 0:
            return 0
        return partial[0]

    def _fill(self, base: int, length: int) -> int:
        """Read exactly ``length`` bytes to ``base``; fewer only at EOF."""
        one = np.array([(base, length)], dtype=IOVEC)
        done = 0
        while done < length:
            one["base"][0], one["len"][0] = base + done, length - done
            n = self.read_iovec(one)
            if n == 0:
                break
            done += n
        return done

    def _complete_record(self, got: int, n: int, offset: int) -> int:
        """A read that ended inside a guessed record: finish that record where it
        goes (its 8-byte header, then, if it is the guessed page's, the rest
        of its data), so a short read costs no hand-back and no discard. Safe
        to wait for: every RAM record starts with 8 bytes, and a PAGE record
        has its 4096 data bytes."""
        i, rem = divmod(got, RAM_PAGE_STRIDE)
        if not rem or i >= n:
            return got
        if rem < 8:
            more = self._fill(self._hdr.ctypes.data + i * 8 + rem, 8 - rem)
            got, rem = got + more, rem + more
            if rem < 8:
                return got                  # the data ended: the decoder says so
        want = (offset + i * TARGET_PAGE_SIZE) | PAGE_CONTINUE
        if int.from_bytes(self._hdr[i].tobytes(), "big") != want:
            return got                      # not the guessed record: handed back
        page = int(self._base) + offset + i * TARGET_PAGE_SIZE
        return got + self._fill(page + rem - 8, RAM_PAGE_STRIDE - rem)

    def place(self, dec) -> bool:
        """One direct read if the decoder is at a run point; False if not."""
        point = dec.ram_run_point()
        if point is None or point[0] != self.ram.idstr:
            return False
        offset = point[1]
        n = self._guess(offset)
        if n == 0:
            return False
        iov = self._iov[:2 * n]
        iov["base"][1::2] = self._base + np.uint64(offset) + self._steps[:n]
        got = self.read_iovec(iov)
        if got == 0:
            dec.receive_data(b"")           # the end of the data
            return True
        got = self._complete_record(got, n, offset)
        first = offset >> TARGET_PAGE_BITS
        good = placed_page_records(self._hdr[:n], got, offset)
        if good:
            dec.ram_pages_placed(good)
            self.handler.pages_placed(first, good)
            self.placed += good
        tail = got - good * RAM_PAGE_STRIDE
        if tail:
            # A wrong guess or a short read: those bytes are the stream's again,
            # in stream order (header, data, header, ...), and the pages that
            # took them are zero again.
            m = -(-tail // RAM_PAGE_STRIDE)
            back = np.empty((m, RAM_PAGE_STRIDE), dtype=np.uint8)
            back[:, :8] = self._hdr[good:good + m]
            back[:, 8:] = self.ram.pages[first + good:first + good + m]
            dec.receive_data(back.reshape(-1)[:tail])
            written = -(-(tail - 8) // RAM_PAGE_STRIDE) if tail > 8 else 0
            self.ram.discard(first + good, written)
            self.returned += tail
        return True
