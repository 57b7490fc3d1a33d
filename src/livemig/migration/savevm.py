"""The SaveVMHandlers registry: which handlers a machine has, in QEMU's order.

Iterable devices first (``ram`` first, as QEMU registers it), then the
non-iterable ones, ``globalstate`` last. Section ids are list positions.
"""

from __future__ import annotations

from collections.abc import Callable

from livemig.machine.accel_vmstate import AccelHandler
from livemig.machine.cpu_vmstate import CpuHandler
from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.ram import RamLoadHandler, RamSaveHandler


def source_handlers(machine, on_sync: Callable[[int], None]) -> list[SaveVMHandlers]:
    return [RamSaveHandler(machine, on_sync),
            *(AccelHandler(dev) for dev in machine.devices.values()),
            CpuHandler(machine), GlobalStateHandler()]


def destination_handlers(machine) -> list[SaveVMHandlers]:
    return [RamLoadHandler(machine),
            *(AccelHandler(dev) for dev in machine.devices.values()),
            CpuHandler(machine), GlobalStateHandler()]


def payload_kinds(handlers: list[SaveVMHandlers]) -> dict:
    return {h.idstr: h.payload_kind for h in handlers}


def find_handler(handlers: list[SaveVMHandlers], idstr: str,
                 instance_id: int) -> SaveVMHandlers | None:
    for h in handlers:
        if h.idstr == idstr and h.instance_id == instance_id:
            return h
    return None
