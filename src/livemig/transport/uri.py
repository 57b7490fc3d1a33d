"""Migration addresses: QEMU's URI forms and the QMP ``channels`` form.

``migrate``/``migrate-incoming`` name their peer either with a URI string
(``tcp:HOST:PORT``, ``unix:PATH``, ``file:PATH[,offset=N]``, ``exec:CMDLINE``,
``fd:NAME``) or with a list of QAPI ``MigrationChannel`` objects. Both end up
here as one typed, immutable address. Parsing follows QEMU 10.0
(``migrate_uri_parse``, ``socket_parse``, ``inet_parse``,
``file_parse_offset``, ``migrate_channels_parse``), error texts included.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from livemig.qapi.errors import (
    INCOMING_ONE_CHANNEL,
    MULTIFD_NEEDS_SOCKET,
    NEED_URI_OR_CHANNELS,
    QapiError,
)
from livemig.qapi.schema import MIGRATION_CHANNEL_LIST
from livemig.qapi.string_input import qemu_strtosz
from livemig.qapi.visitor import visit
from livemig.transport.errors import TransportError

# exec: URIs run their command line through the shell, as QEMU does on POSIX.
EXEC_SHELL = ("/bin/sh", "-c")

# QERR_INVALID_PARAMETER_VALUE as QEMU reports a transport it cannot serve.
UNSUPPORTED_PROTOCOL = "Parameter 'uri' expects a valid migration protocol"


@dataclass(frozen=True)
class InetAddress:
    """``tcp:HOST:PORT``; ``port`` is a string as in QAPI (a number or a service name).

    An ``int`` port is accepted and stored as its decimal string. ``host`` is
    empty for ``tcp::PORT`` (listen on every address).
    """

    host: str
    port: str

    def __post_init__(self) -> None:
        if isinstance(self.port, int) and not isinstance(self.port, bool):
            object.__setattr__(self, "port", str(self.port))


@dataclass(frozen=True)
class UnixAddress:
    """``unix:PATH``: a UNIX-domain stream socket."""

    path: str


@dataclass(frozen=True)
class FileAddress:
    """``file:PATH[,offset=N]``: the stream starts ``offset`` bytes into the file.

    ``fd``: the file already open (``/dev/fdset/N``: the commands layer
    duplicated a member of the set); opening uses it instead of ``filename``
    and owns it from then on.
    """

    filename: str
    offset: int = 0
    fd: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ExecAddress:
    """A command whose stdin (source) or stdout (destination) is the stream.

    ``args`` is an argv; ``exec:CMDLINE`` becomes ``["/bin/sh", "-c", CMDLINE]``.
    """

    args: list[str] = field(hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", list(self.args))


@dataclass(frozen=True)
class FdAddress:
    """``fd:NAME``: a monitor file descriptor.

    Parsing gives the name only; the commands layer resolves it (``getfd``'s
    table, QEMU's ``monitor_get_fd``) into ``fd``, which opening takes over:
    a socket becomes a socket channel (with a return path), a pipe or file
    an fd channel.
    """

    name: str
    fd: int | None = field(default=None, compare=False, repr=False)


Address = InetAddress | UnixAddress | FileAddress | ExecAddress | FdAddress


FDSET_PREFIX = "/dev/fdset/"


def is_fdset_path(filename: str) -> bool:
    """``/dev/fdset/N``: a descriptor set of the monitor, not a file (``qemu_open``)."""
    return filename.startswith(FDSET_PREFIX)


# --------------------------------------------------------------------------- URIs

def parse_uri(uri: str) -> Address:
    """Parse a ``migrate``/``migrate-incoming`` URI (QEMU's ``migrate_uri_parse``)."""
    if uri.startswith("exec:"):
        return ExecAddress([*EXEC_SHELL, uri[len("exec:"):]])
    if uri.startswith("rdma:"):
        _parse_inet(uri[len("rdma:"):])
        raise TransportError(UNSUPPORTED_PROTOCOL)
    if uri.startswith("tcp:"):
        return _parse_inet(uri[len("tcp:"):])
    if uri.startswith("unix:"):
        if not uri[len("unix:"):]:
            raise TransportError("invalid Unix socket address")
        return UnixAddress(uri[len("unix:"):])
    if uri.startswith("fd:"):
        if not uri[len("fd:"):]:
            raise TransportError("invalid file descriptor address")
        return FdAddress(uri[len("fd:"):])
    if uri.startswith("vsock:"):
        raise TransportError(UNSUPPORTED_PROTOCOL)
    if uri.startswith("file:"):
        return _parse_file(uri[len("file:"):])
    raise TransportError(f"unknown migration protocol: {uri}")


_INET_NO_HOST = re.compile(r":([^,]{1,32})")
_INET_V6 = re.compile(r"\[([^\]]{1,64})\]:([^,]{1,32})")
_INET_HOST = re.compile(r"([^:]{1,64}):([^,]{1,32})")
_INET_TO = re.compile(r"[+-]?\d+")


def _parse_inet(text: str) -> InetAddress:
    """QEMU's ``inet_parse``: ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``, then ``,opts``.

    Options (``to=``, ``ipv4``, ``ipv6``, ``keep-alive``, ``mptcp``) are
    accepted; only ``to=`` is checked, and none is kept.
    """
    if text.startswith(":"):
        m = _INET_NO_HOST.match(text)
        if not m:
            raise TransportError(f"error parsing port in address '{text}'")
        host, port = "", m.group(1)
    elif text.startswith("["):
        m = _INET_V6.match(text)
        if not m:
            raise TransportError(f"error parsing IPv6 address '{text}'")
        host, port = m.group(1), m.group(2)
    else:
        m = _INET_HOST.match(text)
        if not m:
            raise TransportError(f"error parsing address '{text}'")
        host, port = m.group(1), m.group(2)
    options = text[m.end():]
    to_at = options.find(",to=")
    if to_at >= 0:
        value = options[to_at + len(",to="):]
        n = _INET_TO.match(value)
        if not n or (n.end() < len(value) and value[n.end()] != ","):
            raise TransportError("error parsing to= argument")
    return InetAddress(host, port)


def _parse_file(spec: str) -> FileAddress:
    """``PATH[,offset=N]``; N is a QEMU size (``4096``, ``1M``, ``0x1000``)."""
    at = spec.find(",offset=")
    if at < 0:
        return FileAddress(spec, 0)
    option = spec[at + len(",offset="):]
    try:
        offset = parse_size(option)
    except TransportError as exc:
        raise TransportError(
            f"file URI has bad offset {option}: {os.strerror(exc.errno or _errno.EINVAL)}",
            exc.errno,
        ) from None
    return FileAddress(spec[:at], offset)


def parse_size(text: str) -> int:
    """QEMU's ``qemu_strtosz`` (``livemig.qapi.string_input``), failing with TransportError.

    ``errno`` is EINVAL (malformed) or ERANGE (negative, or > 2**64-1).
    """
    try:
        return qemu_strtosz(text)
    except QapiError as exc:
        raise TransportError(exc.desc, exc.errno) from None


def format_uri(addr: Address) -> str:
    """The URI that ``parse_uri`` turns back into ``addr``.

    An ``ExecAddress`` not of the ``/bin/sh -c CMD`` shape is shell-quoted,
    so it parses back to the equivalent ``/bin/sh -c`` form.
    """
    match addr:
        case InetAddress(host=host, port=port):
            return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        case UnixAddress(path=path):
            return f"unix:{path}"
        case FileAddress(filename=filename, offset=offset):
            return f"file:{filename},offset={offset}" if offset else f"file:{filename}"
        case ExecAddress(args=args):
            if len(args) == 3 and tuple(args[:2]) == EXEC_SHELL:
                return f"exec:{args[2]}"
            return "exec:" + shlex.join(args)
        case FdAddress(name=name):
            return f"fd:{name}"
    raise TypeError(f"not a migration address: {addr!r}")


# ------------------------------------------------------------------ QMP channels

def address_to_channel(addr: Address, channel_type: str = "main") -> dict[str, Any]:
    """The QAPI ``MigrationChannel`` dict for ``addr`` (for driving QEMU over QMP)."""
    match addr:
        case InetAddress(host=host, port=port):
            mig: dict[str, Any] = {"transport": "socket", "type": "inet",
                                   "host": host, "port": port}
        case UnixAddress(path=path):
            mig = {"transport": "socket", "type": "unix", "path": path}
        case FdAddress(name=name):
            mig = {"transport": "socket", "type": "fd", "str": name}
        case ExecAddress(args=args):
            mig = {"transport": "exec", "args": list(args)}
        case FileAddress(filename=filename, offset=offset):
            mig = {"transport": "file", "filename": filename, "offset": offset}
        case _:
            raise TypeError(f"not a migration address: {addr!r}")
    return {"channel-type": channel_type, "addr": mig}


def _migration_address(addr: dict[str, Any]) -> Address | None:
    """One visited ``MigrationAddress``; None for a transport livemig cannot serve."""
    transport = addr["transport"]
    if transport == "socket":
        kind = addr["type"]
        if kind == "inet":
            return InetAddress(addr["host"], addr["port"])
        if kind == "unix":
            return UnixAddress(addr["path"])
        if kind == "fd":
            return FdAddress(addr["str"])
        return None                                     # vsock
    if transport == "exec":
        return ExecAddress(addr["args"])
    if transport == "file":
        return FileAddress(addr["filename"], addr["offset"])
    return None                                         # rdma


def address_from_channels(channels: Any, *, incoming: bool = False,
                          argument: str = "channels") -> Address:
    """The ``main`` address of a QMP ``channels`` list (``migrate_channels_parse``).

    The list is visited against QEMU's ``MigrationChannel`` schema by the one
    QAPI visitor (QEMU's texts). ``incoming=True`` applies
    ``migrate-incoming``'s rule: exactly one entry. A ``cpr`` entry is
    accepted (and ignored) by ``migrate``.
    """
    try:
        visited = visit(MIGRATION_CHANNEL_LIST, channels, argument)
    except QapiError as exc:
        raise TransportError(exc.desc) from None
    if incoming and len(visited) > 1:
        raise TransportError(INCOMING_ONE_CHANNEL)
    by_type: dict[str, Address | None] = {}
    for channel in visited:
        ctype = channel["channel-type"]
        if ctype in by_type:
            raise TransportError(f"Channel list has more than one {ctype} entry")
        by_type[ctype] = _migration_address(channel["addr"])
    if "main" not in by_type:
        raise TransportError("Channel list has no main entry")
    main = by_type["main"]
    if main is None:
        raise TransportError(UNSUPPORTED_PROTOCOL)
    return main


def resolve_migrate_args(uri: str | None, channels: list[Any] | None, *,
                         incoming: bool = False, multifd: bool = False) -> Address:
    """The address of a ``migrate`` (or, with ``incoming``, ``migrate-incoming``) call.

    One resolution for both commands (``qmp_migrate`` and
    ``qemu_start_incoming_migration``): exactly one of ``uri`` and
    ``channels`` must be given; an empty ``channels`` list counts as absent
    (QMP's empty list is a NULL list), an empty ``uri`` does not. With
    ``multifd`` (the capability), the address must be a socket
    (``migration_transport_compatible``).
    """
    if channels is not None and isinstance(channels, list) and not channels:
        channels = None
    if (uri is None) == (channels is None):
        raise TransportError(NEED_URI_OR_CHANNELS)
    if channels is not None:
        address = address_from_channels(channels, incoming=incoming)
    elif not isinstance(uri, str):
        raise TransportError("Invalid parameter type for 'uri', expected: string")
    else:
        address = parse_uri(uri)
    if multifd and not isinstance(address, (InetAddress, UnixAddress)):
        raise TransportError(MULTIFD_NEEDS_SOCKET)
    return address
