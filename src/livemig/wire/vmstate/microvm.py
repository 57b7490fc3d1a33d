"""QEMU 10.0's ``-M microvm`` sections: which device each section id
(``idstr``) is, its VMState description, and one call to decode or encode a
payload by its section header.

The set is what ``-M microvm,x-option-roms=off,pit=off,pic=off,rtc=off
-accel kvm`` writes (issue 16): ``timer``, ``fw_cfg``, ``cpu_common``,
``cpu``, ``kvm-tpr-opt``, ``apic``, ``ioapic`` (instances 0 and 1),
``kvmclock``, ``acpi-ged``, ``serial`` (with the ISA serial) and
``globalstate``, besides ``ram``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import unknown_section_text
from .codec import Values, VMStateDescription, VMStateError, decode, describe, encode
from .cpu import CPU
from .devices import (
    ACPI_GED,
    APIC,
    CPU_COMMON,
    FW_CFG,
    GLOBALSTATE,
    IOAPIC,
    KVM_TPR_OPT,
    KVMCLOCK,
    SERIAL,
    TIMER,
    MicrovmConfig,
)

MICROVM_SECTIONS: Mapping[str, VMStateDescription] = {
    d.name: d for d in (TIMER, FW_CFG, CPU_COMMON, CPU, KVM_TPR_OPT, APIC, IOAPIC, KVMCLOCK,
                        ACPI_GED, SERIAL, GLOBALSTATE)
}
# Section idstrs in QEMU's registration order, with their instance ids.
MICROVM_SECTION_ORDER: tuple[tuple[str, int], ...] = (
    ("timer", 0), ("fw_cfg", 0), ("cpu_common", 0), ("cpu", 0), ("kvm-tpr-opt", 0),
    ("apic", 0), ("ioapic", 0), ("ioapic", 1), ("kvmclock", 0), ("acpi-ged", 0),
    ("serial", 0), ("globalstate", 0),
)
DEFAULT_CONFIG = MicrovmConfig()


def section_description(idstr: str, instance_id: int = 0) -> VMStateDescription:
    try:
        return MICROVM_SECTIONS[idstr]
    except KeyError:
        raise VMStateError(unknown_section_text(idstr, instance_id), 0) from None


def decode_section(idstr: str, version_id: int, data: bytes | bytearray | memoryview,
                   offset: int = 0, instance_id: int = 0, *, complete: bool = False
                   ) -> tuple[Values, int]:
    """Decode the payload of section ``idstr`` sent at ``version_id``
    (``complete``: the buffer ends where the payload does; see codec.decode)."""
    return decode(section_description(idstr, instance_id), data, offset, version_id,
                  complete=complete)


def encode_section(idstr: str, values: Mapping[str, Any],
                   config: MicrovmConfig = DEFAULT_CONFIG) -> bytes:
    return encode(section_description(idstr), values, config)


def describe_section(idstr: str, instance_id: int, values: Mapping[str, Any],
                     config: MicrovmConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """The entry of QEMU's VM description JSON for this section."""
    return {"name": idstr, "instance_id": instance_id,
            **describe(section_description(idstr), values, config)}
