"""QMP command registry; arguments are checked by the one QAPI visitor.

Commands are registered by name with a handler and an argument schema;
the server validates ``arguments`` against the schema *before* the
handler runs, with ``livemig.qapi.visitor`` (QEMU's QObject input
visitor's behaviour and texts, shared with migrate-set-parameters and
migrate-set-capabilities):

* members are checked in schema order: a missing required member gives
  ``Parameter 'uri' is missing``, a wrong JSON type
  ``Invalid parameter type for 'uri', expected: string``;
* after all members of an object, the first left-over key gives
  ``Parameter 'bogus' is unexpected``;
* nested names are spelled like QEMU's ``full_name()``:
  ``capabilities[0].state``.

Argument schemas use QAPI's own spelling, so members can be copied from
``qapi/*.json``: a key starting with ``*`` is optional, a value is a type
name, an :class:`ArgSpec`, or a ``livemig.qapi.schema`` type (``Enum``,
``Array``, ``Object``, ``Alternate``); ``args`` may also be a whole
``schema.Object``::

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

Each command also declares what it returns (``returns=``: a
``livemig.qapi.schema`` type, QEMU's type name; None means ``{}``), and the
registry holds the events the VM emits (``schema.EVENTS`` by default), so
``query-qmp-schema`` (``livemig.qmp.introspect``) is generated from this one
table and cannot drift from what is checked and returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from livemig.qapi import schema
from livemig.qapi.errors import QapiError
from livemig.qapi.schema import Array, Enum, Object, QapiType
from livemig.qapi.visitor import visit_members
from livemig.qmp.errors import QMPError

Handler = Callable[[dict[str, Any]], Any]

# ArgSpec's type names: the QAPI built-ins plus "list" and "dict".
ARG_TYPES: Final = schema.BUILTINS | {"list", "dict"}
_SCHEMA_TYPES: Final = (Enum, Array, Object, schema.Alternate)


@dataclass(frozen=True)
class ArgSpec:
    """One QAPI argument (or nested member), in the registry's short spelling.

    ``type``: ``str``, ``int`` (= ``int64``), ``int8/16/32``, ``uint8/16/32``,
    ``uint64``, ``size`` (= ``uint64`` on QMP), ``bool``, ``number``
    (converted to float), ``any``, ``null``, ``list``, ``dict``.
    ``enum``: allowed values of a ``str`` (a QAPI enum).
    ``members``: schema of a ``dict`` (None: any object, unchecked).
    ``items``: schema of every ``list`` element (None: unchecked).
    ``qapi``: a ``livemig.qapi.schema`` type to use as is (``type`` is ``any``).
    """

    type: str
    optional: bool = False
    enum: tuple[str, ...] | None = None
    members: Mapping[str, ArgSpec | str | QapiType] | None = None
    items: ArgSpec | str | QapiType | None = None
    qapi: QapiType | None = None
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
        if self.qapi is not None:
            schema.check_type(self.qapi)

    def to_qapi(self) -> QapiType:
        """This argument's type as ``livemig.qapi.schema`` data, for the visitor."""
        if self.qapi is not None:
            return self.qapi
        if self.type == "str" and self.enum is not None:
            return Enum("", self.enum)
        if self.type == "dict":
            if self._members is None:
                return Object(None, None)
            return arguments_type(self._members)
        if self.type == "list":
            item = self.items
            assert item is None or isinstance(item, ArgSpec)
            return Array(item.to_qapi() if item is not None else "any")
        return self.type


def _as_spec(spec: ArgSpec | str | QapiType, *, optional: bool) -> ArgSpec:
    if isinstance(spec, _SCHEMA_TYPES):
        return ArgSpec("any", optional=optional, qapi=spec)
    if isinstance(spec, str):
        return ArgSpec(spec, optional=optional)
    if not isinstance(spec, ArgSpec):
        raise TypeError(f"argument spec must be a type name or ArgSpec, not {spec!r}")
    if optional and not spec.optional:
        return ArgSpec(spec.type, optional=True, enum=spec.enum,
                       members=spec.members, items=spec.items, qapi=spec.qapi)
    return spec


def normalize_args(args: Mapping[str, ArgSpec | str | QapiType] | Object,
                   ) -> dict[str, ArgSpec]:
    """Turn a QAPI-style member map (``'*name'`` = optional) into name -> ArgSpec."""
    if isinstance(args, Object):
        return {m.name: ArgSpec("any", optional=m.optional, qapi=m.type) for m in args}
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


def arguments_type(args: Mapping[str, ArgSpec]) -> Object:
    """The anonymous ``schema.Object`` of a normalised argument map."""
    return Object(None, tuple(schema.Member(name, spec.to_qapi(), spec.optional)
                              for name, spec in args.items()))


@dataclass(frozen=True)
class Command:
    """A registered QMP command."""

    name: str
    handler: Handler
    args: dict[str, ArgSpec]
    allow_preconfig: bool = False
    blocking: bool = False
    # What the handler returns (None: the empty object), QEMU's 'returns'.
    ret_type: QapiType | None = None
    allow_oob: bool = False
    features: tuple[str, ...] = ()
    # QAPI's 'boxed': the arguments are this union (object-add's ObjectOptions);
    # a callable is called for the union each time, so types added later count.
    boxed: Callable[[], schema.Union] | None = None

    @property
    def arg_type(self) -> Object | schema.Union:
        """The arguments as schema data (walked by the visitor and by query-qmp-schema)."""
        if self.boxed is not None:
            return self.boxed()
        return arguments_type(self.args)

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``arguments`` against the schema; raise :class:`QMPError` with
        QEMU's text, or return the converted arguments for the handler."""
        try:
            return visit_members(self.arg_type, arguments)
        except QapiError as exc:
            raise QMPError.from_qapi(exc) from None

class CommandRegistry:
    """Name -> :class:`Command`. Filled at start-up, read by the QMP server.

    The protocol commands ``qmp_capabilities``, ``query-version`` and
    ``query-commands`` belong to the server and cannot be registered here.
    """

    RESERVED: Final = frozenset({"qmp_capabilities", "query-version", "query-commands"})

    def __init__(self, events: Mapping[str, Object] | None = None) -> None:
        self._commands: dict[str, Command] = {}
        # Event name -> its data's type (query-qmp-schema lists them).
        self.events: dict[str, Object] = dict(schema.EVENTS if events is None else events)

    def register(
        self,
        name: str,
        handler: Handler | None = None,
        *,
        args: Mapping[str, ArgSpec | str | QapiType] | Object | None = None,
        allow_preconfig: bool = False,
        blocking: bool = False,
        returns: QapiType | None = None,
        allow_oob: bool = False,
        features: tuple[str, ...] = (),
        boxed: Callable[[], schema.Union] | None = None,
    ) -> Any:
        """Register ``handler`` for command ``name``.

        ``args``: QAPI member map (None: the command takes no arguments, so
        any argument is "unexpected", as in QEMU). ``allow_preconfig``: may
        run before the machine is ready (QEMU's ``'allow-preconfig'``).
        ``blocking``: a plain function that may block; it runs in the
        default executor instead of on the event loop. ``returns``: the
        type of the return value (None: ``{}``). ``allow_oob``, ``features``:
        what ``query-qmp-schema`` says of the command (QEMU's flags).
        ``boxed``: instead of ``args``, a function giving the flat union the
        arguments are (QAPI's ``'boxed': true``).

        Without ``handler`` this returns a decorator.
        """
        if handler is None:
            def decorator(func: Handler) -> Handler:
                self.register(name, func, args=args, allow_preconfig=allow_preconfig,
                              blocking=blocking, returns=returns, allow_oob=allow_oob,
                              features=features, boxed=boxed)
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
        if returns is not None:
            schema.check_type(returns)
        command = Command(name, handler, normalize_args(args or {}),
                          allow_preconfig=allow_preconfig, blocking=blocking,
                          ret_type=returns, allow_oob=allow_oob, features=tuple(features),
                          boxed=boxed)
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
