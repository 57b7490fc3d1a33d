"""Source side: open the outgoing migration stream for an address.

Error texts are QEMU's (``inet_connect_saddr``, ``unix_connect_saddr``,
``qio_channel_file_new_path``, ``file_start_outgoing_migration``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from livemig.transport.channel import (
    Channel,
    CommandChannel,
    FdChannel,
    SocketChannel,
    os_error_text,
    tune_socket,
)
from livemig.transport.errors import TransportError
from livemig.transport.uri import (
    Address,
    ExecAddress,
    FdAddress,
    FileAddress,
    InetAddress,
    UnixAddress,
)

# sizeof(struct sockaddr_un.sun_path) on Linux (bytes).
UNIX_PATH_MAX = 108


def fd_unresolved(addr: FdAddress) -> TransportError:
    """An ``fd:NAME`` that reached the transport without its descriptor."""
    return TransportError(f"File descriptor named '{addr.name}' has not been found",
                          errno.EBADF)


def open_fd(fd: int, name: str) -> Channel:
    """A channel on descriptor ``fd`` (owned from now on): QEMU's ``qio_channel_new_fd``.

    A socket is a :class:`SocketChannel` (blocking, with a return path), a
    pipe, FIFO or file an :class:`FdChannel`.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise TransportError(f"File descriptor '{name}': {exc.strerror}", exc.errno) from exc
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            with contextlib.suppress(OSError):
                tune_socket(sock)
        return SocketChannel(sock)
    return FdChannel(fd, kind="fd", noun="file descriptor")


def open_outgoing(addr: Address, *, connect_timeout_s: float | None = None) -> Channel:
    """Connect/open/spawn the main channel of an outgoing migration.

    ``connect_timeout_s`` bounds a TCP/UNIX connect (None: the OS default).
    The returned channel is blocking, with no I/O timeout.
    """
    match addr:
        case InetAddress():
            return _connect_inet(addr, connect_timeout_s)
        case UnixAddress():
            return _connect_unix(addr, connect_timeout_s)
        case FileAddress():
            return _open_file_outgoing(addr)
        case ExecAddress():
            return CommandChannel.spawn(addr.args, child_reads=True)
        case FdAddress(fd=int() as fd):
            return open_fd(fd, addr.name)
        case FdAddress():
            raise fd_unresolved(addr)
    raise TypeError(f"not a migration address: {addr!r}")


def _connect_inet(addr: InetAddress, timeout_s: float | None) -> SocketChannel:
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(
            f"address resolution failed for {addr.host}:{addr.port}: {exc.strerror}") from exc
    last: OSError | None = None
    for family, type_, proto, _canon, sockaddr in infos:
        try:
            sock = socket.socket(family, type_, proto)
        except OSError as exc:
            last = exc
            continue
        try:
            tune_socket(sock)
            sock.settimeout(timeout_s)
            sock.connect(sockaddr)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return SocketChannel(sock)
    assert last is not None
    code, message = os_error_text(last)
    raise TransportError(f"Failed to connect to '{addr.host}:{addr.port}': {message}", code)


def _connect_unix(addr: UnixAddress, timeout_s: float | None) -> SocketChannel:
    if len(os.fsencode(addr.path)) > UNIX_PATH_MAX:
        raise TransportError(f"UNIX socket path '{addr.path}' is too long", errno.ENAMETOOLONG)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tune_socket(sock)
        sock.settimeout(timeout_s)
        sock.connect(addr.path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        code, message = os_error_text(exc)
        raise TransportError(f"Failed to connect to '{addr.path}': {message}", code) from exc
    return SocketChannel(sock)


def _open_file_outgoing(addr: FileAddress) -> FdChannel:
    """Open (creating, mode 0600) and cut the file at ``offset``; write from there.

    Bytes before ``offset`` are kept. Non-regular files (``/dev/null``, a
    FIFO) are neither truncated nor, at offset 0, seeked.
    """
    try:
        fd = addr.fd if addr.fd is not None else os.open(
            addr.filename, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TransportError(f"Unable to open {addr.filename}: {exc.strerror}",
                             exc.errno) from exc
    # QEMU hands the uint64 offset to the kernel as off_t: past 2^63 it is negative
    # and the kernel says EINVAL (QEMU's text names the unsigned value).
    offset = addr.offset - (1 << 64) if addr.offset >= 1 << 63 else addr.offset
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                os.ftruncate(fd, offset)
            except OSError as exc:
                raise TransportError(
                    f"failed to truncate migration file to offset {addr.offset:x}: "
                    f"{exc.strerror}", exc.errno) from exc
        if addr.offset:
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
