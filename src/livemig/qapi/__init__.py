"""QAPI schema of migration options: capabilities, parameters, QEMU's texts.

Pure logic, no I/O: names, defaults and validation of QEMU 10.0's
``migrate-set-capabilities`` / ``migrate-set-parameters`` and of
``-global migration.*``, failing with :class:`QapiError` and QEMU's exact
error texts.
"""

from livemig.qapi.capabilities import (
    CAPABILITIES,
    IMPLEMENTED,
    Capabilities,
    caps_check,
    parse_global_capability,
)
from livemig.qapi.errors import QapiError
from livemig.qapi.global_props import apply_globals
from livemig.qapi.parameters import DEFAULTS, Parameters, params_check, parse_global_parameter

__all__ = [
    "CAPABILITIES",
    "DEFAULTS",
    "IMPLEMENTED",
    "Capabilities",
    "Parameters",
    "QapiError",
    "apply_globals",
    "caps_check",
    "params_check",
    "parse_global_capability",
    "parse_global_parameter",
]
