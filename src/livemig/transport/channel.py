"""One bidirectional byte stream: the migration main channel (and its return path).

A ``Channel`` wraps a socket (TCP or UNIX), a file, or a pipe to a command,
and offers what the migration threads need and nothing else: zero-copy
writes of any contiguous buffer (numpy page arrays included), gathered
writes, reads straight into a caller's buffer, a byte counter, and a
``shutdown()`` that any thread may call to wake the threads blocked on it.

Threading contract: one thread writes and (at most) one other thread reads;
``shutdown()`` is safe from any thread at any time; ``close()`` only once
the threads using the channel have returned (it calls ``shutdown()`` first).

OS errors become ``TransportError`` with QEMU's QIOChannel texts
(``Unable to write to socket: Broken pipe``, ``Unable to read from file: ...``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from livemig.transport import zerocopy as zc
from livemig.transport.errors import TransportError, UnexpectedEOF

# Socket buffer size asked for on both sides (bytes); the kernel caps it at
# net.core.{w,r}mem_max, so this is a wish, not a guarantee.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Pipe capacity asked for on exec: pipes (bytes); capped by fs.pipe-max-size.
PIPE_BUFFER_BYTES = 1024 * 1024
# How long close()/finish() wait for an exec: child before killing it (s).
COMMAND_EXIT_WAIT_S = 30.0

try:
    _IOV_MAX = int(os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    _IOV_MAX = 1024
if _IOV_MAX <= 0:  # pragma: no cover
    _IOV_MAX = 1024

# struct iovec, for gathered writes built with numpy (no Python object per buffer).
IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])
_libc = ctypes.CDLL(None, use_errno=True)
_libc.writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.writev.restype = ctypes.c_ssize_t
_libc.readv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.readv.restype = ctypes.c_ssize_t


class _MsgHdr(ctypes.Structure):
    """struct msghdr, for sendmsg/recvmsg on IOVEC arrays (no Python object per buffer)."""

    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_MSG_WAITALL = socket.MSG_WAITALL
_libc.sendmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int)
_libc.sendmsg.restype = ctypes.c_ssize_t
_libc.recvmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int)
_libc.recvmsg.restype = ctypes.c_ssize_t


def _iov_syscall(call: Any, iov: np.ndarray, fd_of: Any, wait: Any) -> int:
    """``call`` (readv or writev) on ``fd_of()``: EINTR retried, EAGAIN waited
    out with ``wait()``."""
    while True:
        n = call(fd_of(), iov.ctypes.data, iov.size)
        if n >= 0:
            return int(n)
        code = ctypes.get_errno()
        if code == errno.EINTR:
            continue
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            wait()
            continue
        raise OSError(code, os.strerror(code))


def iovec_after(iov: np.ndarray, nbytes: int) -> np.ndarray:
    """What is left of ``iov`` after its first ``nbytes`` (a copy when a buffer
    was done in part)."""
    ends = np.cumsum(iov["len"])
    i = int(np.searchsorted(ends, nbytes, side="right"))      # first unfinished
    rest = iov[i:].copy()
    if rest.size:
        done_in_first = nbytes - (int(ends[i]) - int(iov["len"][i]))
        rest["base"][0] += done_in_first
        rest["len"][0] -= done_in_first
    return rest


def byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte memoryview of ``data``, without copying.

    Accepts bytes, bytearray, memoryview, mmap, numpy arrays (any dtype and
    shape, as long as C-contiguous). Raises ValueError for strided buffers.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim == 1 and view.format == "B" and view.c_contiguous:
        return view
    if not view.c_contiguous:
        raise ValueError("channel buffers must be C-contiguous")
    return view.cast("B")


TCP_USER_TIMEOUT_MS = 10_000  # a peer silent this long on a TCP migration is gone


def tune_socket(sock: socket.socket) -> None:
    """Large send/receive buffers for every stream socket, TCP_NODELAY for TCP.

    Call before ``connect``/``listen`` so TCP can negotiate its window scale.
    """
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A dead link must end the migration, not hang it for the kernel's ~15 min
        # of retransmissions: unacknowledged data or silent keepalives fail it.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            TCP_USER_TIMEOUT_MS)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def os_error_text(exc: OSError) -> tuple[int | None, str]:
    """(errno, message) of an OSError; socket timeouts carry no errno of their own."""
    code = exc.errno
    if code is None and isinstance(exc, TimeoutError):
        code = errno.ETIMEDOUT
    if code is not None:
        return code, os.strerror(code)
    return None, str(exc) or type(exc).__name__


class Channel:
    """A migration byte stream. Subclasses provide the three raw primitives.

    ``bytes_sent`` counts every byte written (the engine's ``transferred``);
    ``bytes_received`` every byte read.
    """

    kind = "channel"
    # The noun in QEMU's "Unable to write to <noun>" texts.
    noun = "channel"
    supports_return_path = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self._shut = False
        self._closed = False
        self._close_lock = threading.Lock()

    # ---- raw primitives (may return short counts; raise OSError) ----
    def _write(self, view: memoryview) -> int:
        raise NotImplementedError

    def _writev(self, views: list[memoryview]) -> int:
        raise NotImplementedError

    def _read_into(self, view: memoryview) -> int:
        raise NotImplementedError

    def _error(self, exc: OSError, writing: bool) -> TransportError:
        code, message = os_error_text(exc)
        verb = "write to" if writing else "read from"
        return TransportError(f"Unable to {verb} {self.noun}: {message}", code)

    # ---- public API ----
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_shutdown(self) -> bool:
        return self._shut

    def sendall(self, data: Any) -> None:
        """Write every byte of ``data`` (any C-contiguous buffer; never copied)."""
        view = byte_view(data)
        total = view.nbytes
        done = 0
        try:
            while done < total:
                n = self._write(view[done:])
                done += n
                self.bytes_sent += n
        except OSError as exc:
            raise self._error(exc, writing=True) from exc

    def sendmsg_all(self, buffers: Sequence[Any]) -> None:
        """Write all ``buffers`` in order with gathering writes (sendmsg/writev).

        Partial writes are resumed in the middle of the buffer where they
        stopped; at most IOV_MAX buffers go into one system call.
        """
        views = [v for v in (byte_view(b) for b in buffers) if v.nbytes]
        i = 0
        try:
            while i < len(views):
                n = self._writev(views[i:i + _IOV_MAX])
                self.bytes_sent += n
                while n:
                    size = views[i].nbytes
                    if n >= size:
                        n -= size
                        i += 1
                    else:
                        views[i] = views[i][n:]
                        n = 0
        except OSError as exc:
            raise self._error(exc, writing=True) from exc

    def send_iovec(self, iov: np.ndarray, *, zero_copy: bool = False, keep: Any = None) -> None:
        """Write the memory ``iov`` (an ``IOVEC`` array) describes, in order.

        The kernel gathers the bytes from where they lie (guest RAM for page
        data): no copy in user space and no Python object per buffer. The
        caller keeps that memory mapped until this returns. The system call
        runs without the GIL (ctypes), like ``socket.send``.

        ``zero_copy`` (after ``enable_zero_copy``): ``MSG_ZEROCOPY``, the kernel
        reads the memory later, once more after this returns; ``keep`` (the
        buffer holding what must not change meanwhile, e.g. the headers) is
        held until the kernel reports those sends finished. Guest RAM is the
        caller's to keep mapped until ``flush_zero_copy``.
        """
        if not zero_copy:
            self._iovec_all(iov, writing=True)
            return
        self._iovec_all(iov, writing=True, raw=self._zero_copy_raw)
        self._zero_copy_hold(keep)

    def enable_zero_copy(self) -> bool:
        """Set ``SO_ZEROCOPY`` (QEMU does on every socket it connects); False
        where this channel cannot send with ``MSG_ZEROCOPY``."""
        return False

    def _zero_copy_raw(self, iov: np.ndarray) -> int:
        raise TransportError(zc.FEATURE_NOT_AVAILABLE)

    def _zero_copy_hold(self, keep: Any) -> None:
        raise TransportError(zc.FEATURE_NOT_AVAILABLE)

    def flush_zero_copy(self) -> int:
        """Wait until the kernel finished every zero-copy send (QEMU's
        ``qio_channel_flush``): 1 when there were sends since the last flush
        and every one was copied after all, else 0."""
        return 0

    def _iovec_all(self, iov: np.ndarray, *, writing: bool, raw: Any = None,
                   total: int | None = None) -> int:
        """writev/readv until every buffer of ``iov`` is done (reads: or EOF),
        at most IOV_MAX buffers a call, resuming inside a buffer done in part.
        ``total``: the caller's sum of the lengths, when it knows it (a
        multifd receiver, once per packet): one system call and no numpy
        step when that call does it all."""
        if iov.dtype != IOVEC or iov.ndim != 1:
            raise ValueError("send_iovec and recv_iovec take a 1-D IOVEC array")
        count = iov.size
        if raw is None:
            raw = self._writev_raw if writing else self._readv_all_raw
        if total is not None and 0 < count <= _IOV_MAX:
            try:
                n = raw(iov)
            except OSError as exc:
                raise self._error(exc, writing=writing) from exc
            if writing:
                self.bytes_sent += n
            else:
                self.bytes_received += n
            if n == total or (n == 0 and not writing):
                return n
            return n + self._iovec_all(iovec_after(iov, n), writing=writing, raw=raw)
        ends = np.cumsum(iov["len"])           # stream position after each buffer
        total = int(ends[-1]) if count else 0
        i, done, owned = 0, 0, False
        try:
            while done < total:
                last = min(i + _IOV_MAX, count)
                n = raw(iov[i:last])
                if n == 0:
                    if writing:                      # cannot happen with bytes to write
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    break                            # EOF
                if writing:
                    self.bytes_sent += n
                else:
                    self.bytes_received += n
                done += n
                if done == int(ends[last - 1]):       # all of them: the common case
                    i = last
                    continue
                i = int(np.searchsorted(ends, done, side="right"))  # first unfinished
                rest = done - (int(ends[i]) - int(iov["len"][i]))
                if rest:                              # resume inside buffer i
                    if not owned:
                        iov, owned = iov.copy(), True
                    iov["base"][i] += rest
                    iov["len"][i] -= rest
        except OSError as exc:
            raise self._error(exc, writing=writing) from exc
        return done

    def _writev_raw(self, iov: np.ndarray) -> int:
        """One writev(2) of a C-contiguous IOVEC array; retries EINTR, waits on EAGAIN."""
        return _iov_syscall(_libc.writev, iov, self._writable_fd, self._wait_writable)

    def _writable_fd(self) -> int:
        raise NotImplementedError

    def _wait_writable(self) -> None:
        raise NotImplementedError

    def recv_iovec(self, iov: np.ndarray, *, total: int | None = None) -> int:
        """Fill the memory ``iov`` (an ``IOVEC`` array) describes, in order, from
        the stream; returns the bytes read, short only at EOF (or after shutdown).
        ``total``, if given, must be the sum of the lengths (saves the sum).

        The scattering read of ``send_iovec``: page data go straight to where
        they belong (guest RAM), the system call runs without the GIL.
        """
        return self._iovec_all(iov, writing=False, total=total)

    def recv_iovec_some(self, iov: np.ndarray) -> int:
        """One scattering read into ``iov``: what is available (at least one
        byte, blocking until then), at most all of it; 0 at EOF."""
        if iov.dtype != IOVEC or iov.ndim != 1:
            raise ValueError("recv_iovec_some takes a 1-D IOVEC array")
        try:
            n = self._readv_raw(iov[:_IOV_MAX])
        except OSError as exc:
            raise self._error(exc, writing=False) from exc
        self.bytes_received += n
        return n

    def _readv_raw(self, iov: np.ndarray) -> int:
        """One readv(2); retries EINTR, waits on EAGAIN; 0 at EOF or once shut down."""
        if self._readable_fd() < 0:
            return 0
        return _iov_syscall(_libc.readv, iov, self._readable_fd, self._wait_readable)

    def _readv_all_raw(self, iov: np.ndarray) -> int:
        """Like ``_readv_raw``, for ``recv_iovec``: the caller wants all of it."""
        return self._readv_raw(iov)

    def _readable_fd(self) -> int:
        """The descriptor ``recv_iovec`` reads, -1 once shut down (reads see EOF)."""
        raise TransportError(f"A {self.kind} migration channel has no scattering read")

    def _wait_readable(self) -> None:
        raise NotImplementedError

    def recv_into(self, buf: Any) -> int:
        """Read what is available (at least one byte) into ``buf``; 0 at EOF or after shutdown."""
        view = byte_view(buf)
        if not view.nbytes:
            return 0
        try:
            n = self._read_into(view)
        except OSError as exc:
            raise self._error(exc, writing=False) from exc
        self.bytes_received += n
        return n

    def read_exact_into(self, buf: Any) -> int:
        """Fill all of ``buf``; raise ``UnexpectedEOF`` (with ``.received``) if the stream ends."""
        view = byte_view(buf)
        total = view.nbytes
        got = 0
        while got < total:
            n = self.recv_into(view[got:])
            if n == 0:
                raise UnexpectedEOF(got, total)
            got += n
        return total

    def return_path(self) -> Channel:
        """A second Channel on the same stream, for a thread reading while another writes."""
        raise TransportError(f"A {self.kind} migration channel has no return path")

    def limit_queue(self, *, send: int | None = None, recv: int | None = None) -> None:
        """Shrink the kernel's send and/or receive buffer of this channel's
        socket (SO_SNDBUF, SO_RCVBUF; the kernel doubles the value). Postcopy's
        page requests wait behind every byte queued on the way, so it keeps
        that queue short. Not a socket (file, pipe): nothing to do."""
        try:
            fd = self.fileno()  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return
        if fd < 0:
            return
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:                   # ENOTSOCK
            os.close(dup)
            return
        try:
            for opt, size in ((socket.SO_SNDBUF, send), (socket.SO_RCVBUF, recv)):
                if size is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, opt, size)
        finally:
            sock.close()

    def set_timeout(self, seconds: float | None) -> None:
        """Fail reads/writes that block longer than ``seconds`` (None: block forever)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Wake every thread blocked on this channel; later reads see EOF, writes fail.

        Idempotent and safe from any thread (this is how cancel and error
        paths stop the migration and return-path threads).
        """
        raise NotImplementedError

    def finish(self) -> None:
        """Declare the stream complete; raises if the far end reports failure.

        A no-op for sockets and files; exec: channels wait for the command
        and raise on a non-zero exit status.
        """

    def close(self) -> None:
        """Release the channel (shutting it down first). Idempotent."""
        raise NotImplementedError

    def release(self) -> None:
        """Close this descriptor only, never shutting the stream down: a
        return path shares its stream with the main channel. Idempotent."""
        self.close()

    def linger(self, seconds: float) -> None:
        """Half-close, then read and drop what the peer still sends until it
        hangs up or ``seconds`` pass. Closing a socket with unread data sends
        an RST, and an RST can make the peer drop our last message unread.
        Only sockets have a half-close; elsewhere a no-op."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def socketpair(cls) -> tuple[SocketChannel, SocketChannel]:
        """Two connected socket channels in one process (for tests and in-process migration)."""
        a, b = socket.socketpair()
        tune_socket(a)
        tune_socket(b)
        return SocketChannel(a), SocketChannel(b)

    @classmethod
    def tcp_pair(cls) -> tuple[SocketChannel, SocketChannel]:
        """Two connected loopback TCP channels in one process (for benches and
        tests of what UNIX sockets lack, e.g. ``MSG_ZEROCOPY``)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
            tune_socket(lst)                   # the accepted socket inherits it
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tune_socket(a)
            a.connect(lst.getsockname())
            b, _ = lst.accept()
        return SocketChannel(a), SocketChannel(b)


def tcp_zero_copy_available() -> bool:
    """Whether this kernel takes ``SO_ZEROCOPY`` on a TCP socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, zc.SO_ZEROCOPY, 1)
        except OSError:
            return False
    return True


class SocketChannel(Channel):
    """A connected stream socket (TCP or UNIX). Carries a return path."""

    kind = "socket"
    noun = "socket"
    supports_return_path = True

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self._zc: zc.ZerocopyTracker | None = None
        self._zc_control = ctypes.create_string_buffer(zc.ERRQUEUE_CONTROL_BYTES)

    def _write(self, view: memoryview) -> int:
        return self.sock.send(view)

    # ---- zero-copy sends (QEMU's zero-copy-send) ----
    def enable_zero_copy(self) -> bool:
        """Set ``SO_ZEROCOPY``; False where the kernel or the socket family has
        none (UNIX sockets: EOPNOTSUPP), as QEMU finds at connect."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, zc.SO_ZEROCOPY, 1)
        except OSError:
            return False
        if self._zc is None:
            self._zc = zc.ZerocopyTracker()
        return True

    def _zero_copy_raw(self, iov: np.ndarray) -> int:
        """One sendmsg(MSG_ZEROCOPY); ENOBUFS (pinned pages over RLIMIT_MEMLOCK
        without CAP_IPC_LOCK, or finished notifications filling optmem) is
        retried once after reading the finished ones, then QEMU's error."""
        if self._zc is None:
            raise TransportError(zc.FEATURE_NOT_AVAILABLE)
        msg = _MsgHdr(None, 0, iov.ctypes.data, iov.size, None, 0, 0)
        reaped = False
        while True:
            n = _libc.sendmsg(self._writable_fd(), ctypes.byref(msg), zc.MSG_ZEROCOPY)
            if n > 0:
                self._zc.sent()
                return int(n)
            code = ctypes.get_errno() if n < 0 else errno.EIO
            if code == errno.EINTR:
                continue
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                self._wait_writable()
                continue
            if code == errno.ENOBUFS and not reaped:
                self._reap_zero_copy(block=False)
                reaped = True
                continue
            if code == errno.ENOBUFS:
                raise TransportError(f"{zc.CANNOT_LOCK}: {os.strerror(code)}", code)
            raise OSError(code, os.strerror(code))

    def _zero_copy_hold(self, keep: Any) -> None:
        assert self._zc is not None
        if keep is not None:
            self._zc.hold(keep)
        self._reap_zero_copy(block=False)

    def _reap_zero_copy(self, *, block: bool) -> None:
        """Read the error queue's completions: all there are now, or (``block``)
        until every send is finished. A shut-down channel stops the wait."""
        assert self._zc is not None
        tracker = self._zc
        ctl = self._zc_control
        msg = _MsgHdr()
        flags = zc.MSG_ERRQUEUE | zc.MSG_DONTWAIT
        while tracker.pending:
            msg.control, msg.controllen = ctypes.addressof(ctl), len(ctl)
            fd = self.sock.fileno()
            if fd < 0:
                raise TransportError(f"Unable to read errqueue: {os.strerror(errno.EBADF)}",
                                     errno.EBADF)
            if _libc.recvmsg(fd, ctypes.byref(msg), flags) < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if code not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise TransportError(f"Unable to read errqueue: {os.strerror(code)}", code)
                if not block:
                    return
                if self._shut:
                    raise TransportError(f"Unable to read errqueue: {os.strerror(errno.EPIPE)}",
                                         errno.EPIPE)
                # POLLERR is reported whatever the mask: a notification is queued.
                poller = select.poll()
                poller.register(fd, 0)
                poller.poll(100)
                continue
            tracker.completed(zc.parse_errqueue_control(ctl.raw[:msg.controllen]))

    def flush_zero_copy(self) -> int:
        if self._zc is None:
            return 0
        self._reap_zero_copy(block=True)
        return self._zc.flush_result()

    def _writev(self, views: list[memoryview]) -> int:
        return self.sock.sendmsg(views)

    def _read_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _writable_fd(self) -> int:
        if self._shut:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        return self.sock.fileno()

    def _wait_writable(self) -> None:
        self._wait_socket(select.POLLOUT)

    def _wait_socket(self, events: int) -> None:
        # A socket with a timeout is non-blocking underneath (Python's design):
        # wait as sock.send/recv would, up to that timeout.
        timeout = self.sock.gettimeout()
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if not poller.poll(None if timeout is None else int(timeout * 1000)):
            raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    def _readable_fd(self) -> int:
        return -1 if self._shut else self.sock.fileno()

    def _readv_all_raw(self, iov: np.ndarray) -> int:
        """recvmsg(MSG_WAITALL): the kernel waits until every buffer is full (or
        EOF, a shutdown, a signal), so a multifd packet costs one system call
        and one wake-up however its bytes trickle in, not one per piece."""
        fd = self._readable_fd()
        if fd < 0:
            return 0
        msg = _MsgHdr(None, 0, iov.ctypes.data, iov.size, None, 0, 0)
        return _iov_syscall(lambda f, _base, _count: _libc.recvmsg(f, ctypes.byref(msg),
                                                                  _MSG_WAITALL),
                            iov, lambda: fd, self._wait_readable)

    def _wait_readable(self) -> None:
        self._wait_socket(select.POLLIN)

    def return_path(self) -> SocketChannel:
        """A Channel on ``socket.dup()`` of this socket: same stream, separate fd.

        Shutting either one down shuts the shared socket down; closing one
        leaves the other open.
        """
        try:
            return SocketChannel(self.sock.dup())
        except OSError as exc:
            code, message = os_error_text(exc)
            raise TransportError(f"Unable to open return path: {message}", code) from exc

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        self._shut = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.shutdown()
        self.sock.close()

    def release(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.sock.close()

    def linger(self, seconds: float) -> None:
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + seconds
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(0.1)
            while time.monotonic() < deadline:
                try:
                    if self.sock.recv_into(buf) == 0:
                        return
                except TimeoutError:
                    continue
        except OSError:
            return


class FdChannel(Channel):
    """A file descriptor: a regular file (``file:``) or a pipe/FIFO.

    Pipes are made non-blocking and waited on with poll() together with a
    wake-up pipe, so ``shutdown()`` can interrupt a blocked read or write.
    Regular files never block and are used directly.
    """

    supports_return_path = False

    def __init__(self, fd: int, *, kind: str = "file", noun: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.noun = noun or kind
        self._fd = fd
        self._timeout: float | None = None
        self._pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
        if self._pollable:
            os.set_blocking(fd, False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def fileno(self) -> int:
        return self._fd

    def _check_fd(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._fd

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self._check_fd(), events)
        poller.register(self._wake_r, select.POLLIN)
        ms = None if self._timeout is None else max(0, int(self._timeout * 1000))
        if not poller.poll(ms):
            raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    def _write(self, view: memoryview) -> int:
        while True:
            if self._shut:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            try:
                return os.write(self._check_fd(), view)
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def _writev(self, views: list[memoryview]) -> int:
        while True:
            if self._shut:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            try:
                return os.writev(self._check_fd(), views)
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def _writable_fd(self) -> int:
        if self._shut:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        return self._check_fd()

    def _wait_writable(self) -> None:
        self._wait(select.POLLOUT)

    def _read_into(self, view: memoryview) -> int:
        while True:
            if self._shut:
                return 0
            try:
                return os.readv(self._check_fd(), [view])
            except BlockingIOError:
                self._wait(select.POLLIN)

    def set_timeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def shutdown(self) -> None:
        self._shut = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.shutdown()
        self._close_fd()
        os.close(self._wake_r)
        os.close(self._wake_w)


class CommandChannel(FdChannel):
    """A pipe to an ``exec:`` command: its stdin (source) or its stdout (destination).

    The command runs in its own session so that an aborted migration can
    kill it together with any children the shell started.
    """

    def __init__(self, fd: int, proc: subprocess.Popen[bytes], *, child_reads: bool) -> None:
        super().__init__(fd, kind="command")
        self.proc = proc
        self.child_reads = child_reads
        self.returncode: int | None = None

    @classmethod
    def spawn(cls, args: Sequence[str], *, child_reads: bool) -> CommandChannel:
        """Start ``args``; the stream is the child's stdin if ``child_reads`` else its stdout."""
        if not args:
            raise TransportError("Failed to execute child process (empty argument list)",
                                 errno.EINVAL)
        rfd, wfd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_BUFFER_BYTES)
        ours, theirs = (wfd, rfd) if child_reads else (rfd, wfd)
        try:
            proc = subprocess.Popen(
                list(args),
                stdin=theirs if child_reads else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if child_reads else theirs,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(ours)
            code, message = os_error_text(exc)
            raise TransportError(
                f"Failed to execute child process \u201c{args[0]}\u201d ({message})", code
            ) from exc
        finally:
            os.close(theirs)
        return cls(ours, proc, child_reads=child_reads)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _reap(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = self.proc.wait()
        self.returncode = rc
        return rc

    def finish(self) -> None:
        """End the stream and wait for the command; raise if it did not exit with 0."""
        if self.child_reads:
            self._close_fd()  # the command sees EOF on its stdin
        rc = self._reap(COMMAND_EXIT_WAIT_S)
        if rc > 0:
            raise TransportError(f"Command exited with status {rc}")
        if rc < 0:
            raise TransportError(f"Command killed by signal {-rc}")

    def close(self) -> None:
        """Close the pipe and reap the command (killed at once if the channel was shut down)."""
        already = self._closed
        aborted = self._shut
        super().close()
        if already:
            return
        if aborted:
            self._kill()
        self._reap(COMMAND_EXIT_WAIT_S)
