"""A migration channel over TLS: one ``ssl.SSLSocket``, both directions.

OpenSSL does not let two threads use one SSL object at once, yet the
migration thread writes while the return-path thread reads the same
stream. So after the handshake the socket is non-blocking and every
``SSL_read``/``SSL_write`` runs under one lock that is never held while
waiting: a call that would block (``SSLWantRead``/``SSLWantWrite``)
releases the lock and polls the socket. OpenSSL runs without the GIL, so N
multifd channels encrypt on N cores.

Page data cannot be handed to ``writev`` (the bytes must be encrypted), so
``send_iovec`` gathers the iovec's buffers into one contiguous array with
numpy (:func:`gather_iovec`: one fancy-index copy per distinct buffer
length, never a Python loop per page) and writes that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
from numpy.lib.stride_tricks import as_strided

from livemig.transport.channel import IOVEC, Channel
from livemig.transport.errors import TransportError

PAGE: Final = 4096
# Longest wait between two tries of a blocked call: another thread's SSL call may
# have taken the bytes this one waits for off the socket into OpenSSL's buffer.
_POLL_SLICE_S: Final = 0.2


def _page_rows(iov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The iovec's (bases, lengths), empty buffers dropped and buffers whose length
    is a multiple of a page split into pages (so few distinct lengths remain)."""
    if iov.dtype != IOVEC or iov.ndim != 1:
        raise ValueError("takes a 1-D IOVEC array")
    lens = iov["len"].astype(np.int64)
    bases = iov["base"].astype(np.int64)
    keep = lens > 0
    lens, bases = lens[keep], bases[keep]
    runs = (lens > PAGE) & (lens % PAGE == 0)
    if runs.any():
        counts = np.where(runs, lens // PAGE, 1)
        idx = np.repeat(np.arange(lens.size), counts)
        within = np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
        bases = bases[idx] + within * PAGE * runs[idx]
        lens = np.where(runs[idx], PAGE, lens[idx])
    return bases, lens


def _copy_iovec(iov: np.ndarray, flat: np.ndarray, *, to_flat: bool) -> None:
    """Copy between the iovec's buffers and ``flat`` (their concatenation), one
    fancy-index copy per distinct buffer length (as_strided rows at byte steps)."""
    bases, lens = _page_rows(iov)
    if lens.size == 0:
        return
    total = int(lens.sum())
    assert flat.size == total
    starts = np.cumsum(lens) - lens
    lo = int(bases.min())
    span = int((bases + lens).max()) - lo
    mem = np.ctypeslib.as_array(ctypes.cast(lo, ctypes.POINTER(ctypes.c_uint8)), (span,))
    for length in np.unique(lens).tolist():
        sel = lens == length
        mem_rows = as_strided(mem, shape=(span - length + 1, length), strides=(1, 1))
        flat_rows = as_strided(flat, shape=(total - length + 1, length), strides=(1, 1))
        if to_flat:
            flat_rows[starts[sel]] = mem_rows[bases[sel] - lo]
        else:
            mem_rows[bases[sel] - lo] = flat_rows[starts[sel]]


def gather_iovec(iov: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The bytes an ``IOVEC`` array describes, copied in order into one uint8
    array: the front of ``out`` when given (it must be large enough)."""
    if iov.dtype != IOVEC or iov.ndim != 1:
        raise ValueError("gather_iovec takes a 1-D IOVEC array")
    n = int(iov["len"].sum())
    flat = np.empty(n, np.uint8) if out is None else out[:n]
    _copy_iovec(iov, flat, to_flat=True)
    return flat


# TLS cannot scatter-gather, so page batches are copied into one buffer before
# SSL_write. Copied and encrypted 4 MiB at a time (into a buffer kept per channel)
# the bytes stay in cache; the stop-and-copy's 16 MiB batches gathered whole ran at
# 147-335 MB/s against 418-427 in 4 MiB pieces (512M-100M-tls, 2026-12-02).
GATHER_CHUNK_BYTES = 4 << 20


def iovec_chunks(iov: np.ndarray, limit: int) -> list[np.ndarray]:
    """``iov`` cut into consecutive slices of at most ``limit`` bytes each (an
    entry longer than ``limit`` is a slice of its own)."""
    ends = np.cumsum(iov["len"].astype(np.int64))
    out, start, done = [], 0, 0
    while start < iov.size:
        end = max(start + 1, int(np.searchsorted(ends, done + limit, side="right")))
        out.append(iov[start:end])
        done, start = int(ends[end - 1]), end
    return out


def scatter_iovec(iov: np.ndarray, data: np.ndarray) -> None:
    """``data`` (the concatenation) written into the buffers ``iov`` describes."""
    _copy_iovec(iov, data, to_flat=False)


def truncate_iovec(iov: np.ndarray, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of what ``iov`` describes, as an iovec."""
    ends = np.cumsum(iov["len"].astype(np.int64))
    last = int(np.searchsorted(ends, nbytes, side="left"))
    out = iov[:last + 1].copy()
    if out.size:
        out["len"][-1] -= int(ends[last]) - nbytes if last < ends.size else 0
    return out


class TlsAlert(TransportError):
    """The TLS layer failed (most often: the peer sent an alert, e.g. it refused our
    certificate); ``reason`` is OpenSSL's (``TLSV1_ALERT_UNKNOWN_CA``)."""

    def __init__(self, desc: str, reason: str) -> None:
        super().__init__(desc, errno.EPROTO)
        self.reason = reason


class _TlsStream:
    """The SSL object the main channel and its return path share."""

    def __init__(self, ssock: ssl.SSLSocket) -> None:
        self.ssl = ssock
        self.lock = threading.Lock()
        self.shut = False
        self.timeout: float | None = None
        self.closed = False
        ssock.setblocking(False)


class TlsChannel(Channel):
    """A socket migration channel whose bytes go through TLS (after the handshake)."""

    kind = "socket"
    noun = "socket"
    supports_return_path = True

    def __init__(self, ssock: ssl.SSLSocket, *, _stream: _TlsStream | None = None) -> None:
        super().__init__()
        self._owner = _stream is None
        self._s = _stream if _stream is not None else _TlsStream(ssock)
        self.sock = self._s.ssl
        self._gather_buf = np.empty(0, np.uint8)      # send_iovec's, reused

    @property
    def ssl_object(self) -> ssl.SSLSocket:
        return self._s.ssl

    def _io(self, call: Callable[[], int], writing: bool) -> int:
        s = self._s
        deadline = None if s.timeout is None else time.monotonic() + s.timeout
        while True:
            if s.shut or self._shut:
                if writing:
                    raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
                return 0
            with s.lock:
                try:
                    return call()
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    if writing:
                        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)) from None
                    return 0
            wait = _POLL_SLICE_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            poller = select.poll()
            poller.register(s.ssl.fileno(), events | select.POLLHUP | select.POLLERR)
            poller.poll(int(wait * 1000) + 1)

    def _write(self, view: memoryview) -> int:
        return self._io(lambda: self._s.ssl.send(view), True)

    def _writev(self, views: list[memoryview]) -> int:
        return self._write(views[0])         # short counts are the contract

    def _read_into(self, view: memoryview) -> int:
        return self._io(lambda: self._s.ssl.recv_into(view), False)

    def _error(self, exc: OSError, writing: bool) -> TransportError:
        if isinstance(exc, ssl.SSLError):
            verb = "write to" if writing else "read from"
            reason = str(exc.reason or exc)
            return TlsAlert(f"Unable to {verb} {self.noun}: TLS: {reason}", reason)
        return super()._error(exc, writing)

    def send_iovec(self, iov: np.ndarray, *, zero_copy: bool = False, keep: Any = None) -> None:
        if zero_copy:              # QEMU refuses zero-copy-send with TLS before this
            super().send_iovec(iov, zero_copy=True, keep=keep)
        for part in iovec_chunks(iov, GATHER_CHUNK_BYTES):
            n = int(part["len"].sum())
            if self._gather_buf.size < n:
                self._gather_buf = np.empty(n, np.uint8)
            self.sendall(gather_iovec(part, self._gather_buf))

    def recv_iovec(self, iov: np.ndarray, *, total: int | None = None) -> int:
        """Decrypt into one buffer, then scatter it where ``iov`` points (guest RAM)."""
        data = np.empty(int(iov["len"].sum()), np.uint8)
        got, view = 0, data.data
        while got < data.size:
            n = self.recv_into(view[got:])
            if n == 0:
                break
            got += n
        if got == data.size:
            scatter_iovec(iov, data)
        elif got:
            scatter_iovec(truncate_iovec(iov, got), data[:got])
        return got

    def fileno(self) -> int:
        return self._s.ssl.fileno()

    def return_path(self) -> TlsChannel:
        """The same TLS stream, read by the return-path thread."""
        return TlsChannel(self._s.ssl, _stream=self._s)

    def set_timeout(self, seconds: float | None) -> None:
        self._s.timeout = seconds

    def shutdown(self) -> None:
        self._shut = True
        self._s.shut = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._s.ssl, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._owner:
            self.shutdown()
            self._close_ssl()

    def release(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._owner:
            self._close_ssl()

    def _close_ssl(self) -> None:
        with self._s.lock:
            if not self._s.closed:
                self._s.closed = True
                self._s.ssl.close()

    def linger(self, seconds: float) -> None:
        """Half-close the socket, then drop what the peer still sends until EOF."""
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._s.ssl, socket.SHUT_WR)
        self._s.timeout = 0.1
        while time.monotonic() < deadline:
            try:
                if self._read_into(memoryview(buf)) == 0:
                    return
            except TimeoutError:
                continue
            except OSError:
                return
