"""The software accelerator: the walk program run by a Python vCPU thread.

The walk is run in batches of pages with numpy (one strided ``+= 1`` per
batch), so stop lands within one batch (about 1 ms at the default rate) and
the per-page cost is C, not Python. The vCPU "registers" are the walk's
program counter: phase, current page and pass counter.

Ticks (``tick=N``), as ``guest/walk.S`` writes them: a ``.`` after every N
pages of the incrementing passes (none in the zeroing pass), counted from
the first incrementing page. A batch never crosses a tick boundary: it ends
at the page that completes a tick, writes the ``.`` at once, and only then
does the vCPU sleep to keep its rate. So each ``.`` leaves when its page is
written (never buffered to the end of a longer batch), ``.`` and ``B`` come
in the guest's order, and the tick count is derived from the migrated state
(pass counter and page), so a destination ticks on the source's phase.

Pace (``pace=C``, TSC cycles the guest busy-waits after each page): the soft
vCPU runs at ``tsc_hz / C`` pages/s, with ``tsc_hz`` read once from the host
(``machine/tsc.py``: KVM_GET_TSC_KHZ of a scratch vCPU when /dev/kvm is
usable, else ``cpu MHz`` of /proc/cpuinfo; 2.6 GHz here). A KVM guest with
the same pace runs at ``tsc_hz / (C + per-page cost)``: the soft vCPU has no
per-page cost to add, so it is the faster of the two, by (C + cost) / C. Under
this project's nested KVM the cost was measured at 11k cycles unpaced and 21k
at C = 26 000, 27k at C = 100 000 (the busy-wait overshoots by a slow
``rdtsc`` loop turn): 230k, 55k and 20k pages/s against the soft vCPU's
100k and 26k for those paces. A bench that wants one rate on both engines
gives the soft walk that rate (``rate=``) or KVM a pace less its cost.
Pace wins over ``rate`` (:meth:`GuestConfig.soft_rate_pages_per_s`);
``-guest`` refuses both at once. The rate is kept against a clock restarted
at every resume, in batches of about 1 ms of pages, so ticks are at most one
batch early and the tick period is ``N / rate`` seconds.
"""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import numpy.typing as npt

from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import GuestConfig
from livemig.machine.ram import TARGET_PAGE_SIZE, RamBlock
from livemig.machine.serial import Serial
from livemig.threadname import name_native_thread

PHASE_BOOT, PHASE_ZERO, PHASE_WALK = 0, 1, 2
# magic "SOFT", version, phase, page index, pass counter
_STATE = struct.Struct(">4sIIQI")
_STATE_MAGIC = b"SOFT"
_BATCH_PAGES_MAX = 4096
_BATCH_SECONDS = 0.001


class SoftAccelerator:
    """Runs the walk guest. Thread roles: ``resume``/``pause`` from any thread,
    the walk itself on the vCPU thread only."""

    name = "soft"

    def __init__(self, ram: RamBlock, dirty_log: DirtyLog, serial: Serial,
                 guest: GuestConfig) -> None:
        if guest.kind != "walk":
            raise ValueError("the soft accelerator runs only the walk guest; "
                             "boot images need -accel kvm")
        guest.validate(ram.size)
        self.ram, self.dirty_log, self.serial, self.guest = ram, dirty_log, serial, guest
        self._first = guest.start // TARGET_PAGE_SIZE
        self._end = guest.end // TARGET_PAGE_SIZE
        self.phase, self.page, self.passes = PHASE_BOOT, self._first, 0
        self._run = threading.Event()       # set while the guest should run
        self._idle = threading.Event()      # set while the vCPU runs no guest code
        self._idle.set()
        self._quit = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    # -- control (any thread) ------------------------------------------------
    def reset(self) -> None:
        self.phase, self.page, self.passes = PHASE_BOOT, self._first, 0

    def resume(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._vcpu_thread, name="vcpu0", daemon=True)
            self._thread.start()
        with self._cond:
            self._idle.clear()
            self._run.set()
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._run.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._idle.wait()
        self._idle.set()

    @property
    def running(self) -> bool:
        return self._run.is_set()

    def log_dirty_start(self) -> None:
        self.dirty_log.enabled = True

    def log_dirty_stop(self) -> None:
        self.dirty_log.enabled = False

    def log_dirty_sync(self) -> None:
        """Nothing to pull: the walk marks the DirtyLog as it writes."""

    def save_cpu_state(self) -> bytes:
        return _STATE.pack(_STATE_MAGIC, 1, self.phase, self.page, self.passes)

    @staticmethod
    def cpu_state_layout(data: bytes) -> list[tuple[str, str, int]]:
        """The parts of a SOFT blob as (name, VMState type, bytes), for the VM
        description (big-endian: VMState's own integer types)."""
        return [("magic", "buffer", 4), ("version", "uint32", 4), ("phase", "uint32", 4),
                ("page", "uint64", 8), ("passes", "uint32", 4)]

    def load_cpu_state(self, data: bytes) -> None:
        if len(data) != _STATE.size:
            raise ValueError(f"soft vCPU state is {len(data)} bytes, expected {_STATE.size} "
                             "(was the source another accelerator?)")
        magic, version, phase, page, passes = _STATE.unpack(data)
        if magic != _STATE_MAGIC or version != 1 or phase > PHASE_WALK:
            raise ValueError("soft vCPU state is malformed")
        if not self._first <= page <= self._end:
            raise ValueError("soft vCPU state points outside this guest's walk range")
        self.phase, self.page, self.passes = phase, page, passes

    def close(self) -> None:
        with self._cond:
            self._quit = True
            self._run.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2)

    # -- vCPU thread -----------------------------------------------------------
    def _vcpu_thread(self) -> None:
        name_native_thread()
        rate = self.guest.soft_rate_pages_per_s()
        batch = _BATCH_PAGES_MAX if rate == 0 else max(1, min(_BATCH_PAGES_MAX,
                                                              int(rate * _BATCH_SECONDS)))
        column = self.ram.pages[:, 0]  # first byte of every page, a strided view
        while True:
            with self._cond:
                while not self._run.is_set() and not self._quit:
                    self._idle.set()
                    self._cond.wait()
                if self._quit:
                    self._idle.set()
                    return
                self._idle.clear()
            # Pace against a clock that restarts at every resume.
            t0, done = time.monotonic(), 0
            while self._run.is_set():
                done += self._step(column, batch)
                if rate:
                    ahead = done / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def _step(self, column: npt.NDArray[np.uint8], batch: int) -> int:
        """Run up to ``batch`` pages of the program; return pages touched."""
        if self.phase == PHASE_BOOT:
            self.serial.write(b"A")
            self.phase, self.page = PHASE_ZERO, self._first
            return 0
        lo = self.page
        hi = min(lo + batch, self._end)
        tick = self.guest.tick_pages if self.phase == PHASE_WALK else 0
        if tick:
            # Pages walked before this batch (from the migrated state), and the
            # batch cut at the page that completes the next tick.
            walked = self.passes * (self._end - self._first) + (lo - self._first)
            hi = min(hi, lo + tick - walked % tick)
        if self.ram.postcopy_armed:
            self.ram.populate(lo, hi)      # postcopy: wait for missing pages, GIL released
        if self.phase == PHASE_ZERO:
            column[lo:hi] = 0
        else:
            column[lo:hi] += 1
        self.dirty_log.mark_range(lo, hi)
        if tick and (walked + hi - lo) % tick == 0:
            self.serial.write(b".")
        if hi == self._end:
            hi = self._first
            if self.phase == PHASE_ZERO:
                self.phase = PHASE_WALK
            else:
                self.passes = (self.passes + 1) & 0xFFFFFFFF
                if self.passes % 64 == 0:
                    self.serial.write(b"B")
        self.page = hi
        return (self._end if hi == self._first else hi) - lo
