"""QEMU's VMState wire format as data: descriptions, encoder, decoder, vmdesc.

A device section's payload in QEMU's stream has no length: it is the
device's fields, in the order of its ``VMStateDescription``, each a
big-endian integer, a byte buffer or a nested struct, followed by any
subsections (``0x05``, name length, name, be32 version, then the
subsection's own fields and subsections). Which subsections are written is
decided by each one's ``needed`` rule on the sender; the receiver takes
whatever subsections come, looked up by name. Only the description tells a
reader where a payload ends, so every section livemig exchanges with QEMU
is described here field by field (``devices.py``, ``cpu.py``).

Values are plain dicts keyed by QEMU's field names as its VM description
JSON spells them (``env.regs``, ``cur_offset[1]``): scalars are ints (bool
fields are bools), arrays lists, structs dicts, buffers bytes; a present
subsection is a nested dict under its name (``values["cpu/tsc_khz"]``).
Unused buffers (``VMSTATE_UNUSED``) are not values: read and dropped,
written as zeros, as QEMU does.

Sans-IO: :func:`decode` reads from a buffer at an offset and returns the
values and the offset after them, raising :class:`VMStateTruncated` when
the buffer ends first (the caller feeds more and retries; a payload is
known to end only once the byte after it is there, or with ``complete``) and
:class:`VMStateError` on what QEMU would refuse; :func:`encode` returns
bytes; :func:`describe` returns the JSON entry QEMU's VM description holds
for the same values, so a layout can be checked against QEMU's own.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constants import QEMU_VM_SUBSECTION
from ..errors import WireError

Values = dict[str, Any]

_INTS: dict[str, struct.Struct] = {
    "uint8": struct.Struct(">B"), "uint16": struct.Struct(">H"),
    "uint32": struct.Struct(">I"), "uint64": struct.Struct(">Q"),
    "int8": struct.Struct(">b"), "int16": struct.Struct(">h"),
    "int32": struct.Struct(">i"), "int64": struct.Struct(">q"),
    # VMSTATE_TIMER_PTR: the expiry time (ns), -1 when the timer is not pending.
    "timer": struct.Struct(">q"),
}
_BE32 = struct.Struct(">I")
KINDS = frozenset(_INTS) | {"bool", "buffer", "unused_buffer", "struct", "tmp"}


class VMStateError(WireError):
    """What QEMU's vmstate_load_state would refuse; ``offset`` is where (in
    the buffer given to :func:`decode`)."""


class VMStateTruncated(VMStateError):
    """The buffer ended inside the payload: feed more data and decode again."""


@dataclass(frozen=True)
class VMStateField:
    """One ``VMStateField``. ``size`` is the element size of integers (from
    ``kind``) and the length of buffers; ``count`` makes an array (QEMU's
    ``array_len``); ``since`` is the section version the field appeared in
    (``VMSTATE_*_V``); ``exists`` replaces it where QEMU uses a test
    function on the version (``VMSTATE_*_TEST``)."""

    name: str
    kind: str
    size: int = 0
    count: int | None = None
    struct: VMStateDescription | None = None
    since: int = 0
    exists: Callable[[int], bool] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown VMState field kind {self.kind!r}")
        if self.kind in _INTS:
            object.__setattr__(self, "size", _INTS[self.kind].size)
        elif self.kind == "bool":
            object.__setattr__(self, "size", 1)
        elif self.kind in ("struct", "tmp"):
            if self.struct is None:
                raise ValueError(f"{self.name}: a {self.kind} field needs its description")
        elif self.size <= 0:
            raise ValueError(f"{self.name}: a {self.kind} needs a size")

    def present(self, version: int) -> bool:
        return self.exists(version) if self.exists is not None else version >= self.since


# needed(values of the device, its configuration) -> whether the subsection is sent.
Needed = Callable[[Values, Any], bool]


@dataclass(frozen=True)
class VMStateDescription:
    """One ``VMStateDescription``. ``needed`` None means always sent (QEMU's
    rule for a subsection without ``.needed``). ``defaults`` are the values
    a subsection's fields hold when it was not sent, what the device's reset
    leaves there; ``needed`` rules read them through :func:`sub`."""

    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[VMStateField, ...]
    subsections: tuple[VMStateDescription, ...] = ()
    needed: Needed | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def subsection(self, name: str) -> VMStateDescription | None:
        for s in self.subsections:
            if s.name == name:
                return s
        return None


def sub(values: Mapping[str, Any], desc: VMStateDescription) -> Mapping[str, Any]:
    """A subsection's values: as sent, else its defaults (zeros unless said)."""
    got = values.get(desc.name)
    if got is not None:
        return got
    return default_values(desc)


def _zero(f: VMStateField) -> Any:
    if f.kind in ("struct", "tmp"):
        assert f.struct is not None
        one: Any = default_values(f.struct)
    elif f.kind == "buffer":
        one = bytes(f.size)
    elif f.kind == "bool":
        one = False
    else:
        one = 0
    if f.count is None:
        return one
    return [dict(one) if isinstance(one, dict) else one for _ in range(f.count)]


def default_values(desc: VMStateDescription) -> Values:
    """Zeros (and ``defaults``) for every field of the current version; no
    subsections."""
    return {f.name: desc.defaults.get(f.name, _zero(f)) for f in desc.fields
            if f.kind != "unused_buffer" and f.present(desc.version_id)}


def is_needed(desc: VMStateDescription, values: Mapping[str, Any], config: Any) -> bool:
    return desc.needed is None or desc.needed(dict(values), config)


# -- encode ------------------------------------------------------------------------------

def encode(desc: VMStateDescription, values: Mapping[str, Any], config: Any = None) -> bytes:
    """The payload QEMU writes for ``values`` at ``desc.version_id``."""
    out = bytearray()
    _encode_into(out, desc, values, config, desc.name)
    return bytes(out)


def _encode_into(out: bytearray, desc: VMStateDescription, values: Mapping[str, Any],
                 config: Any, path: str) -> None:
    for f in desc.fields:
        if not f.present(desc.version_id):
            continue
        where = f"{path}.{f.name}" if path else f.name
        if f.kind == "unused_buffer":
            out += bytes(f.size)
            continue
        try:
            value = values[f.name]
        except KeyError:
            raise ValueError(f"{where}: no value") from None
        if f.count is None:
            _encode_one(out, f, value, config, where)
            continue
        if len(value) != f.count:
            raise ValueError(f"{where}: {len(value)} elements, expected {f.count}")
        for i, v in enumerate(value):
            _encode_one(out, f, v, config, f"{where}[{i}]")
    for s in desc.subsections:
        if not is_needed(s, values, config):
            continue
        name = s.name.encode("ascii")
        out += bytes((QEMU_VM_SUBSECTION, len(name))) + name + _BE32.pack(s.version_id)
        _encode_into(out, s, sub(values, s), config, s.name)


def _encode_one(out: bytearray, f: VMStateField, value: Any, config: Any, where: str) -> None:
    if f.kind in _INTS:
        try:
            out += _INTS[f.kind].pack(value)
        except struct.error:
            raise ValueError(f"{where}: {value!r} does not fit {f.kind}") from None
    elif f.kind == "bool":
        out.append(1 if value else 0)
    elif f.kind == "buffer":
        if len(value) != f.size:
            raise ValueError(f"{where}: {len(value)} bytes, expected {f.size}")
        out += value
    else:
        assert f.struct is not None
        _encode_into(out, f.struct, value, config, where)


# -- decode ------------------------------------------------------------------------------

def decode(desc: VMStateDescription, data: bytes | bytearray | memoryview, offset: int = 0,
           version_id: int | None = None, *, complete: bool = False) -> tuple[Values, int]:
    """Read one payload of ``desc`` sent at ``version_id`` (default: the
    current one) from ``data[offset:]``: (values, offset after it).

    Whether subsections follow shows only in the next byte, so where the
    buffer ends right after the fields the payload is taken as truncated,
    unless ``complete`` says the buffer ends where the payload does."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    reader = _Reader(view, complete)
    return reader.decode(desc, offset, desc.version_id if version_id is None else version_id)


def _check_version(desc: VMStateDescription, version_id: int, offset: int) -> None:
    # QEMU's vmstate_load_state texts.
    if version_id > desc.version_id:
        raise VMStateError(f"{desc.name}: incoming version_id {version_id} is too new "
                           f"for local version_id {desc.version_id}", offset)
    if version_id < desc.minimum_version_id:
        raise VMStateError(f"{desc.name}: incoming version_id {version_id} is too old "
                           f"for local minimum version_id  {desc.minimum_version_id}", offset)


def _need(data: memoryview, offset: int, n: int, what: str) -> None:
    if offset + n > len(data):
        raise VMStateTruncated(f"{what}: payload ends after {len(data) - offset} of "
                               f"{n} bytes", offset)


class _Reader:
    def __init__(self, data: memoryview, complete: bool) -> None:
        self.data = data
        self.complete = complete

    def decode(self, desc: VMStateDescription, p: int, version_id: int) -> tuple[Values, int]:
        _check_version(desc, version_id, p)
        values: Values = {}
        for f in desc.fields:
            if not f.present(version_id):
                continue
            what = f"{desc.name}.{f.name}"
            if f.kind == "unused_buffer":
                _need(self.data, p, f.size, what)
                p += f.size
                continue
            if f.count is None:
                values[f.name], p = self.one(f, p, what)
                continue
            items = []
            for i in range(f.count):
                v, p = self.one(f, p, f"{what}[{i}]")
                items.append(v)
            values[f.name] = items
        return values, self.subsections(desc, p, values)

    def one(self, f: VMStateField, p: int, what: str) -> tuple[Any, int]:
        data = self.data
        if f.kind in _INTS:
            st = _INTS[f.kind]
            _need(data, p, st.size, what)
            return st.unpack_from(data, p)[0], p + st.size
        if f.kind == "bool":
            _need(data, p, 1, what)
            return data[p] != 0, p + 1      # QEMU's get_bool: any non-zero byte is true
        if f.kind == "buffer":
            _need(data, p, f.size, what)
            return bytes(data[p:p + f.size]), p + f.size
        assert f.struct is not None
        # A struct is read at its description's own current version (VMSTATE_STRUCT).
        return self.decode(f.struct, p, f.struct.version_id)

    def _peek(self, p: int, n: int, desc: VMStateDescription) -> bool:
        """Whether ``n`` bytes are there; streaming, their absence is truncation."""
        if p + n <= len(self.data):
            return True
        if not self.complete:
            raise VMStateTruncated(f"{desc.name}: the stream ends before it is known "
                                   "whether subsections follow", p)
        return False

    def subsections(self, desc: VMStateDescription, p: int, values: Values) -> int:
        """QEMU's vmstate_subsection_load: a 0x05 byte and a name that starts with
        this description's name is one of its subsections; anything else ends them."""
        data = self.data
        prefix = desc.name.encode("ascii")
        while True:
            # QEMU peeks at the marker, the length and the name; where its
            # peek comes back short (the stream ended) there is no subsection.
            if not self._peek(p, 1, desc) or data[p] != QEMU_VM_SUBSECTION:
                return p
            if not self._peek(p, 2, desc) or data[p + 1] < len(prefix) + 1:
                return p
            n = data[p + 1]
            if not self._peek(p, 2 + n, desc):
                return p
            name = bytes(data[p + 2:p + 2 + n])
            if not name.startswith(prefix):
                return p
            text = name.decode("ascii", "backslashreplace")
            s = desc.subsection(text)
            if s is None:
                raise VMStateError(f"{desc.name}: unknown subsection '{text}'", p)
            if text in values:
                raise VMStateError(f"{desc.name}: subsection '{text}' sent twice", p)
            q = p + 2 + n
            _need(data, q, 4, f"{text} version")
            sv = _BE32.unpack_from(data, q)[0]
            values[text], p = self.decode(s, q + 4, sv)


# -- describe (QEMU's VM description JSON) -------------------------------------------------

def describe(desc: VMStateDescription, values: Mapping[str, Any], config: Any = None
             ) -> dict[str, Any]:
    """The VM description entry QEMU writes beside this payload (``vmsd_name``,
    ``version``, ``fields``, ``subsections`` as sent; without the top-level
    ``name`` and ``instance_id``)."""
    out: dict[str, Any] = {"vmsd_name": desc.name, "version": desc.version_id,
                           "fields": _describe_fields(desc, values, config)}
    subs = [describe(s, sub(values, s), config) for s in desc.subsections
            if is_needed(s, values, config)]
    if subs:
        out["subsections"] = subs
    return out


def _describe_fields(desc: VMStateDescription, values: Mapping[str, Any],
                     config: Any) -> list[dict[str, Any]]:
    fields = []
    for f in desc.fields:
        if not f.present(desc.version_id) or f.count == 0:   # no element, no entry
            continue
        entry: dict[str, Any] = {"name": f.name}
        if f.count is not None and f.count > 1:
            entry["array_len"] = f.count
        entry["type"] = f.kind
        if f.kind in ("struct", "tmp"):
            assert f.struct is not None
            one = values[f.name][0] if f.count is not None else values[f.name]
            inner = describe(f.struct, one, config)
            if f.kind == "struct":
                entry["struct"] = inner
            else:               # VMSTATE_WITH_TMP: the tmp struct's keys inline
                entry.update(inner)
            entry["size"] = len(encode(f.struct, one, config))
        else:
            entry["size"] = f.size
        fields.append(entry)
    return fields


# -- building descriptions ------------------------------------------------------------------

def fields(*specs: tuple[Any, ...] | VMStateField) -> tuple[VMStateField, ...]:
    """Terse field lists: ``(name, kind)``, ``(name, kind, count)`` or a field."""
    out = []
    for s in specs:
        if isinstance(s, VMStateField):
            out.append(s)
        elif len(s) == 2:
            out.append(VMStateField(s[0], s[1]))
        else:
            out.append(VMStateField(s[0], s[1], count=s[2]))
    return tuple(out)


def u64s(*names: str) -> tuple[VMStateField, ...]:
    return tuple(VMStateField(n, "uint64") for n in names)


def simple(name: str, version: int, flds: Sequence[VMStateField], needed: Needed | None = None,
           minimum: int | None = None, subsections: Sequence[VMStateDescription] = (),
           defaults: Mapping[str, Any] | None = None) -> VMStateDescription:
    return VMStateDescription(name, version, version if minimum is None else minimum,
                              tuple(flds), tuple(subsections), needed, dict(defaults or {}))


# when(own values, the device's values, configuration) -> sent?
OwnNeeded = Callable[[Mapping[str, Any], Values, Any], bool]


def subsection(name: str, flds: Sequence[VMStateField], when: OwnNeeded, *, version: int = 1,
               defaults: Mapping[str, Any] | None = None) -> VMStateDescription:
    """A subsection whose ``needed`` rule reads its own values (as sent, or
    its defaults when it was not) beside the device's."""
    desc: VMStateDescription

    def needed(values: Values, config: Any) -> bool:
        return when(sub(values, desc), values, config)

    desc = simple(name, version, flds, needed=needed, defaults=defaults)
    return desc
