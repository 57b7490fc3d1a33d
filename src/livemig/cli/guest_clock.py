"""Downtime as the guest lives it, measured from outside both engines.

The walk guest writes a ``.`` to COM1 after every ``tick`` pages it walks
(``-guest walk,tick=N``; QEMU boots the same patched image). Each VM's
serial port is a UNIX socket (``-serial unix:PATH,server=on,wait=off``, the
same spelling on QEMU and livemig); a :class:`SerialObserver` thread reads
it and a :class:`TickLog` timestamps every tick. The guest-visible downtime
of a migration is the gap between the last tick the source's guest wrote
and the first tick the destination's guest wrote (:func:`guest_gap`): the
pause a ping would see, whatever either engine says about itself.

Resolution: a tick comes every ``tick`` pages, so each end of the gap is
known to within one tick period (``tick / pages_per_s``), plus the time the
observer thread takes to be scheduled; both ends are read the same way, so
that delay mostly cancels. A chunk read at once stamps all its ticks with
the read time.
"""

from __future__ import annotations

import bisect
import os
import socket
import threading
import time
from array import array
from collections.abc import Callable

TICK = ord(".")


class TickLog:
    """Sans-IO: bytes in, with the time they were read; tick times out."""

    def __init__(self) -> None:
        self.times = array("d")             # one entry per tick, non-decreasing
        self.other = bytearray()            # everything else the guest wrote ('A', 'B', ...)
        self.bytes = 0

    def feed(self, data: bytes, t: float) -> None:
        self.bytes += len(data)
        n = data.count(TICK)
        if n:
            self.times.extend([t] * n)
        if n != len(data):
            self.other += data.replace(b".", b"")

    @property
    def ticks(self) -> int:
        return len(self.times)

    def last_before(self, t: float) -> float | None:
        """The last tick at or before ``t``."""
        i = bisect.bisect_right(self.times, t)
        return self.times[i - 1] if i else None

    def first_after(self, t: float) -> float | None:
        """The first tick at or after ``t``."""
        i = bisect.bisect_left(self.times, t)
        return self.times[i] if i < len(self.times) else None

    def rate(self, t0: float, t1: float) -> float:
        """Ticks per second between ``t0`` and ``t1``."""
        if t1 <= t0:
            return 0.0
        n = bisect.bisect_right(self.times, t1) - bisect.bisect_left(self.times, t0)
        return n / (t1 - t0)

    def longest_gap(self, t0: float, t1: float) -> tuple[float, float] | None:
        """The widest pause between consecutive ticks inside ``[t0, t1]``:
        (last tick before it, first tick after it)."""
        lo = bisect.bisect_left(self.times, t0)
        hi = bisect.bisect_right(self.times, t1)
        best: tuple[float, float] | None = None
        for i in range(lo + 1, hi):
            a, b = self.times[i - 1], self.times[i]
            if best is None or b - a > best[1] - best[0]:
                best = (a, b)
        return best


def guest_gap(source: TickLog, destination: TickLog) -> float | None:
    """Seconds from the source guest's last tick to the destination guest's
    first: the migration's downtime as the guest lives it. None when either
    side has no tick (the destination never ran, or ticks are off)."""
    if not source.ticks or not destination.ticks:
        return None
    first = destination.times[0]
    last = source.last_before(first)
    return None if last is None else first - last


class SerialObserver:
    """Reads one VM's serial socket on a thread and logs its ticks.

    Connects (retrying until ``timeout``: the VM creates the socket as it
    starts) and reads until the VM closes it or :meth:`close` is called."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic,
                 timeout: float = 30.0) -> None:
        self.path = path
        self.clock = clock
        self.log = TickLog()
        self._lock = threading.Lock()
        self._sock = self._connect(timeout)
        self._thread = threading.Thread(target=self._run, name=f"serial {path}", daemon=True)
        self._thread.start()

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"serial socket {self.path} did not come up") from None
                time.sleep(0.01)      # the VM is still starting: its socket appears soon

    def _run(self) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        while True:
            try:
                n = self._sock.recv_into(buf)
            except OSError:
                return
            t = self.clock()
            if n == 0:
                return
            with self._lock:
                self.log.feed(bytes(view[:n]), t)

    def data(self) -> bytes:
        """What the guest wrote besides ticks ('A', 'B'), so far."""
        with self._lock:
            return bytes(self.log.other)

    def snapshot(self) -> TickLog:
        """A copy of the log, safe to read while the thread goes on."""
        with self._lock:
            copy = TickLog()
            copy.times = array("d", self.log.times)
            copy.other = bytearray(self.log.other)
            copy.bytes = self.log.bytes
            return copy

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()


def serial_socket_path(workdir: str, name: str) -> str:
    """Where a VM's serial socket goes (short: sun_path holds 107 bytes)."""
    return os.path.join(workdir, f"{name}.ser")
