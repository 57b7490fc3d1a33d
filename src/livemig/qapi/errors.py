"""QEMU's error texts (one table) and the one exception family for QAPI errors.

Every QEMU message template livemig reproduces is defined here, once, with
the QEMU file it comes from; ``livemig.qmp.errors`` re-exports them. A
:class:`QapiError` carries what a QMP error response needs (``error_class``
and ``desc``), so the QMP front can report it without this layer importing
``livemig.qmp`` (which sits above it).
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

# include/qapi/qmp/qerror.h, qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c
MISSING_PARAMETER: Final = "Parameter '%s' is missing"
UNEXPECTED_PARAMETER: Final = "Parameter '%s' is unexpected"
INVALID_PARAMETER: Final = "Invalid parameter '%s'"
INVALID_PARAMETER_TYPE: Final = "Invalid parameter type for '%s', expected: %s"
INVALID_PARAMETER_VALUE: Final = "Parameter '%s' expects %s"
INVALID_ENUM_VALUE: Final = "Parameter '%s' does not accept value '%s'"

# util/qemu-option.c parse_option_size(), qapi/qapi-util.c qapi_bool_parse()
SIZE_EXPECTED: Final = "a non-negative number below 2^64"
SIZE_OUT_OF_RANGE: Final = "Value '%s' is out of range for parameter '%s'"
BOOL_EXPECTED: Final = "'on' or 'off'"
NUMBER_EXPECTED: Final = "a number"
# util/keyval.c (-machine) and util/qemu-option.c
EXPECTED_EQUALS: Final = "Expected '=' after parameter '%s'"

# strerror() texts QEMU appends (qemu_strtosz's -EINVAL / -ERANGE)
EINVAL_TEXT: Final = "Invalid argument"
ERANGE_TEXT: Final = "Numerical result out of range"

# qom/object.c object_apply_global_props() and object_property_find_err()
GLOBAL_PREFIX: Final = "can't apply global migration.%s=%s: "
PROPERTY_NOT_FOUND: Final = "Property 'migration.%s' not found"

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

# migration/options.c migrate_caps_check() / migrate_params_check() / setters
MIGRATION_IN_PROGRESS: Final = "There's a migration process in progress"
ZERO_COPY_NEEDS_PLAIN_MULTIFD: Final = (
    "Zero copy only available for non-compressed non-TLS multifd migration"
)
MAPPED_RAM_NEEDS_PLAIN_MULTIFD: Final = (
    "Mapped-ram only available for non-compressed non-TLS multifd migration"
)

# migration/migration.c qemu_start_incoming_migration() / qmp_migrate()
NEED_URI_OR_CHANNELS: Final = "need either 'uri' or 'channels' argument"
INCOMING_ONE_CHANNEL: Final = "Channel list must have only one entry, for type 'main'"
MULTIFD_NEEDS_SOCKET: Final = "Migration requires multi-channel URIs (e.g. tcp)"
INCOMING_ALREADY_STARTED: Final = "The incoming migration has already been started"
INCOMING_NOT_SPECIFIED: Final = "'-incoming' was not specified on the command line"
# migration/migration.c qmp_migrate_cancel() (QEMU 10.0: refused in migration_in_postcopy())
POSTCOPY_CANNOT_CANCEL: Final = "Postcopy migration in progress, cannot cancel."

# livemig's own refusals, for what QEMU has and livemig does not implement.
CAPABILITY_NOT_SUPPORTED: Final = "Capability '%s' is not supported by livemig"
BBM_NOT_SUPPORTED: Final = "Parameter 'block-bitmap-mapping' is not supported by livemig"


class QapiError(Exception):
    """A QAPI-level refusal, with QEMU's exact text in ``desc``.

    ``error_class`` is a QMP error class; QEMU's ``error_setg`` (and so every
    check in this package) uses ``GenericError``. ``errno`` is set where QEMU
    works with an errno (``qemu_strtosz``: EINVAL or ERANGE), else None.
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR,
                 errno: int | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        self.errno = errno

    def __str__(self) -> str:
        return self.desc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.desc!r}, error_class={self.error_class!r})"

    def prefixed(self, prefix: str) -> QapiError:
        """The same error with ``prefix`` before the text (QEMU's ``error_prepend``)."""
        return QapiError(prefix + self.desc, self.error_class, self.errno)
