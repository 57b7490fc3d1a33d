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

    def send_iovec(self, iov: np.ndarray) -> None:
        """Write the memory ``iov`` (an ``IOVEC`` array) describes, in order.

        The kernel gathers the bytes from where they lie (guest RAM for page
        data): no copy in user space and no Python object per buffer. The
        caller keeps that memory mapped until this returns. The system call
        runs without the GIL (ctypes), like ``socket.send``.
        """
        self._iovec_all(iov, writing=True)

    def _iovec_all(self, iov: np.ndarray, *, writing: bool) -> int:
        """writev/readv until every buffer of ``iov`` is done (reads: or EOF),
        at most IOV_MAX buffers a call, resuming inside a buffer done in part."""
        if iov.dtype != IOVEC or iov.ndim != 1:
            raise ValueError("send_iovec and recv_iovec take a 1-D IOVEC array")
        ends = np.cumsum(iov["len"])           # stream position after each buffer
        count = iov.size
        total = int(ends[-1]) if count else 0
        i, done, owned = 0, 0, False
        raw = self._writev_raw if writing else self._readv_raw
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

    def recv_iovec(self, iov: np.ndarray) -> int:
        """Fill the memory ``iov`` (an ``IOVEC`` array) describes, in order, from
        the stream; returns the bytes read, short only at EOF (or after shutdown).

        The scattering read of ``send_iovec``: page data go straight to where
        they belong (guest RAM), the system call runs without the GIL.
        """
        return self._iovec_all(iov, writing=False)

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


class SocketChannel(Channel):
    """A connected stream socket (TCP or UNIX). Carries a return path."""

    kind = "socket"
    noun = "socket"
    supports_return_path = True

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def _write(self, view: memoryview) -> int:
        return self.sock.send(view)

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
