"""livemig's ``-M microvm`` (machine/microvm.py) in one process, on KVM.

The machine boots the walk firmware at the reset vector (the vCPU starts at
0xfffffff0 in ``pc.bios``, the loader reads the boot sector through the
alias below 1 MiB), with QEMU's block names and sizes; its sections save from
KVM and load into a second microvm, where the walk goes on. Waits are on
serial output, with deadlines."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kvm_harness import wait_for, walk_pattern_errors

from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.kvm import WALK_BIOS_PATH, walk_bios_image
from livemig.machine.machine import Machine, MachineConfig
from livemig.machine.microvm import BIOS_BLOCK_NAME
from livemig.machine.runstate import RunState
from livemig.wire import VMStateRecord
from livemig.wire.vmstate.codec import decode

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]
START, END, RAM = 1 * MIB, 8 * MIB, 32 * MIB
TICK = 64


class Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += bytes(data)


def microvm(tmp_path, name: str, *, incoming: bool = False) -> Machine:
    guest = GuestConfig(start=START, end=END, rate_pages_per_s=0, tick_pages=TICK)
    return Machine(MachineConfig(ram_size=RAM, accel="kvm", guest=guest, machine_type="microvm",
                                 serial_path=str(tmp_path / f"{name}.serial"),
                                 incoming=incoming, start_paused=True))


def serial(tmp_path, name: str) -> bytes:
    return (tmp_path / f"{name}.serial").read_bytes()


def test_the_walk_boots_from_the_reset_vector_with_qemus_blocks(tmp_path):
    vm = microvm(tmp_path, "boot")
    try:
        assert vm.ram.idstr == "microvm.ram" and vm.ram.size == RAM
        # QEMU 10.0.2's blocks and used lengths, in its order (info ramblock)
        assert [(b.idstr, b.size) for b in vm.extra_ram] == [
            ("/rom@etc/acpi/tables", 0x1000), (BIOS_BLOCK_NAME, len(WALK_BIOS_PATH.read_bytes())),
            ("/rom@etc/table-loader", 0x1000), ("/rom@etc/acpi/rsdp", 0x1000)]
        bios = walk_bios_image(START, END, tick_pages=TICK)
        assert bytes(vm.extra_ram[1].view) == bios
        regions = {gpa: (b.idstr, off, n) for gpa, b, off, n in vm.physical_map()}
        assert regions[0xFFFF0000] == ("pc.bios", 0, 0x10000)      # ends at 4 GiB
        assert regions[0xF0000] == ("pc.bios", 0, 0x10000)         # the isa-bios alias
        vm.vm_start()
        wait_for(lambda: serial(tmp_path, "boot").count(b"B") >= 1, 20, "a 'B' from the walk")
        vm.vm_stop()
        out = serial(tmp_path, "boot")
        passes = 64 * (END - START) // 4096 // TICK
        assert out.startswith(b"A" + b"." * passes + b"B"), out[:80]
        assert walk_pattern_errors(vm.ram, START, END) == []
        assert not any(vm.ram.pages[END // 4096:, 0])
    finally:
        vm.close()


def _save(vm: Machine) -> dict[tuple[str, int], tuple[bytes, dict]]:
    out = {}
    for h in vm.vmstate_handlers():
        buf = Buffer()
        h.save_state(buf)
        out[(h.idstr, h.instance_id)] = (bytes(buf.data), h.vmstate_description())
    for h in vm.vmstate_handlers():
        h.save_cleanup()
    return out


# What moves between two saves of the same guest: clocks and the TSC.
CLOCKS = {("timer", 0), ("kvmclock", 0)}


def _comparable(key: tuple[str, int], values: dict) -> dict:
    v = copy.deepcopy(values)
    if key == ("cpu", 0):
        v["env.tsc"] = 0
    if key == ("apic", 0):
        for name in ("initial_count_load_time", "next_time", "timer_expiry"):
            v[name] = 0
    return v


def test_sections_save_from_kvm_and_load_into_another_microvm(tmp_path):
    """The source's sections (stopped after a 'B') load into an incoming microvm
    (RAM and blocks copied as the ram section would); the destination saves the
    same values back (clocks and the TSC aside) and its walk goes on from there."""
    src = microvm(tmp_path, "src")
    dst = microvm(tmp_path, "dst", incoming=True)
    try:
        src.vm_start()
        wait_for(lambda: serial(tmp_path, "src").count(b"B") >= 1, 20, "the source's walk")
        src.vm_stop()
        saved = _save(src)
        assert [k for k in saved] == [
            ("timer", 0), ("fw_cfg", 0), ("cpu_common", 0), ("cpu", 0), ("kvm-tpr-opt", 0),
            ("apic", 0), ("ioapic", 0), ("ioapic", 1), ("kvmclock", 0), ("acpi-ged", 0),
            ("serial", 0)]
        dst.ram.pages[:] = src.ram.pages
        for a, b in zip(src.extra_ram, dst.extra_ram, strict=True):
            b.pages[:] = a.pages
        handlers = dst.vmstate_handlers()
        decoded = {}
        for h in handlers:
            payload, _ = saved[(h.idstr, h.instance_id)]
            values, end = decode(h.vmsd, payload, complete=True)
            assert end == len(payload)
            decoded[(h.idstr, h.instance_id)] = values
            h.load_setup(None)
            h.load_event(VMStateRecord(h.idstr, h.version_id, values))
        for h in handlers:
            h.load_complete()
        back = _save(dst)
        for key, (_payload, desc) in saved.items():
            if key in CLOCKS:
                continue
            vmsd = next(h.vmsd for h in handlers if (h.idstr, h.instance_id) == key)
            got = decode(vmsd, back[key][0], complete=True)[0]
            assert _comparable(key, got) == _comparable(key, decoded[key]), key
            assert back[key][1] == desc, key     # the same VM description
        dst.set_runstate(RunState.PAUSED)
        before = len(serial(tmp_path, "dst"))
        dst.vm_start()
        wait_for(lambda: len(serial(tmp_path, "dst")) > before + 8, 20,
                 "the walk going on in the destination")
        dst.vm_stop()
        assert walk_pattern_errors(dst.ram, START, END) == []
    finally:
        src.close()
        dst.close()
