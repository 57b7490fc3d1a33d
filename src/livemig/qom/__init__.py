"""QEMU's user-creatable objects (QOM's ``/objects``): ``-object``, ``object-add``,
``object-del``."""

from livemig.qom.object import (
    OBJECT_TYPES,
    ObjectRoot,
    UserCreatable,
    object_options_type,
    register_object_type,
    visit_object_options,
)

__all__ = ["OBJECT_TYPES", "ObjectRoot", "UserCreatable", "object_options_type",
           "register_object_type", "visit_object_options"]
