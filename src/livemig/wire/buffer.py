"""The receive buffer under both decoders: received-but-undecoded bytes.

One contiguous numpy uint8 array, so that a run of page records can be viewed
in place as a strided (n, 4096) array with no copy, and so that a socket can
``recv_into`` it directly (``reserve`` / ``commit``). Consumed bytes are
dropped by moving the unread tail to the front ("compaction") only when space
runs out, so the cost is one small memmove per buffer-full, not per record.

Positions used by decoders (``start``, ``end``, arguments) are indices into
``buf``; ``base + index`` is the absolute stream offset, kept exact across
compaction for error messages.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

DEFAULT_CAPACITY = 4 * 1024 * 1024  # bytes; ~1000 page records


class ReceiveBuffer:
    """Growable byte window over the peer's stream (see module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._initial_capacity = capacity
        self.buf: npt.NDArray[np.uint8] = np.empty(capacity, dtype=np.uint8)
        self.view: memoryview = self.buf.data  # format 'B', for struct and bytes()
        self.start = 0  # index of the first unconsumed byte
        self.end = 0  # index one past the last received byte
        self.base = 0  # absolute stream offset of buf[0]
        self.eof = False  # the peer's data has ended
        self._lent = 0  # size of the last view handed out by reserve()

    # --- filling ---------------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in; ``b""`` marks the end of the peer's data (h11 idiom)."""
        src = np.frombuffer(data, dtype=np.uint8)
        n = src.size
        if n == 0:
            self.eof = True
            return
        self._check_open()
        self._make_room(n)
        self.buf[self.end:self.end + n] = src
        self.end += n

    def reserve(self, min_size: int) -> memoryview:
        """A writable view of all free space, at least ``min_size`` bytes long."""
        self._check_open()
        self._make_room(max(min_size, 1))
        view = self.view[self.end:]
        self._lent = len(view)
        return view

    def commit(self, nbytes: int) -> None:
        """``nbytes`` were written into the last reserved view; 0 means end of data."""
        if nbytes < 0 or nbytes > self._lent:
            raise ValueError(f"buffer_updated({nbytes}) but only {self._lent} bytes were lent")
        self._lent = 0
        if nbytes == 0:
            self.eof = True
            return
        self.end += nbytes

    def _check_open(self) -> None:
        if self.eof:
            raise RuntimeError("data received after the end of data was reported")

    def _make_room(self, n: int) -> None:
        cap = len(self.buf)
        if self.end + n <= cap:
            return
        unread = self.end - self.start
        need = unread + n
        if need <= cap and not (cap > 4 * self._initial_capacity
                                and need <= self._initial_capacity):
            # Compact in place: overlapping numpy assignment is memmove-safe.
            self.buf[:unread] = self.buf[self.start:self.end]
        else:
            if need <= self._initial_capacity:
                new_cap = self._initial_capacity  # shrink back after a large item
            else:
                new_cap = max(need, 2 * cap)
            new = np.empty(new_cap, dtype=np.uint8)
            new[:unread] = self.buf[self.start:self.end]
            self.buf = new
            self.view = new.data
        self.base += self.start
        self.start = 0
        self.end = unread
        self._lent = 0

    # --- reading (positions are buffer indices) --------------------------------------

    def __len__(self) -> int:
        return self.end - self.start

    def has(self, pos: int, n: int) -> bool:
        """True if bytes [pos, pos + n) have been received."""
        return pos + n <= self.end

    def offset(self, pos: int) -> int:
        """Absolute stream offset of buffer index ``pos``."""
        return self.base + pos

    def u8(self, pos: int) -> int:
        return int(self.buf[pos])

    def unpack(self, st: struct.Struct, pos: int) -> tuple[int, ...]:
        return st.unpack_from(self.view, pos)

    def bytes(self, pos: int, n: int) -> bytes:
        return self.view[pos:pos + n].tobytes()
