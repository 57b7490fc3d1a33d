"""The one QAPI input visitor: QMP JSON values checked against ``livemig.qapi.schema``.

It behaves like QEMU's QObject input visitor (``qapi/qobject-input-visitor.c``
with ``qapi/qapi-visit-core.c``) and reports the first problem with QEMU's
text: members in schema order (missing, then wrong type), then the first
left-over key; type errors name the full path (``capabilities[0].state``),
range and enum errors the bare member name (``null`` for a list element).
Command arguments, ``migrate-set-parameters`` and
``migrate-set-capabilities`` are all visited here.

``keyval=True`` is QEMU's keyval input visitor (``-object type,k=v``):
every scalar arrives as a string and is converted as the schema says
(``'on' or 'off'``, ``a uint64 value``, ``a size value``), and a left-over
key is an ``Invalid parameter``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from livemig.qapi.errors import (
    BOOL_EXPECTED,
    INVALID_ENUM_VALUE,
    INVALID_PARAMETER,
    INVALID_PARAMETER_TYPE,
    INVALID_PARAMETER_VALUE,
    MISSING_PARAMETER,
    UNEXPECTED_PARAMETER,
    QapiError,
)
from livemig.qapi.schema import (
    SIGNED_RANGES,
    UNSIGNED_RANGES,
    Alternate,
    Array,
    Enum,
    Object,
    QapiType,
    Union,
)
from livemig.qapi.string_input import BOOL_WORDS, UINT_RE, qemu_strtosz

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
UINT64_LIMIT: Final = 1 << 64

# Alternate branches by JSON type (qobject_input_start_alternate's QType test).
_JSON_KIND: Final = {"str": str, "bool": bool, "null": type(None)}


class _Path:
    """Where the visitor is, to spell names like QEMU's ``full_name()``."""

    __slots__ = ("parts", "keyval")

    def __init__(self, keyval: bool = False) -> None:
        self.parts: list[str] = []
        self.keyval = keyval

    def name(self, leaf: str | None = None) -> str:
        text = "".join(self.parts)
        if leaf is not None:
            text = f"{text}.{leaf}" if text else leaf
        return text.lstrip(".") or "<anonymous>"


def _fail(template: str, *values: object) -> QapiError:
    return QapiError(template % values)


def visit(qtype: QapiType, value: Any, name: str | None = None) -> Any:
    """Check one value (the member ``name`` of the top-level object); return it converted."""
    return _visit(qtype, value, _Path(), name)


def visit_members(obj: Object | Union, value: Mapping[str, Any], *,
                  keyval: bool = False) -> dict[str, Any]:
    """Check a command's ``arguments`` (or any top-level object) against ``obj``.

    Returns the converted members; absent optional members stay absent.
    ``keyval``: the values are a keyval option's strings (see the module's text).
    """
    return _visit_members(obj, value, _Path(keyval))


def _visit(qtype: QapiType, value: Any, path: _Path, leaf: str | None) -> Any:
    bare = leaf if leaf is not None else "null"
    if isinstance(qtype, Enum):
        if not isinstance(value, str):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "string")
        if value not in qtype.members:
            raise _fail(INVALID_ENUM_VALUE, bare, value)
        return value
    if isinstance(qtype, Object):
        if isinstance(value, dict) and qtype.members is None:
            return value
        return _visit_object(qtype, value, path, leaf)
    if isinstance(qtype, Union):
        return _visit_object(qtype, value, path, leaf)
    if isinstance(qtype, Array):
        if not isinstance(value, list):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "array")
        out = []
        base = "." + leaf if leaf is not None else ""
        for index, item in enumerate(value):
            path.parts.append(f"{base}[{index}]")
            try:
                out.append(_visit(qtype.element, item, path, None))
            finally:
                path.parts.pop()
        return out
    if isinstance(qtype, Alternate):
        for choice in qtype.choices:
            kind = _JSON_KIND.get(choice) if isinstance(choice, str) else None
            if kind is not None and type(value) is kind:
                return value
        raise _fail(INVALID_PARAMETER_TYPE, bare, qtype.name)
    return _visit_builtin(qtype, value, path, leaf)


def _visit_object(qtype: Object | Union, value: Any, path: _Path, leaf: str | None) -> Any:
    """A struct or a flat union: a JSON object whose members are named below ``leaf``."""
    if not isinstance(value, dict):
        raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "object")
    path.parts.append("." + leaf if leaf is not None else "")
    try:
        return _visit_members(qtype, value, path)
    finally:
        path.parts.pop()


def _keyval_scalar(kind: str, value: str, path: _Path, leaf: str | None) -> Any:
    """A keyval string as the scalar ``kind`` (qobject-input-visitor's ``*_keyval``)."""
    name = path.name(leaf)
    if kind == "bool":
        state = BOOL_WORDS.get(value)
        if state is None:
            raise _fail(INVALID_PARAMETER_VALUE, name, BOOL_EXPECTED)
        return state
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            raise _fail(INVALID_PARAMETER_VALUE, name, "a number") from None
    if kind == "size":
        try:
            return qemu_strtosz(value)
        except QapiError:
            raise _fail(INVALID_PARAMETER_VALUE, name, "a size value") from None
    unsigned = kind == "uint64" or kind in UNSIGNED_RANGES
    m = UINT_RE.fullmatch(value)
    if m is None or (unsigned and m.group(1) == "-"):
        raise _fail(INVALID_PARAMETER_VALUE, name,
                    "a uint64 value" if unsigned else "an int64 value")
    digits = m.group(2)
    base = 16 if digits[:2].lower() == "0x" else 8 if len(digits) > 1 and digits[0] == "0" else 10
    number = int(digits, base)
    return -number if m.group(1) == "-" else number


def _visit_builtin(kind: str, value: Any, path: _Path, leaf: str | None) -> Any:
    bare = leaf if leaf is not None else "null"
    if kind == "any":
        return value
    if path.keyval and isinstance(value, str) and kind not in ("str", "null"):
        value = _keyval_scalar(kind, value, path, leaf)
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "boolean")
        return value
    if kind == "null":
        if value is not None:
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "null")
        return None
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "number")
        return float(value)
    if kind in ("int", "int64") or kind in SIGNED_RANGES:
        if (isinstance(value, bool) or not isinstance(value, int)
                or not INT64_MIN <= value <= INT64_MAX):
            raise _fail(INVALID_PARAMETER_TYPE, path.name(leaf), "integer")
        if kind in SIGNED_RANGES:
            low, high, ctype = SIGNED_RANGES[kind]
            if not low <= value <= high:
                raise _fail(INVALID_PARAMETER_VALUE, bare, ctype)
        return value
    if kind in ("uint64", "size") or kind in UNSIGNED_RANGES:
        # Negative int64 is accepted "for backward compatibility" and wraps;
        # JSON integers outside int64/uint64 are doubles in QEMU: refused.
        if (isinstance(value, bool) or not isinstance(value, int)
                or not INT64_MIN <= value < UINT64_LIMIT):
            raise _fail(INVALID_PARAMETER_VALUE, path.name(leaf), "uint64")
        value %= UINT64_LIMIT
        if kind in UNSIGNED_RANGES:
            high, ctype = UNSIGNED_RANGES[kind]
            if value > high:
                raise _fail(INVALID_PARAMETER_VALUE, bare, ctype)
        return value
    raise AssertionError(kind)  # pragma: no cover - schema.check_type refuses others


def _visit_members(obj: Object | Union, value: Mapping[str, Any],
                   path: _Path) -> dict[str, Any]:
    """All members of a struct (or of a flat union's base and variant), then
    the first key none of them names."""
    out: dict[str, Any] = {}
    known: set[str] = set()
    if isinstance(obj, Union):
        _visit_union_members(obj, value, path, out, known)
    else:
        _visit_some_members(obj, value, path, out, known)
    _check_unexpected(value, known, path)
    return out


def _visit_union_members(union: Union, value: Mapping[str, Any], path: _Path,
                         out: dict[str, Any], known: set[str]) -> None:
    """Base members, then the variant's (a variant may itself be a union)."""
    _visit_some_members(union.base, value, path, out, known)
    variant = union.variant(out[union.discriminator])
    if isinstance(variant, Union):
        _visit_union_members(variant, value, path, out, known)
    elif variant is not None:
        _visit_some_members(variant, value, path, out, known)


def _visit_some_members(obj: Object, value: Mapping[str, Any], path: _Path,
                        out: dict[str, Any], known: set[str]) -> None:
    for member in obj:
        known.add(member.name)
        if member.name not in value:
            if not member.optional:
                raise _fail(MISSING_PARAMETER, path.name(member.name))
            continue
        out[member.name] = _visit(member.type, value[member.name], path, member.name)


def _check_unexpected(value: Mapping[str, Any], known: set[str], path: _Path) -> None:
    for key in value:
        if key not in known:
            raise _fail(INVALID_PARAMETER if path.keyval else UNEXPECTED_PARAMETER,
                        path.name(key))
