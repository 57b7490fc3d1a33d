"""QEMU's user-creatable objects (``qom/object_interfaces.c``): types, the
``/objects`` container, and what ``-object`` and ``object-add`` both go through.

A type is a :class:`UserCreatable` subclass registered with
:func:`register_object_type`; its ``properties`` are the members of its
variant of QEMU's ``ObjectOptions`` union (``qapi/qom.json``), so
:func:`object_options_type` builds that union from the registry and the one
QAPI visitor checks ``object-add`` and ``-object`` with QEMU's texts. The
order of the checks is QEMU's: the union (qom-type, id, the type's members),
then the id's spelling, then the object's own ``complete`` (which may read
files), then the id's uniqueness.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Final, TypeVar

from livemig.qapi.errors import INVALID_PARAMETER_VALUE, QapiError
from livemig.qapi.schema import Enum, Object, Union, struct
from livemig.qapi.visitor import visit_members

# qom/object.c, qom/object_interfaces.c, qom/qom-qmp-cmds.c, system/vl.c
DUPLICATE_PROPERTY: Final = "attempt to add duplicate property '%s' to object (type 'container')"
OBJECT_NOT_FOUND: Final = "object '%s' not found"
OBJECT_IN_USE: Final = "object '%s' is in use, can not be deleted"
DUPLICATE_ID: Final = "Duplicate ID '%s' for object"
INVALID_OBJECT_TYPE: Final = "invalid object type: %s"

# util/id.c id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9\-._]*")


def id_wellformed(ident: str) -> bool:
    return _ID_RE.fullmatch(ident) is not None


class UserCreatable:
    """One user-creatable object. Subclasses set ``qom_type`` and ``properties``
    (their ObjectOptions variant) and may override :meth:`complete` and
    :meth:`can_be_deleted`."""

    qom_type: ClassVar[str]
    properties: ClassVar[Object] = Object(None, ())

    def __init__(self, ident: str, props: Mapping[str, Any]) -> None:
        self.id = ident
        self.props = dict(props)

    def complete(self) -> None:
        """QEMU's ``UserCreatableClass.complete``: check and load; raise QapiError."""

    def can_be_deleted(self) -> bool:
        """QEMU's ``UserCreatableClass.can_be_deleted`` (memory backends in use say no)."""
        return True

    def unparent(self) -> None:
        """Called once the object has left ``/objects`` (release what it holds)."""


_T = TypeVar("_T", bound=type[UserCreatable])
OBJECT_TYPES: dict[str, type[UserCreatable]] = {}


def register_object_type(cls: _T) -> _T:
    """Class decorator: ``cls`` can be made by ``-object`` and ``object-add``."""
    name = cls.qom_type
    if name in OBJECT_TYPES and OBJECT_TYPES[name] is not cls:
        raise ValueError(f"object type {name!r} registered twice")
    OBJECT_TYPES[name] = cls
    return cls


def object_options_type() -> Union:
    """QEMU's ``ObjectOptions``: qom-type and id, then the type's members."""
    names = tuple(sorted(OBJECT_TYPES))
    base = struct("ObjectOptions", {"qom-type": Enum("ObjectType", names), "id": "str"})
    return Union("ObjectOptions", base, "qom-type",
                 tuple((name, OBJECT_TYPES[name].properties) for name in names))


def visit_object_options(args: Mapping[str, Any], *, keyval: bool = False) -> dict[str, Any]:
    """``args`` checked as ObjectOptions: QMP's JSON, or ``-object``'s keyval strings."""
    return visit_members(object_options_type(), args, keyval=keyval)


class ObjectRoot:
    """QEMU's ``/objects`` container: id -> object, safe from any thread."""

    def __init__(self) -> None:
        self._objects: dict[str, UserCreatable] = {}
        self._lock = threading.Lock()

    def add(self, options: Mapping[str, Any]) -> UserCreatable:
        """Create, complete and add the object ``options`` (visited ObjectOptions) says."""
        qom_type, ident = options["qom-type"], options["id"]
        cls = OBJECT_TYPES.get(qom_type)
        if cls is None:
            raise QapiError(INVALID_OBJECT_TYPE % qom_type)
        if not id_wellformed(ident):
            raise QapiError(INVALID_PARAMETER_VALUE % ("id", "an identifier"))
        props = {k: v for k, v in options.items() if k not in ("qom-type", "id")}
        obj = cls(ident, props)
        obj.complete()
        with self._lock:
            if ident in self._objects:
                obj.unparent()
                raise QapiError(DUPLICATE_PROPERTY % ident)
            self._objects[ident] = obj
        return obj

    def delete(self, ident: str) -> None:
        """QEMU's ``user_creatable_del``."""
        with self._lock:
            obj = self._objects.get(ident)
            if obj is None:
                raise QapiError(OBJECT_NOT_FOUND % ident)
            if not obj.can_be_deleted():
                raise QapiError(OBJECT_IN_USE % ident)
            del self._objects[ident]
        obj.unparent()

    def get(self, ident: str) -> UserCreatable | None:
        """``object_resolve_path_component(object_get_objects_root(), id)``."""
        with self._lock:
            return self._objects.get(ident)

    def __contains__(self, ident: object) -> bool:
        with self._lock:
            return ident in self._objects

    def __iter__(self) -> Iterator[UserCreatable]:
        with self._lock:
            return iter(list(self._objects.values()))

    def close(self) -> None:
        """Unparent every object (the process is ending)."""
        with self._lock:
            objects, self._objects = list(self._objects.values()), {}
        for obj in objects:
            obj.unparent()
