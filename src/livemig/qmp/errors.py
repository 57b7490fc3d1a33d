"""QMP errors and QEMU's exact error texts.

A command handler reports failure by raising :class:`QMPError` (or any
exception carrying ``error_class`` and ``desc`` attributes, such as
``livemig.qapi.errors.QapiError``); the server turns it into
``{"error": {"class": ..., "desc": ...}, "id": ...}``.

The message templates below are QEMU 10.0's, verbatim, with the file they
come from, so a client that matches on ``desc`` (libvirt does, for a few)
sees what it would see from ``qemu-system-x86_64``.
"""

from __future__ import annotations

from typing import Final

# QapiErrorClass (qapi/error.json), in enum order.
GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
DEVICE_NOT_ACTIVE: Final = "DeviceNotActive"
DEVICE_NOT_FOUND: Final = "DeviceNotFound"
KVM_MISSING_CAP: Final = "KVMMissingCap"
QAPI_ERROR_CLASSES: Final = (
    GENERIC_ERROR,
    COMMAND_NOT_FOUND,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    KVM_MISSING_CAP,
)

# include/qapi/qmp/qerror.h and qapi/qobject-input-visitor.c
MISSING_PARAMETER: Final = "Parameter '%s' is missing"
UNEXPECTED_PARAMETER: Final = "Parameter '%s' is unexpected"
INVALID_PARAMETER_TYPE: Final = "Invalid parameter type for '%s', expected: %s"
INVALID_PARAMETER_VALUE: Final = "Parameter '%s' expects %s"
# qapi/qapi-visit-core.c input_type_enum()
INVALID_ENUM_VALUE: Final = "Parameter '%s' does not accept value '%s'"

# qapi/qmp-dispatch.c
INPUT_NOT_OBJECT: Final = "QMP input must be a JSON object"
INPUT_MEMBER_NOT_STRING: Final = "QMP input member '%s' must be a string"
INPUT_ARGUMENTS_NOT_OBJECT: Final = "QMP input member 'arguments' must be an object"
INPUT_MEMBER_UNEXPECTED: Final = "QMP input member '%s' is unexpected"
INPUT_LACKS_EXECUTE: Final = "QMP input lacks member 'execute'"
COMMAND_NOT_FOUND_TEXT: Final = "The command %s has not been found"
# system/qdev-monitor.c qmp_command_available()
COMMAND_NEEDS_MACHINE: Final = (
    "The command '%s' is permitted only after machine initialization has completed"
)

# monitor/qmp.c monitor_qmp_dispatch() and monitor/qmp-cmds-control.c
EXPECTING_NEGOTIATION: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATION_COMPLETE: Final = "Capabilities negotiation is already complete, command ignored"
CAPABILITY_NOT_AVAILABLE: Final = "Capability %s not available"

# qobject/json-parser.c and qobject/json-streamer.c
JSON_PARSE_ERROR: Final = "JSON parse error, %s"
JSON_STRAY: Final = "JSON parse error, stray '%s'"
JSON_TOKEN_SIZE_LIMIT: Final = "JSON token size limit exceeded"
JSON_TOKEN_COUNT_LIMIT: Final = "JSON token count limit exceeded"
JSON_NESTING_LIMIT: Final = "JSON nesting depth limit exceeded"


class QMPError(Exception):
    """A command failed; reported to the client as a QMP error response.

    ``desc`` is the human-readable text (QEMU's ``error_get_pretty``);
    ``error_class`` one of :data:`QAPI_ERROR_CLASSES`, nearly always
    ``GenericError`` (QEMU's ``error_setg``).
    """

    def __init__(self, desc: str, *, error_class: str = GENERIC_ERROR) -> None:
        if error_class not in QAPI_ERROR_CLASSES:
            raise ValueError(f"unknown QAPI error class {error_class!r}")
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def __repr__(self) -> str:
        return f"QMPError({self.desc!r}, error_class={self.error_class!r})"


def error_fields(exc: BaseException) -> tuple[str, str] | None:
    """``(class, desc)`` for an exception that speaks QMP, else None.

    Duck-typed so that ``livemig.qapi`` errors need not import this package
    (the qapi layer sits below qmp).
    """
    error_class = getattr(exc, "error_class", None)
    desc = getattr(exc, "desc", None)
    if isinstance(error_class, str) and isinstance(desc, str):
        return error_class, desc
    return None
