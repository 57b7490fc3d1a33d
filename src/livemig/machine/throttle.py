"""CPU throttling for auto-converge (QEMU's system/cpu-throttle.c).

At ``pct`` percent the vCPU, in every timeslice of 10 ms it runs, is held
paused for ``pct / (100 - pct)`` of a timeslice: 50% runs 10 ms and sleeps
10 ms, 90% runs 10 ms and sleeps 90 ms. QEMU sleeps inside the vCPU thread;
here a small thread pauses and resumes the accelerator (its ``pause`` is a
kick, well under 10 ms, for KVM and the soft vCPU alike). It takes the
machine's lock to pause and resume, and resumes only a guest that is still
meant to run, so a ``stop`` or the migration's final ``vm_stop`` always wins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

TIMESLICE_S = 0.010          # CPU_THROTTLE_TIMESLICE_NS
MAX_PCT = 99                 # CPU_THROTTLE_PCT_MAX


class Pausable(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...


class CpuThrottle:
    """One machine's throttle; ``set(0)`` stops it."""

    def __init__(self, cpu: Pausable, lock: AbstractContextManager[object],
                 should_run: Callable[[], bool]) -> None:
        self.cpu = cpu
        self.lock = lock
        self.should_run = should_run
        self._pct = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def percentage(self) -> int:
        return self._pct

    def set(self, pct: int) -> None:
        """QEMU's cpu_throttle_set (1..99) or cpu_throttle_stop (0)."""
        pct = max(0, min(MAX_PCT, int(pct)))
        with self._wake:
            self._pct = pct
            self._wake.notify_all()
            start = pct and (self._thread is None or not self._thread.is_alive())
        if start:
            self._thread = threading.Thread(target=self._run, name="cpu-throttle",
                                            daemon=True)
            self._thread.start()
        elif not pct and self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._wake:
                pct = self._pct
                if not pct:
                    return
                # The guest runs one timeslice (set(0) ends the wait at once).
                self._wake.wait(TIMESLICE_S)
                pct = self._pct
                if not pct:
                    return
            sleep = TIMESLICE_S * pct / (100 - pct)
            with self.lock:
                if not self.should_run():
                    paused = False
                else:
                    self.cpu.pause()
                    paused = True
            with self._wake:
                self._wake.wait_for(lambda: not self._pct, sleep)
            if paused:
                with self.lock:
                    if self.should_run():
                        self.cpu.resume()
