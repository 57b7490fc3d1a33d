"""QEMUFile: the source's buffered, counted, rate-limited writer.

Small writes (headers, commands) collect in a buffer; large ones (page
batches as numpy arrays) flush the buffer and go straight to the channel,
uncopied. Every byte is counted (``transferred``) and charged against the
current 100 ms window's budget (``max-bandwidth`` / 10; 0 = unlimited).
"""

from __future__ import annotations

import threading
from typing import Any

_SMALL = 64 * 1024


class QEMUFile:
    """Source-side writer; used by the migration thread only (``@bottom_half``)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._buf = bytearray()
        self.transferred = 0            # all bytes written, headers included
        self.window_bytes = 0           # bytes since the current window started
        self.rate_limit_bytes = 0       # budget per window; 0 = unlimited
        self.switchover_ack = False     # lets devices end initial data with INIT_DATA_SENT
        self.error: str | None = None
        self._lock = threading.Lock()

    def write(self, data: Any) -> None:
        n = data.nbytes if hasattr(data, "nbytes") else len(data)
        self.transferred += n
        self.window_bytes += n
        if n < _SMALL:
            self._buf += data if not hasattr(data, "tobytes") else data.tobytes()
            if len(self._buf) >= _SMALL:
                self.flush()
        else:
            self.flush()
            self._send(data)

    # Every transport Channel takes gathered writes from anywhere in memory
    # (send_iovec): page batches come as iovec arrays (write_iovec).
    can_gather = True

    def write_iovec(self, iov: Any, nbytes: int) -> None:
        """Write the memory ``iov`` (a transport ``IOVEC`` array, ``nbytes`` in
        all) after what is buffered: page data go from guest RAM to the kernel
        with no copy here (QEMU's qemu_put_buffer_async)."""
        self.transferred += nbytes
        self.window_bytes += nbytes
        self.flush()
        self._send(iov, gathered=True)

    def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            self._send(data)

    def _send(self, data: Any, gathered: bool = False) -> None:
        try:
            if gathered:
                self.channel.send_iovec(data)
            else:
                self.channel.sendall(data)
        except OSError as exc:
            if self.error is None:
                self.error = f"Unable to write to socket: {exc.strerror or exc}"
            raise

    def rate_exceeded(self) -> bool:
        if self.error is not None:
            return True
        return bool(self.rate_limit_bytes) and self.window_bytes >= self.rate_limit_bytes

    def budget_left(self) -> int | None:
        """Bytes this window may still carry; None when unlimited."""
        if not self.rate_limit_bytes:
            return None
        return max(0, self.rate_limit_bytes - self.window_bytes)

    def set_rate_limit(self, bytes_per_s: int) -> None:
        """QEMU's migration_rate_set: budget per 100 ms window (XFER_LIMIT_RATIO 10)."""
        self.rate_limit_bytes = bytes_per_s // 10
