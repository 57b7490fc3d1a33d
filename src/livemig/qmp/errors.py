"""QMP errors: :class:`QMPError`, and QEMU's texts re-exported from ``livemig.qapi.errors``.

A command handler reports failure by raising :class:`QMPError` (or any
exception carrying ``error_class`` and ``desc`` attributes, such as
``livemig.qapi.errors.QapiError``, of which QMPError is a subclass); the
server turns it into ``{"error": {"class": ..., "desc": ...}, "id": ...}``.

The message templates are defined once, in ``livemig.qapi.errors`` (QEMU
10.0's texts verbatim, with the file each comes from); the names below are
kept so ``errors.INPUT_NOT_OBJECT`` and friends keep working here.
"""

from __future__ import annotations

from livemig.qapi.errors import (
    CAPABILITY_NOT_AVAILABLE,
    COMMAND_NEEDS_MACHINE,
    COMMAND_NOT_FOUND,
    COMMAND_NOT_FOUND_TEXT,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    EXPECTING_NEGOTIATION,
    GENERIC_ERROR,
    INPUT_ARGUMENTS_NOT_OBJECT,
    INPUT_LACKS_EXECUTE,
    INPUT_MEMBER_NOT_STRING,
    INPUT_MEMBER_UNEXPECTED,
    INPUT_NOT_OBJECT,
    INVALID_ENUM_VALUE,
    INVALID_PARAMETER_TYPE,
    INVALID_PARAMETER_VALUE,
    JSON_NESTING_LIMIT,
    JSON_PARSE_ERROR,
    JSON_STRAY,
    JSON_TOKEN_COUNT_LIMIT,
    JSON_TOKEN_SIZE_LIMIT,
    KVM_MISSING_CAP,
    MISSING_PARAMETER,
    NEGOTIATION_COMPLETE,
    QAPI_ERROR_CLASSES,
    UNEXPECTED_PARAMETER,
    QapiError,
)

__all__ = [
    "CAPABILITY_NOT_AVAILABLE", "COMMAND_NEEDS_MACHINE", "COMMAND_NOT_FOUND",
    "COMMAND_NOT_FOUND_TEXT", "DEVICE_NOT_ACTIVE", "DEVICE_NOT_FOUND", "EXPECTING_NEGOTIATION",
    "GENERIC_ERROR", "INPUT_ARGUMENTS_NOT_OBJECT", "INPUT_LACKS_EXECUTE",
    "INPUT_MEMBER_NOT_STRING", "INPUT_MEMBER_UNEXPECTED", "INPUT_NOT_OBJECT",
    "INVALID_ENUM_VALUE", "INVALID_PARAMETER_TYPE", "INVALID_PARAMETER_VALUE",
    "JSON_NESTING_LIMIT", "JSON_PARSE_ERROR", "JSON_STRAY", "JSON_TOKEN_COUNT_LIMIT",
    "JSON_TOKEN_SIZE_LIMIT", "KVM_MISSING_CAP", "MISSING_PARAMETER", "NEGOTIATION_COMPLETE",
    "QAPI_ERROR_CLASSES", "UNEXPECTED_PARAMETER", "QMPError", "QapiError", "error_fields",
]


class QMPError(QapiError):
    """A command failed; reported to the client as a QMP error response.

    ``desc`` is the human-readable text (QEMU's ``error_get_pretty``);
    ``error_class`` one of :data:`QAPI_ERROR_CLASSES` (checked here, since
    handlers pick it), nearly always ``GenericError`` (QEMU's ``error_setg``).
    """

    def __init__(self, desc: str, *, error_class: str = GENERIC_ERROR) -> None:
        if error_class not in QAPI_ERROR_CLASSES:
            raise ValueError(f"unknown QAPI error class {error_class!r}")
        super().__init__(desc, error_class)

    @classmethod
    def from_qapi(cls, exc: QapiError) -> QMPError:
        """A QMPError with ``exc``'s class and text."""
        return exc if isinstance(exc, QMPError) else cls(exc.desc, error_class=exc.error_class)


def error_fields(exc: BaseException) -> tuple[str, str] | None:
    """``(class, desc)`` for an exception that speaks QMP, else None.

    Duck-typed, so that any exception with ``error_class`` and ``desc``
    (not only :class:`QapiError`) is reported as such.
    """
    error_class = getattr(exc, "error_class", None)
    desc = getattr(exc, "desc", None)
    if isinstance(error_class, str) and isinstance(desc, str):
        return error_class, desc
    return None
