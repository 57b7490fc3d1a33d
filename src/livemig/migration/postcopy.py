"""Postcopy: the guest runs on the destination before all its RAM is there.

QEMU's migration/postcopy-ram.c and the postcopy half of migration.c.
Source (``postcopy_start``, then ``postcopy_run_to_end``): once
``migrate-start-postcopy`` was asked and the policy says so
(``policy.StartPostcopy``: what only precopy moves fits, switchover
allowed, so switchover-ack gates it), the guest stops, the devices that
cannot follow (the accel device) send their END sections, RAM's dirty pages
are discarded on the destination (POSTCOPY_RAM_DISCARD), and one PACKAGED
command carries LISTEN, every non-iterable device state, PING 3 and RUN.
The destination reads the whole package before it loads any of it, starts
the guest at RUN and from then on faults: RAM keeps flowing in the
background while the pages it asks for (REQ_PAGES on the return path) go
first (``RamSaveHandler._send_requested``). EOF ends it; SHUT completes it.

Destination (:class:`PostcopyIncoming`): guest RAM is registered with
userfaultfd at LISTEN; a fault thread reads each missing-page fault and
either maps a zero page (a page already received as zero, never populated)
or asks the source for it; the load thread places every page that arrives
with ``UFFDIO_COPY``, which installs it whole and wakes whoever waits on it
(the KVM vCPU inside ``KVM_RUN``; the soft vCPU inside the madvise that
populates each batch before it writes, with the GIL released, see
``RamBlock.populate``). Nothing writes guest RAM in place once listening.

Recovery: a broken channel pauses both sides (``postcopy-paused``; the
source guest stays stopped, its RAM is no longer the guest's truth);
``migrate resume=true`` reconnects (``_postcopy_resume``: RECV_BITMAP, the
destination's received bitmap becomes the dirty bitmap, POSTCOPY_RESUME,
RESUME_ACK) while the destination's ``migrate-recover`` accepted the new
channel (``IncomingState._postcopy_pause``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.machine.ram import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.machine.runstate import RunState
from livemig.machine.userfaultfd import PageFault, Userfaultfd, page_runs
from livemig.migration import savevm, switchover
from livemig.migration.errors import LoadError, MigrationCancelled, MigrationError
from livemig.migration.info import ms as ms_of
from livemig.migration.qemu_file import QEMUFile
from livemig.migration.return_path import SourceReturnPath
from livemig.migration.status import MigrationStatus as S
from livemig.threadname import name_native_thread
from livemig.transport import TransportError
from livemig.wire.constants import MIGRATION_RESUME_ACK_VALUE
from livemig.wire.postcopy import (
    PostcopyAdvise,
    RamDiscard,
    encode_packaged,
    encode_postcopy_advise,
    encode_postcopy_listen,
    encode_postcopy_ram_discards,
    encode_postcopy_resume,
    encode_postcopy_run,
    encode_recv_bitmap,
)
from livemig.wire.return_path import RecvBitmap, ReqPages, ResumeAck

if TYPE_CHECKING:
    from livemig.migration.destination import IncomingState
    from livemig.migration.source import MigrationState

log = logging.getLogger("livemig.migration")
_MADV_NOHUGEPAGE = 15
# Kernel buffer per end of the main channel once postcopy runs (SO_SNDBUF at the
# source, SO_RCVBUF at the destination; the kernel doubles it). A requested page
# is read only after every background byte queued ahead of it: with the 4 MiB
# that tune_socket asks for on each end, up to ~16 MiB, hundreds of ms at the
# rate the destination places pages. QEMU's destination drains that fast; ours
# keeps the queue short instead.
POSTCOPY_QUEUE_BYTES = 128 << 10
# The destination's GIL switch interval while it listens (Python's default: 5 ms).
# A faulting vCPU waits for the fault thread, and that thread for the GIL while
# the load thread runs Python: up to a whole interval for each request.
POSTCOPY_SWITCH_INTERVAL_S = 0.0005

# -- source -------------------------------------------------------------------------------


class PostcopySource:
    """The source's page requests (return-path thread in, migration thread out)."""

    def __init__(self, block: str, block_size: int) -> None:
        self.block, self.block_size = block, block_size
        self._queue: deque[tuple[int, int]] = deque()
        self._lock = threading.Lock()
        self.requests = 0              # query-migrate postcopy-requests
        self.last_block: str | None = None
        self.wake: threading.Event = threading.Event()
        # recovery: the new address (QMP), the destination's bitmap and ACK (RP thread)
        self._resume = threading.Event()
        self.resume_address: Any = None
        self.recv_bitmap: RecvBitmap | None = None
        self.resume_ack = threading.Event()
        self.recoveries = 0

    def resume_to(self, address: Any) -> None:
        self.resume_address = address
        self._resume.set()

    def on_rp_message(self, ev: ReqPages | RecvBitmap | ResumeAck) -> None:
        """@bottom_half: postcopy's return-path messages."""
        if isinstance(ev, ReqPages):
            self.on_req_pages(ev)
        elif isinstance(ev, RecvBitmap):
            if ev.block != self.block:
                raise MigrationError(f"ram_dirty_bitmap_reload: ramblock '{ev.block}' not found")
            npages = self.block_size // TARGET_PAGE_SIZE
            if len(ev.bitmap) != -(-npages // 64) * 8:
                raise MigrationError(f"ram_dirty_bitmap_reload: ramblock '{ev.block}' bitmap "
                                     f"size mismatch (0x{len(ev.bitmap):x} != "
                                     f"0x{-(-npages // 64) * 8:x})")
            self.recv_bitmap = ev
            self.wake.set()
        else:
            if ev.value != MIGRATION_RESUME_ACK_VALUE:
                raise MigrationError(f"illegal resume_ack value {ev.value}")
            self.resume_ack.set()
            self.wake.set()

    def on_req_pages(self, ev: ReqPages) -> None:
        """@bottom_half: migrate_handle_rp_req_pages's checks, with QEMU's texts."""
        if ev.block is None:
            if self.last_block is None:
                raise MigrationError("MIG_RP_MSG_REQ_PAGES has no previous block")
        else:
            if ev.block != self.block:
                raise MigrationError(f"MIG_RP_MSG_REQ_PAGES has no block '{ev.block}'")
            self.last_block = ev.block
        if ev.start % TARGET_PAGE_SIZE or ev.length % TARGET_PAGE_SIZE:
            raise MigrationError(f"MIG_RP_MSG_REQ_PAGES: Misaligned page request, start: "
                                 f"{ev.start:x} len: {ev.length}")
        if ev.length == 0 or ev.start + ev.length > self.block_size:
            raise MigrationError(f"MIG_RP_MSG_REQ_PAGES request overrun, start=0x{ev.start:x} "
                                 f"len=0x{ev.length:x} blocklen=0x{self.block_size:x}")
        with self._lock:
            self._queue.append((ev.start >> TARGET_PAGE_BITS, ev.length >> TARGET_PAGE_BITS))
            self.requests += 1
        self.wake.set()

    def take(self) -> np.ndarray:
        with self._lock:
            if not self._queue:
                return np.zeros(0, dtype=np.int64)
            ranges = list(self._queue)
            self._queue.clear()
        return np.concatenate([np.arange(p, p + n, dtype=np.int64) for p, n in ranges])


class _Buffer:
    """An OutStream into memory: the package is built whole, then sent."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> None:
        self.parts.append(bytes(data))

    def flush(self) -> None:
        pass

    def rate_exceeded(self) -> bool:
        return False

    def budget_left(self) -> int | None:
        return None

    def write_iovec(self, iov: Any, nbytes: int) -> None:
        raise NotImplementedError("device state never goes out as an iovec")

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def send_postcopy_advise(ms: MigrationState) -> None:
    """Right after the return path opens: the destination fails now, early,
    if it cannot do postcopy (QEMU's qemu_savevm_send_postcopy_advise)."""
    assert ms.file is not None
    ms.file.write(encode_postcopy_advise(TARGET_PAGE_SIZE, TARGET_PAGE_SIZE))


def ram_postcopy_send_discard_bitmap(ms: MigrationState) -> int:
    """Sync the dirty log once more and tell the destination to drop every
    page still dirty here (sent before, changed since): one range per run of
    dirty pages, twelve ranges a command. Returns the pages discarded."""
    assert ms.ram is not None and ms.file is not None
    ram = ms.ram
    ram.bitmap_sync()
    dirty = np.flatnonzero(ram.bitmap)
    first, count = page_runs(dirty.astype(np.int64))
    if first.size:
        ms.file.write(encode_postcopy_ram_discards(
            ram.ram.idstr, first.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS),
            count.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)))
    return int(dirty.size)


def postcopy_start(ms: MigrationState) -> None:
    """QEMU's postcopy_start: stop the guest, the non-postcopiable devices'
    last data, the discards, then one package with LISTEN, the device state,
    PING 3 and RUN. The downtime ends once the package is sent."""
    f, ram = ms.file, ms.ram
    assert f is not None and ram is not None and ms.postcopy is not None
    ms.machine.throttle.set(0)
    ms.times.downtime_start = ms.clock()
    ms._mark("src-downtime-start")
    old_runstate = ms.machine.runstate
    ms.vm_was_running = ms.machine.vm_stop(RunState.FINISH_MIGRATE)
    ms.global_state.runstate = "running" if ms.vm_was_running else old_runstate.value
    ms._mark("src-vm-stopped")
    if not ms._set(S.ACTIVE, S.DEVICE):        # QEMU: STOP, device, then postcopy-active
        ms.check()
    f.set_rate_limit(int(ms.params.get("max-postcopy-bandwidth")))
    savevm.qemu_savevm_state_complete_precopy_iterable(ms.savevm, f, in_postcopy=True)
    ms.stats.pending_at_switchover = ram.remaining_bytes()
    ms.postcopy_discarded = ram_postcopy_send_discard_bitmap(ms)
    savevm.qemu_savevm_send_ping(f, 2)
    pkg = _Buffer()
    pkg.write(encode_postcopy_listen())
    savevm.qemu_savevm_state_non_iterable(ms.savevm, pkg)
    savevm.qemu_savevm_send_ping(pkg, 3)
    pkg.write(encode_postcopy_run())
    with ms._lock:          # the point of no return: a cancel is wholly before it or refused
        ms.check()
        # From the package on, the guest may run on the destination: never here again.
        ms.in_postcopy = True
    f.write(encode_packaged(pkg.getvalue()))
    f.flush()
    if not ms._set(S.DEVICE, S.POSTCOPY_ACTIVE):
        ms.check()
    end = ms.clock()
    ms._mark("src-package-sent")
    ms.stats.downtime_ms = ms_of(end - ms.times.downtime_start)
    savevm.qemu_savevm_send_ping(f, 4)
    ram.requests = ms.postcopy          # from here faulted pages jump the queue
    f.flush()
    assert ms.channel is not None
    ms.channel.limit_queue(send=POSTCOPY_QUEUE_BYTES)


def postcopy_run_to_end(ms: MigrationState) -> None:
    """The postcopy phase to its end; a broken channel pauses it (status
    postcopy-paused, the guest waits on the destination) until ``migrate
    resume=true`` gives a new one (QEMU's postcopy_pause / postcopy_do_resume)."""
    while True:
        try:
            _postcopy_send(ms)
            return
        except MigrationCancelled:
            raise
        except (MigrationError, TransportError, OSError) as exc:
            if ms.sm.status is not S.POSTCOPY_ACTIVE:
                raise
            log.info("postcopy paused: %s", getattr(exc, "desc", None) or exc)
            _postcopy_pause(ms)


def _postcopy_pause(ms: MigrationState) -> None:
    """Close the broken channel, wait for a new address, reconnect and do the
    resume handshake; any failure there pauses again."""
    pc = ms.postcopy
    assert pc is not None
    ms._set(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED)
    while True:
        _drop_channel(ms)
        pc.recv_bitmap = None
        pc.resume_ack.clear()
        pc._resume.wait()          # migrate resume=true (migrate_cancel is refused here)
        pc._resume.clear()
        try:
            _postcopy_resume(ms, pc.resume_address)
            pc.recoveries += 1
            return
        except (MigrationError, TransportError, OSError) as exc:
            log.info("postcopy resume failed: %s", getattr(exc, "desc", None) or exc)
            old = ms.sm.status
            if old in (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER):
                ms._set(old, S.POSTCOPY_PAUSED)


def _drop_channel(ms: MigrationState) -> None:
    if ms.rp is not None:
        ms.rp.shutdown()
        ms.rp.join(2.0)
        ms.rp = None
    if ms.channel is not None:
        ms.channel.shutdown()
        try:
            ms.channel.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
        ms.channel = None


def _postcopy_resume(ms: MigrationState, address: Any) -> None:
    """migrate_fd_connect (resume) + postcopy_do_resume: a new channel and
    return path; RECV_BITMAP: what the destination lacks is dirty again;
    POSTCOPY_RESUME; RESUME_ACK: postcopy-active."""
    pc, ram = ms.postcopy, ms.ram
    assert pc is not None and ram is not None
    channel = ms._connect(address)
    ms.channel = channel
    if not channel.supports_return_path:
        raise MigrationError("Unable to open return-path for postcopy")
    channel.limit_queue(send=POSTCOPY_QUEUE_BYTES)
    f = ms.file = QEMUFile(channel)
    f.set_rate_limit(int(ms.params.get("max-postcopy-bandwidth")))
    ms.rp = SourceReturnPath(channel.return_path(), ms.on_switchover_ack,
                             on_costs=ms.on_load_costs, on_pong=ms.on_pong,
                             on_postcopy=pc.on_rp_message)
    ms.rp.start()
    ms._set(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER)
    ram.forget_last_block()
    f.write(encode_recv_bitmap(ram.ram.idstr))
    f.flush()
    _wait(ms, lambda: pc.recv_bitmap is not None, "the destination's received bitmap")
    assert pc.recv_bitmap is not None
    received = pc.recv_bitmap.received(ram.ram.npages)
    ram.bitmap[:] = ~received              # ram_dirty_bitmap_reload
    f.write(encode_postcopy_resume())
    f.flush()
    _wait(ms, pc.resume_ack.is_set, "RESUME_ACK")
    ms._set(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)


def _wait(ms: MigrationState, done: Any, what: str, timeout: float = 30.0) -> None:
    pc = ms.postcopy
    assert pc is not None
    deadline = ms.clock() + timeout
    while not done():
        ms.check()
        if ms.clock() > deadline:
            raise MigrationError(f"postcopy resume: no {what} from the destination")
        pc.wake.wait(0.05)
        pc.wake.clear()


def _postcopy_send(ms: MigrationState) -> None:
    """RAM's background pages until none is left (requests first), then its
    END, EOF, and the destination's SHUT."""
    f, ram, pc = ms.file, ms.ram, ms.postcopy
    assert f is not None and ram is not None and ms.channel is not None and pc is not None
    window_start = ms.clock()
    while ram.remaining_bytes():
        ms.check()
        left = switchover.BUFFER_DELAY_MS / 1000 - (ms.clock() - window_start)
        if left <= 0:
            window_start = ms.close_window(window_start)
        elif f.rate_exceeded():
            # max-postcopy-bandwidth spent: wait out the window, unless a page
            # request comes first (QEMU's rate_limit_sem, posted on urgent requests).
            if not pc.wake.wait(left):
                continue
        pc.wake.clear()
        savevm.qemu_savevm_state_iterate(ms.savevm, f, postcopy=True)
    savevm.qemu_savevm_state_complete_postcopy(ms.savevm, f)
    end = ms._await_destination("src-postcopy-sent")
    ms.times.end = end
    ms.machine.set_runstate(RunState.POSTMIGRATE)
    ms._set(S.POSTCOPY_ACTIVE, S.COMPLETED)


# -- destination ---------------------------------------------------------------------------


class PostcopyIncoming:
    """The destination's postcopy: received map, userfaultfd, fault thread.

    ``received``: pages that hold their migrated contents here or will be a
    zero page here without asking (``zero_local``). At LISTEN every page
    the source did not discard is received: the source sent each page before
    it could be clean there. ``requested`` pages were asked for once.
    """

    def __init__(self, inc: IncomingState) -> None:
        self.inc = inc
        self.ram = inc.machine.ram
        n = self.ram.npages
        self.discarded = np.zeros(n, dtype=bool)
        self.received = np.zeros(n, dtype=bool)
        self.zero_local = np.zeros(n, dtype=bool)
        self.requested = np.zeros(n, dtype=bool)
        self.requested_at = np.zeros(n, dtype=np.float64)
        self.latencies_s: list[float] = []          # fault read -> page placed
        self.uffd: Userfaultfd | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stage = np.empty((256, TARGET_PAGE_SIZE), dtype=np.uint8)
        self._last_rb_named = False
        self.faults = 0
        self.requests = 0
        self.listening = False
        self._switch_interval: float | None = None    # the process's, while listening

    # -- commands (load thread) ------------------------------------------------------------
    def advise(self, advise: PostcopyAdvise) -> None:
        """loadvm_postcopy_handle_advise's checks; THP off on guest RAM (QEMU
        does the same: a 4 KiB page placed or discarded must not split or
        populate a 2 MiB one)."""
        if advise.pagesize_summary is None:
            return
        if not self.ram.anonymous:
            # QEMU does shmem/hugetlbfs postcopy too; livemig places anonymous pages only.
            raise LoadError("Postcopy is not supported by livemig with a file-backed "
                            "memory backend")
        if advise.pagesize_summary != TARGET_PAGE_SIZE:
            raise LoadError(f"Postcopy needs matching RAM page sizes "
                            f"(s={advise.pagesize_summary:x} d={TARGET_PAGE_SIZE:x})")
        if advise.target_page_size != TARGET_PAGE_SIZE:
            raise LoadError(f"Postcopy needs matching target page sizes "
                            f"(s={advise.target_page_size} d={TARGET_PAGE_SIZE})")
        try:
            Userfaultfd().close()          # postcopy_ram_supported_by_host
        except OSError as exc:
            raise LoadError(f"Userfaultfd not available: {exc.strerror}") from None
        self.ram.madvise(_MADV_NOHUGEPAGE, 0, self.ram.size)

    def discard(self, d: RamDiscard) -> None:
        if d.block != self.ram.idstr:
            raise LoadError(f"ram_discard_range: Failed to find block '{d.block}'")
        for start, length in zip(d.starts.tolist(), d.lengths.tolist(), strict=True):
            if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or \
                    start + length > self.ram.size:
                raise LoadError(f"ram_discard_range: bad range 0x{start:x}+0x{length:x} of "
                                f"'{d.block}' (0x{self.ram.size:x} bytes)")
            first, count = start >> TARGET_PAGE_BITS, length >> TARGET_PAGE_BITS
            self.ram.discard(first, count)
            self.discarded[first:first + count] = True

    def listen(self) -> None:
        """Arm userfaultfd on guest RAM and start the fault thread."""
        self.received[:] = ~self.discarded
        self.zero_local[:] = self.received & ~self.ram.resident_pages()
        try:
            self.uffd = Userfaultfd()
            self.uffd.register(self.ram.host_address, self.ram.size)
        except OSError as exc:
            self.close()
            raise LoadError(f"postcopy_ram_incoming_setup: {exc}") from None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.inc.channel is not None:
            self.inc.channel.limit_queue(recv=POSTCOPY_QUEUE_BYTES)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, POSTCOPY_SWITCH_INTERVAL_S))
        self.ram.postcopy_armed = True
        self.listening = True
        self._thread = threading.Thread(target=self._fault_thread, name="postcopy/fault",
                                        daemon=True)
        self._thread.start()

    # -- placing (load thread) ------------------------------------------------------------
    def place_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Place a batch whole: staged contiguously, one UFFDIO_COPY per run."""
        uffd = self.uffd
        assert uffd is not None
        base = self.ram.host_address
        for s in range(0, idx.size, self._stage.shape[0]):
            part = idx[s:s + self._stage.shape[0]]
            stage = self._stage[:part.size]
            stage[:] = data[s:s + part.size]
            src = stage.ctypes.data
            first, count = page_runs(part.astype(np.int64))
            off = 0
            for p, n in zip(first.tolist(), count.tolist(), strict=True):
                self._copy(uffd, base + (p << TARGET_PAGE_BITS), src + off, n)
                off += n * TARGET_PAGE_SIZE
            self._placed(part)

    def _copy(self, uffd: Userfaultfd, dst: int, src: int, n: int) -> None:
        try:
            uffd.copy(dst, src, n * TARGET_PAGE_SIZE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise LoadError(f"postcopy_place_page: {os.strerror(exc.errno or 0)} copy "
                                f"host: 0x{dst:x} (size: {n * TARGET_PAGE_SIZE})") from None
            for i in range(n):                # some page of the run was there: one by one
                try:
                    uffd.copy(dst + i * TARGET_PAGE_SIZE, src + i * TARGET_PAGE_SIZE,
                              TARGET_PAGE_SIZE)
                except OSError as e2:
                    if e2.errno != errno.EEXIST:
                        raise LoadError(f"postcopy_place_page: {os.strerror(e2.errno or 0)}"
                                        ) from None

    def place_zero_pages(self, idx: np.ndarray) -> None:
        uffd = self.uffd
        assert uffd is not None
        base = self.ram.host_address
        first, count = page_runs(idx.astype(np.int64))
        for p, n in zip(first.tolist(), count.tolist(), strict=True):
            try:
                uffd.zeropage(base + (p << TARGET_PAGE_BITS), n * TARGET_PAGE_SIZE)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise LoadError(f"postcopy_place_page_zero: {exc.strerror}") from None
                for i in range(p, p + n):
                    try:
                        uffd.zeropage(base + (i << TARGET_PAGE_BITS), TARGET_PAGE_SIZE)
                    except OSError as e2:
                        if e2.errno != errno.EEXIST:
                            raise LoadError(f"postcopy_place_page_zero: {e2.strerror}"
                                            ) from None
        self._placed(idx)

    def _placed(self, idx: np.ndarray) -> None:
        now = time.monotonic()
        with self._lock:
            self.received[idx] = True
            self.zero_local[idx] = False
            asked = idx[self.requested[idx]]
            if asked.size:
                self.latencies_s.extend((now - self.requested_at[asked]).tolist())
                self.requested[asked] = False

    # -- fault thread --------------------------------------------------------------------
    def _fault_thread(self) -> None:
        name_native_thread()
        uffd = self.uffd
        assert uffd is not None
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                for ev in uffd.read_events():
                    if isinstance(ev, PageFault):
                        self._on_fault(uffd, ev)
        except Exception as exc:  # noqa: BLE001 - the load thread reports it
            log.warning("postcopy fault thread failed: %s", exc)

    def _on_fault(self, uffd: Userfaultfd, ev: PageFault) -> None:
        page = (ev.address - self.ram.host_address) >> TARGET_PAGE_BITS
        if not 0 <= page < self.ram.npages:
            return
        self.faults += 1
        with self._lock:
            if self.zero_local[page]:
                self.zero_local[page] = False
                zero = True
            elif self.received[page] or self.requested[page]:
                return
            else:
                zero = False
                self.requested[page] = True
                self.requested_at[page] = time.monotonic()
        if zero:
            try:
                uffd.zeropage(ev.address & ~(TARGET_PAGE_SIZE - 1), TARGET_PAGE_SIZE)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            return
        self.requests += 1
        rp = self.inc.rp
        if rp is not None:
            block = None if self._last_rb_named else self.ram.idstr
            self._last_rb_named = True
            rp.send_req_pages(page << TARGET_PAGE_BITS, TARGET_PAGE_SIZE, block)

    # -- recovery ---------------------------------------------------------------------------
    def received_now(self) -> np.ndarray:
        """What the source need not send again (RECV_BITMAP's bitmap)."""
        with self._lock:
            return self.received.copy()

    def resend_requests(self) -> None:
        """After RESUME: ask again for every page still waited on (QEMU's
        migrate_send_rp_req_pages_pending); the first names the block."""
        self._last_rb_named = False
        with self._lock:
            pages = np.flatnonzero(self.requested & ~self.received)
        rp = self.inc.rp
        if rp is None:
            return
        for page in pages.tolist():
            block = None if self._last_rb_named else self.ram.idstr
            self._last_rb_named = True
            rp.send_req_pages(page << TARGET_PAGE_BITS, TARGET_PAGE_SIZE, block)

    # -- end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the fault thread, unregister and close the userfaultfd (every path)."""
        self.ram.postcopy_armed = False
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self.listening = False

    def info(self) -> dict[str, Any]:
        """livemig's ``x-postcopy``: faults read, pages requested, each request's
        latency (fault read to page placed: what the faulting vCPU waited) and
        their sum (``blocked-ms``: QEMU's postcopy-blocktime for one vCPU)."""
        with self._lock:
            lat = np.array(self.latencies_s) * 1000
        out: dict[str, Any] = {"faults": self.faults, "requests": self.requests,
                               "blocked-ms": int(round(float(lat.sum()))) if lat.size else 0}
        if lat.size:
            out["request-latency-ms"] = {"median": round(float(np.median(lat)), 3),
                                         "p99": round(float(np.percentile(lat, 99)), 3),
                                         "max": round(float(lat.max()), 3)}
        return out
