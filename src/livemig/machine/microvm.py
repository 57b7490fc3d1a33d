"""QEMU's ``microvm`` machine in livemig: the same RAM blocks, the same device
sections, so a QEMU 10.0 microvm guest migrates in and out (issue 16).

The machine QEMU 10.0 builds for ``-M microvm,x-option-roms=off,pit=off,
pic=off,rtc=off -accel kvm``, as far as a guest can see it and a migration
stream carries it:

- RAM ``microvm.ram`` at guest-physical 0 (up to 3 GiB: no RAM above 4 GiB
  here), the firmware ``pc.bios`` (``-bios``, default the walk firmware)
  read-only below 4 GiB and its last 128 KiB (at most) aliased below 1 MiB
  (QEMU's ``isa-bios``), and the fw_cfg ROM blocks QEMU's ACPI build makes
  (``/rom@etc/acpi/tables``, ``/rom@etc/table-loader``, ``/rom@etc/acpi/rsdp``:
  migrated with QEMU's sizes, never mapped for the guest);
- one vCPU on KVM with the in-kernel irqchip (LAPIC, IOAPIC at 0xfec00000)
  and kvmclock;
- COM1 (``isa-serial``, on unless ``isa-serial=off``) when a ``-serial`` is given.

Each of QEMU's sections is a :class:`MicrovmSection` with QEMU's idstr,
instance id and version, its payload encoded and decoded field by field
(``livemig.wire.vmstate``). What KVM holds goes through KVM (``cpu``,
``cpu_common``, ``apic``, ``ioapic`` 0, ``kvmclock``:
``machine/kvm_cpu_vmstate.py``, ``machine/kvm_vmstate.py``). The devices
livemig does not model -- fw_cfg, the TPR-patching ``kvm-tpr-opt``, the second
(userspace) IOAPIC with nothing wired to it, the ACPI GED, COM1's 16550
registers (livemig's COM1 only transmits) -- are *held*: loaded values are kept
and sent on as they came; a guest that started in livemig sends what QEMU's
reset leaves there. ``timer`` carries QEMU's virtual clock (ns) and ticks:
livemig keeps a virtual clock that runs with the host's monotonic clock (also
while stopped, where QEMU's stands still), which the LAPIC timer's times are
counted in.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any

from livemig.machine.guest import GuestConfig
from livemig.machine.ram import RamBlock
from livemig.machine.vmstate import OutStream, SaveVMHandlers
from livemig.wire import PayloadKind, VMStateRecord
from livemig.wire.vmstate.codec import Values, default_values, describe, encode
from livemig.wire.vmstate.devices import IOAPIC_NUM_PINS, MicrovmConfig
from livemig.wire.vmstate.microvm import MICROVM_SECTION_ORDER, MICROVM_SECTIONS

MICROVM_MACHINE = "microvm"
RAM_BLOCK_NAME = "microvm.ram"
BIOS_BLOCK_NAME = "pc.bios"
# QEMU 10.0.2's fw_cfg ROM blocks for this machine, used lengths (``info ramblock``;
# QEMU may grow the first two to 2 MiB and 64 KiB).
ROM_BLOCKS: tuple[tuple[str, int], ...] = (
    ("/rom@etc/acpi/tables", 0x1000),
    ("/rom@etc/table-loader", 0x1000),
    ("/rom@etc/acpi/rsdp", 0x1000),
)
LOWMEM_MAX = 3 << 30            # RAM below the 32-bit PCI hole; nothing above 4 GiB here
ISA_BIOS_END = 0x100000
ISA_BIOS_MAX = 128 * 1024
BIOS_MAX = 16 << 20
FOUR_GIB = 1 << 32
CONFIG = MicrovmConfig()
_IOREDTBL_MASKED = 1 << 16


@dataclass(frozen=True)
class MicrovmOptions:
    """``-M microvm,...``: what livemig honours of QEMU's properties (the others
    must be what livemig has: ``x-option-roms=off,pit=off,pic=off,rtc=off``)."""

    isa_serial: bool = True
    ioapic2: bool = True


def check_ram_size(size: int) -> None:
    if size > LOWMEM_MAX:
        raise ValueError(f"livemig's microvm takes at most {LOWMEM_MAX >> 30} GiB of RAM "
                         f"(-m {size >> 20}M): it has no RAM above 4 GiB")


def firmware_image(path: str | None, guest: GuestConfig) -> bytes:
    """``-bios PATH``, or the walk firmware patched for ``guest`` (walk-bios.bin)."""
    if path is None:
        from livemig.machine.kvm import walk_bios_image
        return walk_bios_image(guest.start, guest.end, tick_pages=guest.tick_pages,
                               pace=guest.pace_cycles)
    try:
        with open(path, "rb") as f:
            data = f.read(BIOS_MAX + 1)
    except OSError as exc:
        raise ValueError(f"could not load PC BIOS '{path}': {exc.strerror}") from None
    if not data or len(data) % 65536 or len(data) > BIOS_MAX:
        raise ValueError(f"could not load PC BIOS '{path}'")   # QEMU's x86_bios_rom_init text
    return data


class MicrovmMemory:
    """The blocks and the guest-physical map."""

    def __init__(self, ram: RamBlock, bios: bytes) -> None:
        check_ram_size(ram.size)
        self.ram = ram
        self.bios = RamBlock(BIOS_BLOCK_NAME, len(bios))
        self.bios.write(0, bios)
        self.roms = [RamBlock(name, size) for name, size in ROM_BLOCKS]

    def extra_blocks(self) -> list[RamBlock]:
        """The blocks besides RAM, in QEMU's order (its block list in the ``ram`` section)."""
        return [self.roms[0], self.bios, *self.roms[1:]]

    def slots(self) -> list[Any]:
        from livemig.machine.kvm import MemorySlot
        isa = min(self.bios.size, ISA_BIOS_MAX)
        hole = ISA_BIOS_END - isa
        out = [MemorySlot(0, self.ram, 0, min(hole, self.ram.size))]
        if self.ram.size > ISA_BIOS_END:
            out.append(MemorySlot(ISA_BIOS_END, self.ram, ISA_BIOS_END,
                                  self.ram.size - ISA_BIOS_END))
        out.append(MemorySlot(hole, self.bios, self.bios.size - isa, isa, readonly=True))
        out.append(MemorySlot(FOUR_GIB - self.bios.size, self.bios, 0, self.bios.size,
                              readonly=True))
        return out

    def close(self) -> None:
        for block in self.extra_blocks():
            block.close()


def reset_values(serial: bool, ioapic2: bool) -> dict[tuple[str, int], Values]:
    """QEMU 10.0.2's values of the held sections after reset (read from its
    streams): what a guest that started in livemig sends."""
    out: dict[tuple[str, int], Values] = {}
    out[("timer", 0)] = {"cpu_ticks_offset": 0, "cpu_clock_offset": 0}
    fw = default_values(MICROVM_SECTIONS["fw_cfg"])
    fw["fw_cfg/dma"] = {"dma_addr": 0}
    # the sizes of QEMU's ACPI blobs in those blocks (its -S microvm stream)
    fw["fw_cfg/acpi_mr"] = {"table_mr_size": 699, "linker_mr_size": 1664, "rsdp_mr_size": 36}
    out[("fw_cfg", 0)] = fw
    out[("kvm-tpr-opt", 0)] = default_values(MICROVM_SECTIONS["kvm-tpr-opt"])
    if ioapic2:
        out[("ioapic", 1)] = {"id": 0, "ioregsel": 0, "irr": 0,
                              "ioredtbl": [_IOREDTBL_MASKED] * IOAPIC_NUM_PINS}
    ged = default_values(MICROVM_SECTIONS["acpi-ged"])
    ged["acpi-ged/memhp"] = {"memhp_state": {"selector": 0, "devs": []}}
    out[("acpi-ged", 0)] = ged
    if serial:
        state = {"divider": 0x0C, "rbr": 0, "ier": 0, "iir": 0x01, "lcr": 0, "mcr": 0x08,
                 "lsr": 0x60, "msr": 0xB0, "scr": 0, "fcr_vmstate": 0}
        out[("serial", 0)] = {"state": state}
    return out


class MicrovmState:
    """The sections' values of one microvm: read from KVM at save, put into KVM
    at load, the held ones kept. Thread-safe enough for one migration at a time
    (the migration or load thread; the vCPU paused)."""

    def __init__(self, accel: Any, options: MicrovmOptions, serial: bool) -> None:
        from livemig.machine.kvm_cpu_vmstate import reset_template
        self.accel = accel
        self.options = options
        self.keys = [k for k in MICROVM_SECTION_ORDER if k[0] != "globalstate"
                     and (k[0] != "serial" or (serial and options.isa_serial))
                     and (k != ("ioapic", 1) or options.ioapic2)]
        self.held = reset_values(serial and options.isa_serial, options.ioapic2)
        self.cpu_template: Values = reset_template()
        self.apic_next_time = 0
        self._lock = threading.Lock()
        self._clock_offset = -time.monotonic_ns()      # QEMU's virtual clock from 0
        self._ticks_offset = 0.0
        self._saved: dict[tuple[str, int], Values] | None = None
        self.incoming: dict[tuple[str, int], Values] = {}

    # -- QEMU's virtual clock ----------------------------------------------------------
    def virtual_ns(self) -> int:
        return time.monotonic_ns() + self._clock_offset

    def ticks(self) -> int:
        from livemig.machine.tsc import tsc_hz
        return int(self._ticks_offset + time.monotonic_ns() * tsc_hz() / 1e9)

    # -- save --------------------------------------------------------------------------
    def saved(self, key: tuple[str, int]) -> Values:
        """The values of section ``key`` for this migration, all read at the first
        call (the vCPU is stopped then; the devices are read together)."""
        with self._lock:
            if self._saved is None:
                self._saved = self._collect()
            return self._saved[key]

    def save_done(self) -> None:
        with self._lock:
            self._saved = None

    def _collect(self) -> dict[tuple[str, int], Values]:
        from livemig.machine.kvm_abi import KVM_MP_STATE_HALTED
        from livemig.machine.kvm_cpu_vmstate import cpu_values
        from livemig.machine.kvm_vmstate import apic_values, ioapic_values, kvmclock_values
        a = self.accel
        now = self.virtual_ns()
        out = copy.deepcopy(self.held)
        out[("timer", 0)] = {"cpu_ticks_offset": self.ticks(), "cpu_clock_offset": now}
        kvm_cpu = a.get_kvm_cpu()
        out[("cpu", 0)] = cpu_values(kvm_cpu, self.cpu_template)
        out[("cpu_common", 0)] = {"halted": int(kvm_cpu.mp_state == KVM_MP_STATE_HALTED),
                                  "interrupt_request": 0}
        apic = apic_values(a.get_lapic(), a.apic_base(), now, next_time=self.apic_next_time)
        out[("apic", 0)] = apic
        out[("ioapic", 0)] = ioapic_values(a.get_ioapic())
        clock = kvmclock_values(a.get_clock())
        # QEMU's clock_is_reliable is KVM's capability (KVM_CAP_ADJUST_CLOCK has
        # KVM_CLOCK_TSC_STABLE), not the flags of one reading.
        clock["kvmclock/clock_is_reliable"] = {"clock_is_reliable": a.clock_reliable()}
        out[("kvmclock", 0)] = clock
        return out

    # -- load --------------------------------------------------------------------------
    def load(self, key: tuple[str, int]) -> None:
        """Put what came for section ``key`` into KVM (or keep it): called in
        section order once the whole stream is in (ValueError: refused)."""
        values = self.incoming.get(key)
        if values is None:
            return
        idstr = key[0]
        a = self.accel
        if idstr == "cpu":
            from livemig.machine.kvm_cpu_vmstate import load_kvm_state
            st = load_kvm_state(values, a.get_kvm_cpu())
            apic = self.incoming.get(("apic", 0))
            if apic is not None:        # QEMU's kvm_put_sregs: the base and TPR from the APIC
                st.sregs.apic_base = apic["apicbase"]
                st.sregs.cr8 = apic["tpr"] >> 4
            a.set_kvm_cpu(st)
            self.cpu_template = copy.deepcopy(values)
        elif idstr == "apic":
            from livemig.machine.kvm_vmstate import lapic_regs
            a.set_lapic(lapic_regs(values))
            self.apic_next_time = values["next_time"]
        elif key == ("ioapic", 0):
            from livemig.machine.kvm_vmstate import kvm_ioapic
            a.set_ioapic(kvm_ioapic(values))
        elif idstr == "kvmclock":
            a.set_clock(values["clock"])
        elif idstr == "timer":
            self._clock_offset = values["cpu_clock_offset"] - time.monotonic_ns()
            from livemig.machine.tsc import tsc_hz
            self._ticks_offset = values["cpu_ticks_offset"] - time.monotonic_ns() * tsc_hz() / 1e9
            self.held[key] = values
        elif idstr == "cpu_common":
            if values.get("cpu_common/crash_occurred", {}).get("crash_occurred"):
                raise ValueError("cpu_common: the guest crashed (crash_occurred) on the source")
        else:
            self.held[key] = copy.deepcopy(values)

    def handlers(self) -> list[SaveVMHandlers]:
        return [MicrovmSection(self, idstr, instance) for idstr, instance in self.keys]


# QEMU 10.0.2's section ids for this machine (its registration order: id 2 is a
# handler that sends nothing here); the engine's ram is 1, globalstate the next.
QEMU_SECTION_IDS = {("timer", 0): 0, ("fw_cfg", 0): 3, ("cpu_common", 0): 4, ("cpu", 0): 5,
                    ("kvm-tpr-opt", 0): 6, ("apic", 0): 7, ("ioapic", 0): 8, ("ioapic", 1): 9,
                    ("kvmclock", 0): 10, ("acpi-ged", 0): 11, ("serial", 0): 12}
RAM_SECTION_ID = 1


class MicrovmSection(SaveVMHandlers):
    """One of QEMU's microvm sections (a FULL section, saved with the guest stopped)."""

    payload_kind = PayloadKind.VMSTATE

    def __init__(self, state: MicrovmState, idstr: str, instance_id: int) -> None:
        self.state = state
        self.idstr, self.instance_id = idstr, instance_id
        self.section_id = QEMU_SECTION_IDS[(idstr, instance_id)]
        self.desc = self.vmsd = MICROVM_SECTIONS[idstr]
        self.version_id = self.desc.version_id
        self._last: Values | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.idstr, self.instance_id)

    def save_state(self, out: OutStream) -> None:
        self._last = self.state.saved(self.key)
        out.write(encode(self.desc, self._last, CONFIG))

    def vmstate_description(self) -> dict[str, Any] | None:
        if self._last is None:
            return None
        return describe(self.desc, self._last, CONFIG)

    def save_cleanup(self) -> None:
        self.state.save_done()

    def load_setup(self, ctx: Any) -> None:
        self.state.incoming.pop(self.key, None)

    def load_event(self, event: Any) -> None:
        if isinstance(event, VMStateRecord):
            self.state.incoming[self.key] = event.values

    def load_complete(self) -> None:
        self.state.load(self.key)
