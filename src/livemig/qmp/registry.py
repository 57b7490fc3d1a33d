"""QMP command registry and QAPI-style argument validation.

Commands are registered by name with a handler and an argument schema;
the server validates ``arguments`` against the schema *before* the
handler runs, reporting the first problem with QEMU's exact text (the
behaviour of QEMU's QObject input visitor, ``qapi/qobject-input-visitor.c``):

* members are checked in schema order: a missing required member gives
  ``Parameter 'uri' is missing``, a wrong JSON type
  ``Invalid parameter type for 'uri', expected: string``;
* after all members of an object, the first left-over key gives
  ``Parameter 'bogus' is unexpected``;
* nested names are spelled like QEMU's ``full_name()``:
  ``capabilities[0].state``.

Argument schemas use QAPI's own spelling, so members can be copied from
``qapi/*.json``: a key starting with ``*`` is optional, a value is a type
name or an :class:`ArgSpec`::

    registry.register("migrate", do_migrate,
                      args={"*uri": "str", "*detach": "bool", "*resume": "bool"})

    @registry.register("migrate-set-capabilities", args={
        "capabilities": ArgSpec("list", items=ArgSpec("dict", members={
            "capability": ArgSpec("str", enum=MIGRATION_CAPABILITIES),
            "state": "bool"}))})
    def set_caps(args): ...

Handlers take the validated ``args`` dict (optional members that were
absent are absent) and return the ``return`` value (None means ``{}``);
they may be ``async def``. A plain function that may block (takes locks
held by the migration thread, does I/O) is registered with
``blocking=True`` and then runs in the loop's default executor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from livemig.qmp import errors
from livemig.qmp.errors import QMPError

Handler = Callable[[dict[str, Any]], Any]

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
UINT64_LIMIT: Final = 1 << 64

# QAPI built-in type name -> C type name used by QEMU's range errors
# (qapi/qapi-visit-core.c visit_type_intN / visit_type_uintN).
_SIGNED_RANGES: Final = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
}
_UNSIGNED_RANGES: Final = {
    "uint8": ((1 << 8) - 1, "uint8_t"),
    "uint16": ((1 << 16) - 1, "uint16_t"),
    "uint32": ((1 << 32) - 1, "uint32_t"),
}
ARG_TYPES: Final = frozenset(
    {"str", "int", "int64", "uint64", "size", "bool", "number", "any", "list", "dict"}
    | set(_SIGNED_RANGES)
    | set(_UNSIGNED_RANGES)
)


@dataclass(frozen=True)
class ArgSpec:
    """One QAPI argument (or nested member).

    ``type``: ``str``, ``int`` (= ``int64``), ``int8/16/32``, ``uint8/16/32``,
    ``uint64``, ``size`` (= ``uint64`` on QMP), ``bool``, ``number``
    (converted to float), ``any``, ``list``, ``dict``.
    ``enum``: allowed values of a ``str`` (a QAPI enum).
    ``members``: schema of a ``dict`` (None: any object, unchecked).
    ``items``: schema of every ``list`` element (None: unchecked).
    """

    type: str
    optional: bool = False
    enum: tuple[str, ...] | None = None
    members: Mapping[str, ArgSpec | str] | None = None
    items: ArgSpec | str | None = None
    # Normalised form of ``members``: name -> ArgSpec, '*' stripped.
    _members: dict[str, ArgSpec] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.type not in ARG_TYPES:
            raise ValueError(f"unknown QAPI argument type {self.type!r}")
        if self.enum is not None:
            if self.type != "str":
                raise ValueError("enum= needs type 'str'")
            object.__setattr__(self, "enum", tuple(self.enum))
        if self.members is not None:
            if self.type != "dict":
                raise ValueError("members= needs type 'dict'")
            object.__setattr__(self, "_members", normalize_args(self.members))
        if self.items is not None:
            if self.type != "list":
                raise ValueError("items= needs type 'list'")
            object.__setattr__(self, "items", _as_spec(self.items, optional=False))


def _as_spec(spec: ArgSpec | str, *, optional: bool) -> ArgSpec:
    if isinstance(spec, str):
        return ArgSpec(spec, optional=optional)
    if not isinstance(spec, ArgSpec):
        raise TypeError(f"argument spec must be a type name or ArgSpec, not {spec!r}")
    if optional and not spec.optional:
        return ArgSpec(spec.type, optional=True, enum=spec.enum,
                       members=spec.members, items=spec.items)
    return spec


def normalize_args(args: Mapping[str, ArgSpec | str]) -> dict[str, ArgSpec]:
    """Turn a QAPI-style member map (``'*name'`` = optional) into name -> ArgSpec."""
    out: dict[str, ArgSpec] = {}
    for key, spec in args.items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if not name:
            raise ValueError("empty argument name")
        if name in out:
            raise ValueError(f"argument {name!r} declared twice")
        out[name] = _as_spec(spec, optional=optional)
    return out


class _Path:
    """Where the visitor is, to spell names like QEMU's ``full_name()``."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def name(self, leaf: str | None = None) -> str:
        text = "".join(self.parts)
        if leaf is not None:
            text = f"{text}.{leaf}" if text else leaf
        return text.lstrip(".") or "<anonymous>"


def _fail(template: str, *values: object) -> QMPError:
    return QMPError(template % values)


def _check_value(spec: ArgSpec, value: Any, path: _Path, leaf: str | None) -> Any:
    """Validate one present value; return it converted like QEMU would see it.

    ``leaf`` is the member name (None for a list element): QEMU's range and
    enum errors use the bare name, or "null" for list elements, while type
    errors use the full path.
    """
    kind = spec.type
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "string")
        if spec.enum is not None and value not in spec.enum:
            raise _fail(errors.INVALID_ENUM_VALUE, leaf if leaf is not None else "null", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "boolean")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "number")
        return float(value)
    if kind in ("int", "int64") or kind in _SIGNED_RANGES:
        if (isinstance(value, bool) or not isinstance(value, int)
                or not INT64_MIN <= value <= INT64_MAX):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "integer")
        if kind in _SIGNED_RANGES:
            low, high, ctype = _SIGNED_RANGES[kind]
            if not low <= value <= high:
                raise _fail(errors.INVALID_PARAMETER_VALUE,
                            leaf if leaf is not None else "null", ctype)
        return value
    if kind in ("uint64", "size") or kind in _UNSIGNED_RANGES:
        # QEMU accepts negative int64 for uint64 "for backward
        # compatibility" and wraps it modulo 2**64.
        if (isinstance(value, bool) or not isinstance(value, int)
                or not INT64_MIN <= value < UINT64_LIMIT):
            raise _fail(errors.INVALID_PARAMETER_VALUE, path.name(leaf), "uint64")
        value %= UINT64_LIMIT
        if kind in _UNSIGNED_RANGES:
            high, ctype = _UNSIGNED_RANGES[kind]
            if value > high:
                raise _fail(errors.INVALID_PARAMETER_VALUE,
                            leaf if leaf is not None else "null", ctype)
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "object")
        if spec._members is None:
            return value
        path.parts.append("." + leaf if leaf is not None else "")
        try:
            return _check_members(spec._members, value, path)
        finally:
            path.parts.pop()
    if kind == "list":
        if not isinstance(value, list):
            raise _fail(errors.INVALID_PARAMETER_TYPE, path.name(leaf), "array")
        item_spec = spec.items
        if item_spec is None:
            return value
        assert isinstance(item_spec, ArgSpec)
        out = []
        base = "." + leaf if leaf is not None else ""
        for index, item in enumerate(value):
            path.parts.append(f"{base}[{index}]")
            try:
                out.append(_check_value(item_spec, item, path, None))
            finally:
                path.parts.pop()
        return out
    raise AssertionError(kind)  # pragma: no cover - ARG_TYPES is closed


def _check_members(members: Mapping[str, ArgSpec], obj: Mapping[str, Any],
                   path: _Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in members.items():
        if name not in obj:
            if not spec.optional:
                raise _fail(errors.MISSING_PARAMETER, path.name(name))
            continue
        out[name] = _check_value(spec, obj[name], path, name)
    for key in obj:
        if key not in members:
            raise _fail(errors.UNEXPECTED_PARAMETER, path.name(key))
    return out


@dataclass(frozen=True)
class Command:
    """A registered QMP command."""

    name: str
    handler: Handler
    args: dict[str, ArgSpec]
    allow_preconfig: bool = False
    blocking: bool = False

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``arguments`` against the schema; raise :class:`QMPError` with
        QEMU's text, or return the converted arguments for the handler."""
        return _check_members(self.args, arguments, _Path())


class CommandRegistry:
    """Name -> :class:`Command`. Filled at start-up, read by the QMP server.

    The protocol commands ``qmp_capabilities``, ``query-version`` and
    ``query-commands`` belong to the server and cannot be registered here.
    """

    RESERVED: Final = frozenset({"qmp_capabilities", "query-version", "query-commands"})

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(
        self,
        name: str,
        handler: Handler | None = None,
        *,
        args: Mapping[str, ArgSpec | str] | None = None,
        allow_preconfig: bool = False,
        blocking: bool = False,
    ) -> Any:
        """Register ``handler`` for command ``name``.

        ``args``: QAPI member map (None: the command takes no arguments, so
        any argument is "unexpected", as in QEMU). ``allow_preconfig``: may
        run before the machine is ready (QEMU's ``'allow-preconfig'``).
        ``blocking``: a plain function that may block; it runs in the
        default executor instead of on the event loop.

        Without ``handler`` this returns a decorator.
        """
        if handler is None:
            def decorator(func: Handler) -> Handler:
                self.register(name, func, args=args, allow_preconfig=allow_preconfig,
                              blocking=blocking)
                return func
            return decorator
        if not name or not isinstance(name, str):
            raise ValueError(f"bad command name {name!r}")
        if name in self.RESERVED:
            raise ValueError(f"command {name!r} is provided by the QMP server itself")
        if name in self._commands:
            raise ValueError(f"command {name!r} registered twice")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable")
        if blocking and inspect.iscoroutinefunction(handler):
            raise ValueError(f"{name!r}: blocking=True is for plain functions, not async def")
        command = Command(name, handler, normalize_args(args or {}),
                          allow_preconfig=allow_preconfig, blocking=blocking)
        self._commands[name] = command
        return handler

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)

    def names(self) -> list[str]:
        """Command names in registration order."""
        return list(self._commands)
