"""Start-up state of the migration object from ``-global migration.<prop>=<value>``.

QEMU applies every ``-global`` to the fresh migration object (later ones
win), then ``migration_object_check`` validates the result once: parameters
first, then capabilities against an all-off old set. So order between
properties does not matter (``x-switchover-ack`` may precede
``x-return-path``), unlike a sequence of QMP commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from livemig.qapi.capabilities import (
    CAPABILITIES,
    GLOBAL_PROPERTY,
    Capabilities,
    caps_check,
    parse_global_capability,
)
from livemig.qapi.parameters import Parameters, params_check, parse_global_parameter


def apply_globals(
    pairs: Iterable[tuple[str, str]],
) -> tuple[Capabilities, Parameters, list[str]]:
    """Build ``(capabilities, parameters, warnings)`` from ``(prop, value)`` pairs.

    ``prop`` is the part after ``migration.``. Raises :class:`QapiError` with
    QEMU's text for the first bad property or broken rule.
    """
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {}
    for prop, value in pairs:
        if prop in GLOBAL_PROPERTY:
            cap, state = parse_global_capability(prop, value)
            caps[cap] = state
        else:
            param, typed = parse_global_parameter(prop, value)
            params[param] = typed
    capabilities, parameters = Capabilities(caps), Parameters(params)
    params_check(parameters.as_qmp(), caps=capabilities.as_dict())
    warnings = caps_check(dict.fromkeys(CAPABILITIES, False), capabilities.as_dict(),
                          incoming_started=False, params=parameters.as_qmp())
    return capabilities, parameters, warnings
