"""QAPI types as plain data: what the one visitor (``livemig.qapi.visitor``) walks.

A type is a built-in name (``"str"``, ``"uint8"``, ``"size"``...) or one of
the frozen dataclasses below, mirroring QAPI's meta-types (enum, array,
object, alternate). Command argument schemas, ``MigrateSetParameters`` and
``MigrationCapability`` are all values of these types, so they can be walked
(validated, listed, or turned into ``query-qmp-schema`` later) without code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

# QAPI built-in types. ``int`` is ``int64``; ``size`` is ``uint64`` on QMP.
SIGNED_RANGES: Final[dict[str, tuple[int, int, str]]] = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
}
UNSIGNED_RANGES: Final[dict[str, tuple[int, str]]] = {
    "uint8": ((1 << 8) - 1, "uint8_t"),
    "uint16": ((1 << 16) - 1, "uint16_t"),
    "uint32": ((1 << 32) - 1, "uint32_t"),
}
BUILTINS: Final = frozenset(
    {"str", "int", "int64", "uint64", "size", "bool", "number", "any", "null"}
    | set(SIGNED_RANGES) | set(UNSIGNED_RANGES)
)


@dataclass(frozen=True)
class Enum:
    """A QAPI enum: a string out of ``members``."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Array:
    """A QAPI list; ``element`` is every element's type (``"any"``: unchecked)."""

    element: QapiType


@dataclass(frozen=True)
class Member:
    """One member of an object; ``optional`` is QAPI's ``'*name'``."""

    name: str
    type: QapiType
    optional: bool = False


@dataclass(frozen=True)
class Object:
    """A QAPI struct (or a command's arguments: ``name`` None).

    ``members`` None means any JSON object, unchecked.
    """

    name: str | None
    members: tuple[Member, ...] | None = ()

    def member(self, name: str) -> Member | None:
        for m in self.members or ():
            if m.name == name:
                return m
        return None

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members or ())


@dataclass(frozen=True)
class Alternate:
    """A QAPI alternate: one of ``choices``, told apart by JSON type (``StrOrNull``)."""

    name: str
    choices: tuple[QapiType, ...]


@dataclass(frozen=True)
class Union:
    """A QAPI flat union: the ``base`` members, then the members of the variant
    that the ``discriminator`` member (an enum of ``base``) names, in the same
    JSON object (a variant may be a union itself: ``MigrationAddress``'s
    ``socket`` is ``SocketAddress``); a value with no variant listed has the
    base members only. Unexpected keys are checked against all of them, as
    QEMU's visitor does."""

    name: str
    base: Object
    discriminator: str
    variants: tuple[tuple[str, Object | Union], ...]

    def variant(self, tag: str) -> Object | Union | None:
        for name, obj in self.variants:
            if name == tag:
                return obj
        return None


QapiType = str | Enum | Array | Object | Alternate | Union


def members(spec: Mapping[str, QapiType]) -> tuple[Member, ...]:
    """Members from a QAPI-style map: ``{"uri": "str", "*detach": "bool"}``."""
    out: list[Member] = []
    for key, qtype in spec.items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if not name:
            raise ValueError("empty member name")
        if any(m.name == name for m in out):
            raise ValueError(f"member {name!r} declared twice")
        check_type(qtype)
        out.append(Member(name, qtype, optional))
    return tuple(out)


def struct(name: str | None, spec: Mapping[str, QapiType]) -> Object:
    """An :class:`Object` from a QAPI-style member map."""
    return Object(name, members(spec))


def check_type(qtype: object) -> None:
    """Refuse a malformed schema early (at registration, not at the first call)."""
    if isinstance(qtype, str):
        if qtype not in BUILTINS:
            raise ValueError(f"unknown QAPI type {qtype!r}")
    elif not isinstance(qtype, (Enum, Array, Object, Alternate, Union)):
        raise TypeError(f"not a QAPI type: {qtype!r}")


STR_OR_NULL: Final = Alternate("StrOrNull", ("str", "null"))


# -- MigrationChannel (qapi/migration.json, qapi/sockets.json; QEMU 10.0) -----------
INET_SOCKET_ADDRESS: Final = struct("InetSocketAddress", {
    "host": "str", "port": "str", "*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
    "*ipv6": "bool", "*keep-alive": "bool", "*keep-alive-count": "uint32",
    "*keep-alive-idle": "uint32", "*keep-alive-interval": "uint32", "*mptcp": "bool"})
UNIX_SOCKET_ADDRESS: Final = struct("UnixSocketAddress", {
    "path": "str", "*abstract": "bool", "*tight": "bool"})
VSOCK_SOCKET_ADDRESS: Final = struct("VsockSocketAddress", {"cid": "str", "port": "str"})
STRING: Final = struct("String", {"str": "str"})
SOCKET_ADDRESS_TYPE: Final = Enum("SocketAddressType", ("inet", "unix", "vsock", "fd"))
SOCKET_ADDRESS: Final = Union(
    "SocketAddress", struct(None, {"type": SOCKET_ADDRESS_TYPE}), "type",
    (("inet", INET_SOCKET_ADDRESS), ("unix", UNIX_SOCKET_ADDRESS),
     ("vsock", VSOCK_SOCKET_ADDRESS), ("fd", STRING)))
MIGRATION_ADDRESS_TYPE: Final = Enum("MigrationAddressType",
                                     ("socket", "exec", "rdma", "file"))
MIGRATION_EXEC_COMMAND: Final = struct("MigrationExecCommand", {"args": Array("str")})
FILE_MIGRATION_ARGS: Final = struct("FileMigrationArgs", {"filename": "str",
                                                          "offset": "uint64"})
MIGRATION_ADDRESS: Final = Union(
    "MigrationAddress", struct(None, {"transport": MIGRATION_ADDRESS_TYPE}), "transport",
    (("socket", SOCKET_ADDRESS), ("exec", MIGRATION_EXEC_COMMAND),
     ("rdma", INET_SOCKET_ADDRESS), ("file", FILE_MIGRATION_ARGS)))
MIGRATION_CHANNEL_TYPE: Final = Enum("MigrationChannelType", ("main", "cpr"))
MIGRATION_CHANNEL: Final = struct("MigrationChannel", {
    "channel-type": MIGRATION_CHANNEL_TYPE, "addr": MIGRATION_ADDRESS})
MIGRATION_CHANNEL_LIST: Final = Array(MIGRATION_CHANNEL)
