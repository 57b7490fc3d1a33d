"""Character devices as QEMU spells them: ``-chardev``, and the compat forms of
``-qmp``/``-serial`` (``unix:PATH,...``, ``tcp:HOST:PORT,...``, ``null``, ``file:PATH``).

Parsing is pure: :func:`parse_chardev` (``-chardev BACKEND,id=ID,...``) and
:func:`parse_compat` (QEMU's ``qemu_chr_parse_compat``: the ``-qmp`` and
``-serial`` shorthand) return a :class:`ChardevSpec` or raise
:class:`ChardevError` with QEMU 10.0.2's text (without the ``-opt SPEC:``
prefix, which the caller adds as QEMU's error location does).

Opening is :func:`open_socket`, the one place a socket chardev's descriptor is
made: bind and listen (``server=on``), connect out (``server=off``, QEMU's
default: client mode), or adopt an inherited descriptor (``fd=N``: listening
or connected, told apart by ``SO_ACCEPTCONN``). The QMP server
(asyncio) and the serial port (threads) both take their socket from it.

The options are QemuOpts, split by the one shared parser
(``livemig.qapi.opts``: ``,`` separates, ``,,`` is a literal comma,
``foo``/``nofoo`` mean ``foo=on``/``foo=off``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Final

from livemig.qapi.errors import INVALID_PARAMETER, QapiError
from livemig.qapi.opts import Opts, parse_opts

_UNIX_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_LISTEN_BACKLOG: Final = 16

# Backends QEMU 10.0.2 (x86_64) knows; livemig implements the first three.
SUPPORTED_BACKENDS: Final = ("socket", "null", "file")
QEMU_BACKENDS: Final = frozenset({
    "socket", "null", "file", "udp", "msmouse", "hub", "vc", "ringbuf", "memory", "pipe",
    "pty", "stdio", "serial", "tty", "parallel", "parport", "spicevmc", "spiceport",
    "qemu-vdagent", "dbus", "wctablet", "braille", "testdev", "mux"})
# A socket chardev's QemuOpts (qemu_chardev_opts) livemig implements...
_SOCKET_KEYS: Final = frozenset({"id", "backend", "path", "host", "port", "fd", "server",
                                 "wait", "nodelay", "delay", "ipv4", "ipv6", "to"})
# ... and those it knows but does not implement (refused with a clear text).
_SOCKET_UNSUPPORTED: Final = frozenset({"telnet", "tn3270", "websocket", "reconnect",
                                        "reconnect-ms", "tls-creds", "tls-authz",
                                        "abstract", "tight", "logfile", "logappend", "mux"})
_COMMON_KEYS: Final = frozenset({"id", "backend", "logfile", "logappend", "mux"})


class ChardevError(ValueError):
    """One of QEMU's chardev texts, without the ``-opt SPEC:`` location."""


@dataclass(frozen=True)
class ChardevSpec:
    """One character device. ``backend``: ``socket``, ``null`` or ``file``.

    Socket: ``kind`` is ``unix`` (``path``), ``tcp`` (``host``, ``port``) or
    ``fd`` (``fd``). ``server``: listen (else connect out, QEMU's default);
    ``wait``: a server waits for its first client before the VM goes on
    (QEMU's default for ``server=on``). File: ``path``.
    """

    id: str
    backend: str
    spec: str = ""               # the text as given, for messages
    option: str = "-chardev"     # the option it came from: -chardev, -qmp or -serial
    kind: str = ""               # socket: "unix" | "tcp" | "fd"
    path: str | None = None
    host: str = ""
    port: int = 0
    fd: int | None = None
    server: bool = False
    wait: bool = True
    nodelay: bool = False
    family: int = socket.AF_UNSPEC

    @property
    def location(self) -> str:
        """QEMU's error location: ``-chardev socket,id=m,path=P``, ``-serial unix:P``..."""
        return f"{self.option} {self.spec}"

    def describe(self) -> str:
        """QEMU's ``disconnected:`` filename of a socket chardev (``unix:P,server=on``)."""
        if self.kind == "unix":
            where = f"unix:{self.path}"
        elif self.kind == "tcp":
            where = f"tcp:{self.host}:{self.port}"
        else:
            where = f"fd:{self.fd}"
        return where + (",server=on" if self.server else "")


# The historical name: the QMP server's listen spec is a socket chardev.
ListenSpec = ChardevSpec


def _bool(opts: Opts, name: str, default: bool) -> bool:
    try:
        return opts.get_bool(name, default)
    except QapiError as exc:
        raise ChardevError(exc.desc) from None


def parse_chardev(text: str) -> ChardevSpec:
    """``-chardev BACKEND,id=ID,...`` (QemuOpts, ``backend`` the implied key)."""
    opts = Opts.parse(text, "backend")
    backend = opts.get("backend") or ""
    chr_id = opts.get("id")
    if not chr_id:
        raise ChardevError("chardev: no id specified")
    return _from_opts(opts, backend, chr_id, text, driver_name=True)


def parse_compat(text: str, label: str) -> ChardevSpec:
    """QEMU's ``qemu_chr_parse_compat``: ``-qmp``/``-serial``'s shorthand, named ``label``.

    ``null``, ``none`` (no device: backend ``none``), ``file:PATH`` (verbatim),
    ``unix:PATH[,opts]`` (QemuOpts, path implied), ``tcp:[HOST]:PORT[,opts]``.
    """
    if text == "null":
        return ChardevSpec(label, "null", text)
    if text == "none":
        return ChardevSpec(label, "none", text)
    if text.startswith("file:"):
        return _from_opts(Opts([("path", text[5:])]), "file", label, text, driver_name=False)
    if text.startswith("unix:"):
        opts = Opts.parse(text[5:], "path")
        return _from_opts(opts, "socket", label, text, driver_name=False)
    if text.startswith("tcp:"):
        address, _, rest = text[4:].partition(",")
        if address.startswith("["):
            host, sep, port = address[1:].partition("]:")
        else:
            host, sep, port = address.rpartition(":")
        if not sep:  # QEMU: "tcp:HOST" fails its sscanf and says only what -serial adds
            raise ChardevError("")
        opts = Opts([("host", host), ("port", port), *parse_opts(rest)])
        return _from_opts(opts, "socket", label, text, driver_name=False)
    name = text.split(":", 1)[0].split(",", 1)[0]
    if name in QEMU_BACKENDS or text.startswith(("mon:", "udp:", "telnet:", "websocket:",
                                                 "vc:", "pipe:", "COM", "/dev/")):
        raise ChardevError(_unsupported_backend(name))
    raise ChardevError(f"'{name}' is not a valid char driver")


def parse_qmp_spec(spec: str) -> ChardevSpec:
    """``-qmp SPEC``: the compat shorthand for ``-chardev socket,...`` + ``-mon mode=control``.

    Raises ValueError (ChardevError) with ``-qmp SPEC:`` in front, as QEMU.
    """
    try:
        chardev = dataclasses.replace(parse_compat(spec, "compat_monitor0"), option="-qmp")
    except ChardevError as exc:
        raise ChardevError(f"-qmp {spec}: {exc or 'invalid chardev'}") from None
    if chardev.backend != "socket":
        raise ChardevError(f"-qmp {spec}: livemig's QMP monitor needs a socket "
                           "(unix:PATH,... or tcp:HOST:PORT,...)")
    return chardev


def _unsupported_backend(name: str) -> str:
    return (f"chardev backend '{name}' is not supported by livemig "
            f"(it has {', '.join(SUPPORTED_BACKENDS)})")


def _from_opts(opts: Opts, backend: str, chr_id: str, text: str, *,
               driver_name: bool) -> ChardevSpec:
    if backend == "null":
        _check(opts, _COMMON_KEYS, set())
        return ChardevSpec(chr_id, "null", text)
    if backend == "file":
        _check(opts, _COMMON_KEYS | {"path", "append", "input-path"}, {"append", "input-path"})
        path = opts.get("path")
        if path is None:
            raise ChardevError("chardev: file: no filename given")
        return ChardevSpec(chr_id, "file", text, path=path)
    if backend != "socket":
        if backend in QEMU_BACKENDS:
            raise ChardevError(_unsupported_backend(backend))
        suffix = " name" if driver_name else ""
        raise ChardevError(f"'{backend}' is not a valid char driver{suffix}")
    _check(opts, _SOCKET_KEYS | _SOCKET_UNSUPPORTED, _SOCKET_UNSUPPORTED)
    path, host, fd = opts.get("path"), opts.get("host"), opts.get("fd")
    if sum(v is not None for v in (path, host, fd)) > 1:
        raise ChardevError("None or one of 'path', 'fd' or 'host' option required.")
    server = _bool(opts, "server", False)
    wait_given = "wait" in opts
    wait = _bool(opts, "wait", True)
    nodelay = _bool(opts, "nodelay", False) or not _bool(opts, "delay", True)
    if not server and wait_given:
        raise ChardevError("'wait' option is incompatible with socket in client connect mode")
    common: dict[str, Any] = {"server": server, "wait": wait and server, "nodelay": nodelay}
    if path is not None:
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ChardevError(f"UNIX socket path '{path}' is too long")
        return ChardevSpec(chr_id, "socket", text, kind="unix", path=path, **common)
    if host is not None:
        port = opts.get("port")
        if port is None:
            raise ChardevError("chardev: socket: no port given")
        if not port.isdigit() or int(port) > 65535:
            raise ChardevError(f"address resolution failed for {host}:{port}: "
                               "Servname not supported for ai_socktype")
        family = socket.AF_UNSPEC
        ipv4, ipv6 = _bool(opts, "ipv4", False), _bool(opts, "ipv6", False)
        if ipv4 and not ipv6:
            family = socket.AF_INET
        elif ipv6 and not ipv4:
            family = socket.AF_INET6
        return ChardevSpec(chr_id, "socket", text, kind="tcp", host=host, port=int(port),
                           family=family, **common)
    fd_text = fd or ""
    if not fd_text.isdigit():
        raise ChardevError(f"Unable to parse FD number {fd_text}")
    return ChardevSpec(chr_id, "socket", text, kind="fd", fd=int(fd_text), **common)


def _check(opts: Opts, known: frozenset[str] | set[str], unsupported: frozenset[str] | set[str]
           ) -> None:
    for key, _ in opts:
        if key not in known:
            raise ChardevError(INVALID_PARAMETER % key)
        if key in unsupported:
            raise ChardevError(f"option '{key}' is not supported by livemig")


# -- opening (I/O) ----------------------------------------------------------------------


@dataclass
class OpenedSocket:
    """A socket chardev's descriptor, ready: ``listening`` (accept clients) or connected."""

    sock: socket.socket
    listening: bool
    path: str | None = None      # a UNIX socket file we created (unlinked on close)
    inode: int | None = None
    port: int | None = None      # the TCP port bound (the real one for port=0)


def open_socket(spec: ChardevSpec) -> OpenedSocket:
    """Bind+listen, connect, or adopt ``fd=N``; ChardevError with QEMU's text.

    Blocking; the socket is returned non-blocking for a listener, blocking
    when connected (the caller decides).
    """
    assert spec.backend == "socket"
    if spec.kind == "fd":
        return _adopt_fd(spec)
    if spec.server:
        if spec.kind == "unix":
            assert spec.path is not None
            sock = bind_unix(spec.path)
            return OpenedSocket(sock, True, path=spec.path, inode=os.stat(spec.path).st_ino)
        sock = bind_tcp(spec)
        return OpenedSocket(sock, True, port=sock.getsockname()[1])
    return OpenedSocket(_connect(spec), False)


def _adopt_fd(spec: ChardevSpec) -> OpenedSocket:
    assert spec.fd is not None
    try:
        sock = socket.socket(fileno=spec.fd)
    except OSError:
        raise ChardevError(f"File descriptor '{spec.fd}' is not a socket") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ChardevError(f"File descriptor '{spec.fd}' is not a stream socket")
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except BaseException:
        sock.detach()
        raise
    if listening:
        sock.setblocking(False)
    return OpenedSocket(sock, listening)


def _connect(spec: ChardevSpec) -> socket.socket:
    if spec.kind == "unix":
        assert spec.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(spec.path)
        except OSError as exc:
            sock.close()
            raise ChardevError(f"Failed to connect to '{spec.path}': {exc.strerror}") from None
        return sock
    where = f"{spec.host}:{spec.port}"
    try:
        infos = socket.getaddrinfo(spec.host or None, spec.port, spec.family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ChardevError(f"address resolution failed for {where}: {exc.strerror}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:  # the first that connects, like QEMU
        sock = socket.socket(family, kind, proto)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        if spec.nodelay:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise ChardevError(f"Failed to connect to '{where}': "
                       f"{last.strerror if last else 'no address'}")


def bind_unix(path: str) -> socket.socket:
    """Listen on a UNIX socket file (mode 0600 before anyone can connect)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            # QEMU unlinks whatever is there; livemig never deletes a non-socket.
            raise ChardevError(f"Failed to bind socket to {path}: file exists and is not a socket")
        os.unlink(path)  # stale socket from an earlier run, as QEMU does
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then a connect() is refused, so nobody
        # but the owner ever gets in.
        os.chmod(path, 0o600)
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ChardevError(f"Failed to bind socket to {path}: {exc.strerror}") from None
    return sock


def bind_tcp(spec: ChardevSpec) -> socket.socket:
    where = f"{spec.host}:{spec.port}"
    try:
        infos = socket.getaddrinfo(spec.host or None, spec.port, spec.family,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ChardevError(f"address resolution failed for {where}: {exc.strerror}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:  # first that binds, like QEMU
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise ChardevError(f"Failed to bind socket: {last.strerror if last else 'no address'}")


def unlink_socket(path: str | None, inode: int | None) -> None:
    """Remove our socket file, unless someone else's has replaced it."""
    if path is None:
        return
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
