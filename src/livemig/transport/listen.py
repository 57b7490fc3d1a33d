"""Destination side: listen for (or open) the incoming migration stream.

``listen(addr)`` does everything that can fail at once, so that
``migrate-incoming`` reports errors synchronously as QEMU does: sockets are
bound and listening, a ``file:`` is opened and positioned, an ``exec:``
command is started. ``accept()`` then hands out the main channel. Error
texts are QEMU's (``inet_listen_saddr``, ``unix_listen_saddr``,
``file_start_incoming_migration``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import threading
import time
from typing import Any, Self

from livemig.transport.channel import (
    Channel,
    CommandChannel,
    FdChannel,
    SocketChannel,
    os_error_text,
    tune_socket,
)
from livemig.transport.connect import UNIX_PATH_MAX, fd_unresolved, open_fd
from livemig.transport.errors import TransportError
from livemig.transport.uri import (
    Address,
    ExecAddress,
    FdAddress,
    FileAddress,
    InetAddress,
    UnixAddress,
)

# listen() backlog: one main channel, plus room for multifd channels later.
LISTEN_BACKLOG = 16


def _closed_error() -> TransportError:
    return TransportError("The incoming migration listener was closed", errno.ECANCELED)


def _timeout_error() -> TransportError:
    return TransportError("Timed out waiting for an incoming migration connection",
                          errno.ETIMEDOUT)


class Listener:
    """The destination end before the stream exists. Use ``listen()`` to make one.

    ``accept()`` blocks until the stream is there; ``close()`` from another
    thread makes a blocked ``accept()`` raise ``TransportError`` (errno
    ECANCELED). ``close()`` is idempotent.
    """

    def __init__(self, address: Address) -> None:
        self.address = address
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def socket_address(self) -> list[dict[str, Any]]:
        """``query-migrate``'s ``socket-address``: what is listened on (empty if no socket)."""
        return []

    def accept(self, timeout: float | None = None) -> Channel:
        """The incoming main channel; ``timeout`` in seconds (None: wait forever)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketListener(Listener):
    """Listening sockets (one per resolved address for TCP, one for UNIX).

    Accepting polls the sockets together with a wake-up pipe, so ``close()``
    interrupts it; the sockets themselves are closed by whichever of
    ``close()`` and the last running ``accept()`` finishes later, so no
    thread ever polls a descriptor number that was closed (and reused).
    """

    def __init__(self, address: Address, socks: list[socket.socket],
                 unix_path: str | None = None) -> None:
        super().__init__(address)
        self._socks = socks
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._accepting = 0
        self._released = False
        self._unix_path = unix_path
        self._unix_id: tuple[int, int] | None = None
        if unix_path is not None:
            st = os.stat(unix_path)
            self._unix_id = (st.st_dev, st.st_ino)
        # Computed once: the sockets may be gone by the time QMP asks again.
        self._socket_address = [self._describe(s) for s in socks]

    def _describe(self, sock: socket.socket) -> dict[str, Any]:
        if sock.family == socket.AF_UNIX:
            return {"type": "unix", "path": self._unix_path}
        host, port = sock.getsockname()[:2]
        flag = "ipv4" if sock.family == socket.AF_INET else "ipv6"
        return {"type": "inet", "host": host, "port": str(port), flag: True}

    def socket_address(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._socket_address]

    def accept(self, timeout: float | None = None) -> SocketChannel:
        with self._lock:
            if self._closed:
                raise _closed_error()
            self._accepting += 1
        try:
            return self._accept(timeout)
        finally:
            with self._lock:
                self._accepting -= 1
                release = self._closed and self._accepting == 0
            if release:
                self._release()

    def _accept(self, timeout: float | None) -> SocketChannel:
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self._socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            if deadline is None:
                ms = None
            else:
                ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = poller.poll(ms)
            if self._closed:
                raise _closed_error()
            if not ready:
                raise _timeout_error()
            for fd, _events in ready:
                sock = by_fd.get(fd)
                if sock is None:
                    continue
                try:
                    conn, _peer = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    code, message = os_error_text(exc)
                    raise TransportError(f"Failed to accept connection: {message}",
                                         code) from exc
                conn.setblocking(True)
                tune_socket(conn)
                return SocketChannel(conn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            release = self._accepting == 0
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        self._unlink()
        if release:
            self._release()

    def _unlink(self) -> None:
        """Remove the UNIX socket file, if it is still the one this listener created."""
        if self._unix_path is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self._unix_path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._unix_id:
                os.unlink(self._unix_path)

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        for sock in self._socks:
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _OneShotListener(Listener):
    """``file:`` and ``exec:``: the stream exists from ``listen()`` on; accept hands it out once."""

    def __init__(self, address: Address, channel: Channel) -> None:
        super().__init__(address)
        self._channel: Channel | None = channel

    def accept(self, timeout: float | None = None) -> Channel:
        with self._lock:
            if self._closed:
                raise _closed_error()
            channel, self._channel = self._channel, None
        if channel is None:
            raise TransportError("The incoming migration stream was already accepted",
                                 errno.EALREADY)
        return channel

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


def listen(addr: Address) -> Listener:
    """Start listening for (or open) the incoming migration stream at ``addr``."""
    match addr:
        case InetAddress():
            return SocketListener(addr, _listen_inet(addr))
        case UnixAddress():
            return SocketListener(addr, [_listen_unix(addr)], unix_path=addr.path)
        case FileAddress():
            return _OneShotListener(addr, _open_file_incoming(addr))
        case ExecAddress():
            return _OneShotListener(addr, CommandChannel.spawn(addr.args, child_reads=False))
        case FdAddress(fd=int() as fd):
            # QEMU's fd_start_incoming_migration: the stream is the descriptor
            # itself (a connected socket, a pipe, a file), nothing is accepted.
            return _OneShotListener(addr, open_fd(fd, addr.name))
        case FdAddress():
            raise fd_unresolved(addr)
    raise TypeError(f"not a migration address: {addr!r}")


def _listen_inet(addr: InetAddress) -> list[socket.socket]:
    """Bind every address ``host`` resolves to (all of them for an empty host).

    Succeeds if at least one address could be listened on, as QEMU's
    ``qio_net_listener_open_sync`` does; otherwise raises the first failure.
    """
    try:
        infos = socket.getaddrinfo(addr.host or None, addr.port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TransportError(
            f"address resolution failed for {addr.host}:{addr.port}: {exc.strerror}") from exc
    seen: set[Any] = set()
    unique = []
    for family, type_, proto, _canon, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            unique.append((family, type_, proto, sockaddr))
    has_ipv4 = any(info[0] == socket.AF_INET for info in unique)
    socks: list[socket.socket] = []
    first_error: TransportError | None = None
    for family, type_, proto, sockaddr in unique:
        try:
            socks.append(_bind_inet(family, type_, proto, sockaddr, v6only=has_ipv4))
        except TransportError as exc:
            first_error = first_error or exc
    if not socks:
        assert first_error is not None
        raise first_error
    return socks


def _bind_inet(family: int, type_: int, proto: int, sockaddr: Any,
               v6only: bool) -> socket.socket:
    try:
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        code, message = os_error_text(exc)
        raise TransportError(f"Failed to create a socket: {message}", code) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        tune_socket(sock)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            code, message = os_error_text(exc)
            what = ("Failed to find an available port" if code == errno.EADDRINUSE
                    else "Failed to bind socket")
            raise TransportError(f"{what}: {message}", code) from exc
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            code, message = os_error_text(exc)
            raise TransportError(f"Failed to listen on socket: {message}", code) from exc
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _listen_unix(addr: UnixAddress) -> socket.socket:
    """Bind a UNIX socket at ``path``, replacing a stale socket file left there.

    QEMU unlinks whatever is at the path; livemig only removes a socket, so
    a regular file in the way is an error (``Address already in use``).
    """
    path = addr.path
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise TransportError(f"UNIX socket path '{path}' is too long", errno.ENAMETOOLONG)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            try:
                os.unlink(path)
            except OSError as exc:
                raise TransportError(f"Failed to unlink socket {path}: {exc.strerror}",
                                     exc.errno) from exc
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        code, message = os_error_text(exc)
        raise TransportError(f"Failed to create Unix socket: {message}", code) from exc
    try:
        tune_socket(sock)
        try:
            sock.bind(path)
        except OSError as exc:
            code, message = os_error_text(exc)
            raise TransportError(f"Failed to bind socket to {path}: {message}", code) from exc
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            code, message = os_error_text(exc)
            raise TransportError(f"Failed to listen on socket: {message}", code) from exc
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _open_file_incoming(addr: FileAddress) -> FdChannel:
    try:
        fd = addr.fd if addr.fd is not None else os.open(
            addr.filename, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"Unable to open {addr.filename}: {exc.strerror}",
                             exc.errno) from exc
    try:
        if addr.offset:
            # off_t, as QEMU: an offset past 2^63 is negative, EINVAL.
            offset = addr.offset - (1 << 64) if addr.offset >= 1 << 63 else addr.offset
            try:
                os.lseek(fd, offset, os.SEEK_SET)
            except OSError as exc:
                raise TransportError(
                    f"Unable to seek to offset {addr.offset} whence {os.SEEK_SET} in file: "
                    f"{exc.strerror}", exc.errno) from exc
        return FdChannel(fd, kind="file")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
