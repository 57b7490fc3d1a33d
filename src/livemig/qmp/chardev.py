"""The ``-qmp`` chardev spec: where the QMP server listens, parsed like QEMU.

Pure (no sockets are opened here): :func:`parse_qmp_spec` turns QEMU's
shorthand (``unix:PATH,server=on,wait=off``, ``tcp:HOST:PORT,server=on``)
into a :class:`ListenSpec` that :class:`~livemig.qmp.server.QMPServer`
binds, and refuses what livemig does not support with a ValueError that
names the spec.

The options are QemuOpts, split by the one shared parser
(``livemig.qapi.opts``: ``,`` separates, ``,,`` is a literal comma,
``foo``/``nofoo`` mean ``foo=on``/``foo=off``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Final

from livemig.qapi.opts import parse_opts

_BOOL_TRUE: Final = frozenset({"on", "yes", "true", "y"})
_BOOL_FALSE: Final = frozenset({"off", "no", "false", "n"})
_SOCKET_OPTIONS: Final = frozenset({"server", "wait", "nodelay", "delay", "ipv4", "ipv6"})
_UNIX_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SUPPORTED_FORMS: Final = "unix:PATH,server=on[,wait=off] or tcp:HOST:PORT,server=on[,wait=off]"


@dataclass(frozen=True)
class ListenSpec:
    """A parsed ``-qmp`` argument: where to listen and whether to wait.

    ``wait``: like QEMU's ``wait=on`` (the default for a server socket),
    :meth:`~livemig.qmp.server.QMPServer.start` returns only once a first
    client has connected.
    """

    kind: str  # "unix" or "tcp"
    spec: str
    path: str | None = None
    host: str = ""
    port: int = 0
    wait: bool = True
    nodelay: bool = False
    family: int = socket.AF_UNSPEC


def _parse_bool(spec: str, name: str, value: str) -> bool:
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    raise ValueError(f"-qmp {spec}: Parameter '{name}' expects 'on' or 'off'")


def parse_qmp_spec(spec: str) -> ListenSpec:
    """Parse QEMU's ``-qmp`` chardev shorthand; ValueError names what is wrong.

    Accepted: ``unix:PATH`` and ``tcp:[HOST]:PORT`` (HOST may be ``[v6]``),
    followed by ``server=on`` (or the old ``server``), and optionally
    ``wait=off``/``nowait``, ``nodelay=on``, ``ipv4=on``, ``ipv6=on``.
    """
    if spec.startswith("unix:"):
        kind, rest = "unix", spec[5:]
    elif spec.startswith("tcp:"):
        kind, rest = "tcp", spec[4:]
    else:
        raise ValueError(f"-qmp {spec}: unsupported chardev; livemig supports {_SUPPORTED_FORMS}")
    # As QEMU's qemu_chr_parse_compat: unix: is QemuOpts with the path as its
    # implied key; tcp: is HOST:PORT up to the first comma, then QemuOpts.
    if kind == "unix":
        pairs = parse_opts(rest, implied_key="path")
        address = next((v for k, v in pairs if k == "path"), "")
    else:
        address, _, options = rest.partition(",")
        pairs = parse_opts(options)
    values: dict[str, bool] = {}
    for name, value in pairs:
        if name == "path" and kind == "unix":
            continue
        if name not in _SOCKET_OPTIONS:
            raise ValueError(f"-qmp {spec}: unsupported option '{name}'")
        values[name] = _parse_bool(spec, name, value)
    if not values.get("server", False):
        raise ValueError(f"-qmp {spec}: only listening sockets are supported, add server=on")
    wait = values.get("wait", True)
    nodelay = values.get("nodelay", False) or not values.get("delay", True)
    if kind == "unix":
        if not address:
            raise ValueError(f"-qmp {spec}: missing socket path")
        if len(os.fsencode(address)) > _UNIX_PATH_MAX:
            raise ValueError(f"-qmp {spec}: UNIX socket path is longer than "
                             f"{_UNIX_PATH_MAX} bytes")
        for name in ("ipv4", "ipv6", "nodelay", "delay"):
            if name in values:
                raise ValueError(f"-qmp {spec}: option '{name}' needs a tcp: socket")
        return ListenSpec("unix", spec, path=address, wait=wait)
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"-qmp {spec}: expected tcp:[HOST]:PORT")
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"-qmp {spec}: expected tcp:HOST:PORT")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"-qmp {spec}: port must be a number from 0 to 65535")
    family = socket.AF_UNSPEC
    if values.get("ipv4") and not values.get("ipv6"):
        family = socket.AF_INET
    elif values.get("ipv6") and not values.get("ipv4"):
        family = socket.AF_INET6
    return ListenSpec("tcp", spec, host=host, port=int(port_text), wait=wait,
                      nodelay=nodelay, family=family)
