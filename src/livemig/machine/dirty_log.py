"""The dirty log: which guest pages were written since the last sync.

One bool per page (numpy), because the consumer (the RAM migration bitmap)
works on bools and 1 byte/page is 0.025% of RAM. KVM's packed bitmap is
unpacked into it with ``np.unpackbits``.
"""

from __future__ import annotations

import threading

import numpy as np


class DirtyLog:
    """Pages dirtied by the guest since the last :meth:`sync`.

    ``enabled`` is off outside migration so the guest pays nothing for it.
    Writers mark slices (``mark_range``) from the vCPU thread; the migration
    thread calls :meth:`sync` to take and clear the log atomically.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.bits = np.zeros(npages, dtype=bool)
        self.enabled = False
        self._lock = threading.Lock()

    def mark_range(self, first_page: int, end_page: int) -> None:
        if self.enabled:
            with self._lock:
                self.bits[first_page:end_page] = True

    def mark_pages(self, pages: np.ndarray) -> None:
        if self.enabled:
            with self._lock:
                self.bits[pages] = True

    def merge_packed(self, packed: np.ndarray, first_page: int = 0,
                     npages: int | None = None) -> None:
        """OR a KVM-style little-endian packed bitmap (uint64 words) into the log;
        bit 0 is ``first_page`` (one memory slot of several)."""
        n = self.npages - first_page if npages is None else npages
        bits = np.unpackbits(packed.view(np.uint8), bitorder="little")[:n]
        with self._lock:
            self.bits[first_page:first_page + n] |= bits.astype(bool)

    def sync(self, into: np.ndarray, *, written: np.ndarray | None = None) -> int:
        """OR the dirtied pages into ``into`` and clear the log; return how many were new.

        ``written``, a map of pages known to be zero, loses every page the log
        names: once this sync has taken a page's mark, the mark is gone, and a
        send that still trusted the map would never be corrected."""
        with self._lock:
            new = int(np.count_nonzero(self.bits & ~into))
            into |= self.bits
            if written is not None:
                written &= ~self.bits
            self.bits[:] = False
        return new
