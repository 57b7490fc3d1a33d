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


QapiType = str | Enum | Array | Object | Alternate


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
    elif not isinstance(qtype, (Enum, Array, Object, Alternate)):
        raise TypeError(f"not a QAPI type: {qtype!r}")


STR_OR_NULL: Final = Alternate("StrOrNull", ("str", "null"))
