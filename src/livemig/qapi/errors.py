"""The error raised by ``livemig.qapi``, and QEMU's generic QAPI message templates.

A :class:`QapiError` carries what a QMP error response needs (``error_class``
and ``desc``), so the QMP front can report it without this layer importing
``livemig.qmp`` (which sits above it).
"""

from __future__ import annotations

from typing import Final

GENERIC_ERROR: Final = "GenericError"

# include/qapi/qmp/qerror.h, qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c
MISSING_PARAMETER: Final = "Parameter '%s' is missing"
UNEXPECTED_PARAMETER: Final = "Parameter '%s' is unexpected"
INVALID_PARAMETER_TYPE: Final = "Invalid parameter type for '%s', expected: %s"
INVALID_PARAMETER_VALUE: Final = "Parameter '%s' expects %s"
INVALID_ENUM_VALUE: Final = "Parameter '%s' does not accept value '%s'"
# qom/object.c object_apply_global_props() and object_property_find_err()
GLOBAL_PREFIX: Final = "can't apply global migration.%s=%s: "
PROPERTY_NOT_FOUND: Final = "Property 'migration.%s' not found"


class QapiError(Exception):
    """A QAPI-level refusal, with QEMU's exact text in ``desc``.

    ``error_class`` is a QMP error class; QEMU's ``error_setg`` (and so every
    check in this package) uses ``GenericError``.
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def __str__(self) -> str:
        return self.desc

    def __repr__(self) -> str:
        return f"QapiError({self.desc!r}, error_class={self.error_class!r})"
