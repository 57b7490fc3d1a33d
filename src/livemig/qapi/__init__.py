"""The QAPI layer: schema data, the one visitor, QEMU's texts, string and QemuOpts parsers.

Pure logic, no I/O: ``schema`` (QAPI types as data), ``visitor`` (QMP
values checked against them), ``errors`` (QEMU's texts, :class:`QapiError`),
``string_input`` (sizes, booleans, integers from strings), ``opts`` (QemuOpts
``k=v,...``), and the migration options built on them: QEMU 10.0's
capabilities, parameters and ``-global migration.*``.
"""

from livemig.qapi.capabilities import (
    CAPABILITIES,
    IMPLEMENTED,
    MIGRATE_SET_CAPABILITIES_ARGS,
    MIGRATION_CAPABILITY,
    Capabilities,
    caps_check,
    parse_global_capability,
)
from livemig.qapi.errors import QapiError
from livemig.qapi.global_props import apply_globals
from livemig.qapi.opts import Opts, parse_opts
from livemig.qapi.parameters import (
    DEFAULTS,
    MIGRATE_SET_PARAMETERS,
    Parameters,
    params_check,
    parse_global_parameter,
)
from livemig.qapi.string_input import parse_option_size, qapi_bool_parse, qemu_strtosz
from livemig.qapi.visitor import visit, visit_members

__all__ = [
    "CAPABILITIES",
    "DEFAULTS",
    "IMPLEMENTED",
    "MIGRATE_SET_CAPABILITIES_ARGS",
    "MIGRATE_SET_PARAMETERS",
    "MIGRATION_CAPABILITY",
    "Capabilities",
    "Opts",
    "Parameters",
    "QapiError",
    "apply_globals",
    "caps_check",
    "params_check",
    "parse_global_capability",
    "parse_global_parameter",
    "parse_opts",
    "parse_option_size",
    "qapi_bool_parse",
    "qemu_strtosz",
    "visit",
    "visit_members",
]
