"""``query-qmp-schema``: QAPI introspection of exactly what livemig has.

Generated, never written by hand: the command list is the one the server
dispatches (the protocol commands, then the :class:`CommandRegistry`), each
command's ``arg-type`` is the very ``schema.Object`` the visitor checks its
arguments with, its ``ret-type`` the type it was registered with
(``returns=``), and the events are the registry's (``schema.EVENTS``). So
what ``query-qmp-schema`` says cannot drift from what is checked, returned
and emitted.

The output follows QEMU's ``scripts/qapi/introspect.py``:

* entities are ``SchemaInfo`` objects: commands and events first (in
  dispatch order), then every type they use, in order of first use;
* type names are masked as numbers in order of first use (``"0"`` is the
  empty object of commands without arguments or return value); built-in
  types keep their names, arrays are ``"[N]"``;
* every integer type (``int8`` ... ``uint64``, ``size``) is reported as
  ``int``; an optional member has ``"default": null``; a flat union is an
  object with ``tag`` and a ``variants`` entry for every tag value (values
  without members of their own point at the empty object).

:func:`check_value` validates a value against an introspected type; the
tests check what each command really returns against its ``ret-type``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from livemig.qapi import schema
from livemig.qapi.schema import Alternate, Array, Enum, Object, QapiType, Union
from livemig.qmp.registry import Command

# The json-type of each built-in QEMU reports (integer types fold into "int").
_JSON_TYPES: Final = {"str": "string", "int": "int", "number": "number", "bool": "boolean",
                      "null": "null", "any": "value"}
_INT_TYPES: Final = frozenset({"int", "int64", "uint64", "size"} | set(schema.SIGNED_RANGES)
                              | set(schema.UNSIGNED_RANGES))
EMPTY: Final = Object(None, ())

# Return types of the server's own protocol commands (server.py keeps their arguments).
PROTOCOL_RETURNS: Final[dict[str, QapiType | None]] = {
    "qmp_capabilities": None,
    "query-version": schema.VERSION_INFO,
    "query-commands": Array(schema.COMMAND_INFO),
}


def _fold(qtype: QapiType) -> QapiType:
    """QEMU's _use_type(): integer types are plain ``int``; an unchecked object is ``any``."""
    if isinstance(qtype, str) and qtype in _INT_TYPES:
        return "int"
    if isinstance(qtype, Object) and qtype.members is None:
        return "any"
    return qtype


def _arg_type(qtype: Object | Union) -> QapiType:
    """A command's arguments as introspected: no members is QEMU's empty object."""
    return qtype if isinstance(qtype, Union) or qtype.members else EMPTY


class _Introspector:
    def __init__(self) -> None:
        self._names: dict[object, str] = {}
        self._used: list[QapiType] = []
        self._used_keys: set[object] = set()

    @staticmethod
    def _key(qtype: QapiType) -> object:
        if isinstance(qtype, str):
            return ("builtin", qtype)
        if isinstance(qtype, Array):
            return ("array", qtype)
        name = getattr(qtype, "name", None)
        # Named types by name; anonymous ones (command arguments, inline enums) by value.
        return ("named", name) if name else ("anon", qtype)

    def use(self, qtype: QapiType) -> str:
        qtype = _fold(qtype)
        if isinstance(qtype, Array):
            qtype = Array(_fold(qtype.element))
        key = self._key(qtype)
        if key not in self._used_keys:
            self._used_keys.add(key)
            self._used.append(qtype)
        if isinstance(qtype, str):
            return qtype
        if isinstance(qtype, Array):
            return f"[{self.use(qtype.element)}]"
        if key not in self._names:
            self._names[key] = str(len(self._names))
        return self._names[key]

    def entities(self, commands: Iterable[Command],
                 events: Mapping[str, Object]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for cmd in commands:
            entry: dict[str, Any] = {
                "name": cmd.name, "meta-type": "command",
                "arg-type": self.use(_arg_type(cmd.arg_type)),
                "ret-type": self.use(cmd.ret_type if cmd.ret_type is not None else EMPTY)}
            if cmd.allow_oob:
                entry["allow-oob"] = True
            if cmd.features:
                entry["features"] = list(cmd.features)
            out.append(entry)
        for name, data in events.items():
            out.append({"name": name, "meta-type": "event",
                        "arg-type": self.use(data if data.members else EMPTY)})
        i = 0
        while i < len(self._used):  # grows while types are described
            out.append(self._type_entity(self._used[i]))
            i += 1
        return out

    def _type_entity(self, qtype: QapiType) -> dict[str, Any]:
        if isinstance(qtype, str):
            return {"name": qtype, "meta-type": "builtin", "json-type": _JSON_TYPES[qtype]}
        if isinstance(qtype, Array):
            element = self.use(qtype.element)
            return {"name": f"[{element}]", "meta-type": "array", "element-type": element}
        name = self.use(qtype)
        if isinstance(qtype, Enum):
            return {"name": name, "meta-type": "enum",
                    "members": [{"name": v} for v in qtype.members],
                    "values": list(qtype.members)}
        if isinstance(qtype, Alternate):
            return {"name": name, "meta-type": "alternate",
                    "members": [{"type": self.use(c)} for c in qtype.choices]}
        if isinstance(qtype, Union):
            entry = {"name": name, "meta-type": "object",
                     "members": self._members(qtype.base), "tag": qtype.discriminator}
            tag = qtype.base.member(qtype.discriminator)
            assert tag is not None and isinstance(tag.type, Enum), qtype.name
            entry["variants"] = [
                {"case": case, "type": self.use(qtype.variant(case) or EMPTY)}
                for case in tag.type.members]
            return entry
        assert isinstance(qtype, Object)
        return {"name": name, "meta-type": "object", "members": self._members(qtype)}

    def _members(self, obj: Object) -> list[dict[str, Any]]:
        out = []
        for m in obj:
            member: dict[str, Any] = {"name": m.name, "type": self.use(m.type)}
            if m.optional:
                member["default"] = None
            out.append(member)
        return out


def protocol_commands(builtins: Iterable[Command]) -> list[Command]:
    """The server's protocol commands with their return types attached."""
    out = []
    for cmd in builtins:
        out.append(Command(cmd.name, cmd.handler, cmd.args, allow_preconfig=cmd.allow_preconfig,
                           ret_type=PROTOCOL_RETURNS[cmd.name]))
    return out


def query_qmp_schema(commands: Iterable[Command],
                     events: Mapping[str, Object]) -> list[dict[str, Any]]:
    """``query-qmp-schema``'s return value (a ``SchemaInfo`` list)."""
    return _Introspector().entities(commands, events)


# ------------------------------------------------------------------ checking values

def check_value(entities: Iterable[Mapping[str, Any]], type_name: str, value: Any,
                path: str = "return") -> None:
    """Raise ValueError (naming the member path) unless ``value`` is of the
    introspected type ``type_name``: a client's view of the schema."""
    by_name = {e["name"]: e for e in entities if e["meta-type"] not in ("command", "event")}
    _check(by_name, type_name, value, path)


def _check(types: Mapping[str, Mapping[str, Any]], name: str, value: Any, path: str) -> None:
    entity = types.get(name)
    if entity is None:
        raise ValueError(f"{path}: type {name!r} is not in the schema")
    meta = entity["meta-type"]
    if meta == "builtin":
        json_type = entity["json-type"]
        ok = {"string": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "boolean": isinstance(value, bool),
              "null": value is None,
              "value": True}[json_type]
        if not ok:
            raise ValueError(f"{path}: {value!r} is not of JSON type {json_type}")
    elif meta == "enum":
        if value not in entity["values"]:
            raise ValueError(f"{path}: {value!r} is not one of {entity['values']}")
    elif meta == "array":
        if not isinstance(value, list):
            raise ValueError(f"{path}: {value!r} is not an array")
        for i, item in enumerate(value):
            _check(types, entity["element-type"], item, f"{path}[{i}]")
    elif meta == "alternate":
        errors = []
        for choice in entity["members"]:
            try:
                _check(types, choice["type"], value, path)
                return
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{path}: no alternative fits: {'; '.join(errors)}")
    elif meta == "object":
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {value!r} is not an object")
        members = _object_members(types, entity, value)
        known = {m["name"] for m in members}
        for m in members:
            if m["name"] in value:
                _check(types, m["type"], value[m["name"]], f"{path}.{m['name']}")
            elif "default" not in m:
                raise ValueError(f"{path}: member {m['name']!r} is missing")
        extra = sorted(set(value) - known)
        if extra:
            raise ValueError(f"{path}: member {extra[0]!r} is not in the schema")
    else:
        raise ValueError(f"{path}: {name!r} is a {meta}, not a type")


def _object_members(types: Mapping[str, Mapping[str, Any]], entity: Mapping[str, Any],
                    value: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The members that apply to ``value``: base, then its variant's (nested unions too)."""
    members = list(entity["members"])
    if "tag" in entity:
        for variant in entity["variants"]:
            if variant["case"] == value.get(entity["tag"]):
                members += _object_members(types, types[variant["type"]], value)
    return members
