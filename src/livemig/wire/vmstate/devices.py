"""The layouts of QEMU 10.0's microvm device sections (all but ``cpu``).

Facts from QEMU's sources and from what QEMU 10.0.2 writes here
(``-dump-vmstate`` and the VM description at the end of a ``migrate
file:`` stream of ``-M microvm``; ``tests/unit/test_vmstate_qemu.py``
compares :func:`codec.describe` with that description field by field).
Each ``needed`` rule is QEMU's, over the device's values and its
configuration (:class:`MicrovmConfig`), which says what QEMU decides from
the machine and the device's properties rather than from migrated state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..global_state import GLOBAL_STATE_FIELDS, GLOBAL_STATE_VERSION
from .codec import VMStateDescription, VMStateField, fields, simple, subsection, u64s

F = VMStateField


@dataclass(frozen=True)
class MicrovmConfig:
    """What QEMU's ``needed`` rules read besides migrated state, as QEMU
    10.0's ``-M microvm -accel kvm`` with its default CPU (qemu64) sets it."""

    fw_cfg_dma: bool = True              # fw_cfg/dma: microvm's fw_cfg has DMA
    fw_cfg_acpi_mr_restore: bool = True  # fw_cfg/acpi_mr: on since the 2.12 machines
    tcg: bool = False                    # cpu_common/exception_index, cpu/svm_guest
    kvmclock_reliable: bool = True       # kvmclock/clock_is_reliable: on since 2.9
    save_tsc_khz: bool = True            # cpu/tsc_khz: X86MachineClass.save_tsc_khz
    migrate_smi_count: bool = True       # cpu/msr_smi_count: x-migrate-smi-count
    enable_lmce: bool = False            # cpu/mcg_ext_ctl: lmce=off
    hyperv_runtime: bool = False         # cpu/msr_hyperv_runtime: hv-runtime=off
    xen_emulate: bool = False            # cpu/xen_vcpu: xen-version unset
    # CPUID features the cpu subsections test (qemu64 has none of them):
    # tsx-ctrl, sgx-lc, xfd, fred, amx-tile, arch-lbr, svm-tsc-scale.
    cpu_features: frozenset[str] = frozenset()


def _config(cfg: Any) -> MicrovmConfig:
    return cfg if isinstance(cfg, MicrovmConfig) else MicrovmConfig()


# -- timer (system/cpu-timers.c) -------------------------------------------------------------
# Its one subsection, timer/icount, is sent only with -icount (TCG): not
# described, so a stream carrying it is refused as an unknown subsection.
TIMER = simple("timer", 2, (
    F("cpu_ticks_offset", "int64"),
    F("unused", "unused_buffer", 8),
    F("cpu_clock_offset", "int64", since=2),
), minimum=1)

# -- fw_cfg (hw/nvram/fw_cfg.c) --------------------------------------------------------------
FW_CFG_DMA = simple("fw_cfg/dma", 0, fields(("dma_addr", "uint64")),
                    needed=lambda v, c: _config(c).fw_cfg_dma)
FW_CFG_ACPI_MR = simple("fw_cfg/acpi_mr", 1, u64s("table_mr_size", "linker_mr_size",
                                                   "rsdp_mr_size"),
                        needed=lambda v, c: _config(c).fw_cfg_acpi_mr_restore)
FW_CFG = simple("fw_cfg", 2, (
    F("cur_entry", "uint16"),
    # Version 1 had a 16-bit offset (VMSTATE_UINT16_HACK, is_version_1);
    # the vmdesc numbers the second field of the same name.
    F("cur_offset", "uint16", exists=lambda v: v == 1),
    F("cur_offset[1]", "uint32", since=2),
), minimum=1, subsections=(FW_CFG_DMA, FW_CFG_ACPI_MR))

# -- cpu_common (cpu-target.c) ---------------------------------------------------------------
CPU_COMMON_EXCEPTION_INDEX = subsection(
    "cpu_common/exception_index", fields(("exception_index", "int32")),
    lambda own, v, c: _config(c).tcg and own["exception_index"] != -1,
    defaults={"exception_index": -1})
CPU_COMMON_CRASH_OCCURRED = subsection(
    "cpu_common/crash_occurred", fields(("crash_occurred", "bool")),
    lambda own, v, c: bool(own["crash_occurred"]))
CPU_COMMON = simple("cpu_common", 1, fields(("halted", "uint32"),
                                            ("interrupt_request", "uint32")),
                    subsections=(CPU_COMMON_EXCEPTION_INDEX, CPU_COMMON_CRASH_OCCURRED))

# -- kvm-tpr-opt (hw/i386/kvmvapic.c) --------------------------------------------------------
KVMVAPIC_HANDLERS = simple("kvmvapic-handlers", 1, fields(
    ("set_tpr", "uint32"), ("set_tpr_eax", "uint32"), ("get_tpr", "uint32", 8),
    ("get_tpr_stack", "uint32")))
KVMVAPIC_GUEST_ROM = simple("kvmvapic-guest-rom", 1, (
    F("unused", "unused_buffer", 8),         # the ROM's signature
    *fields(("vaddr", "uint32"), ("fixup_start", "uint32"), ("fixup_end", "uint32"),
            ("vapic_vaddr", "uint32"), ("vapic_size", "uint32"), ("vcpu_shift", "uint32"),
            ("real_tpr_addr", "uint32")),
    F("up", "struct", struct=KVMVAPIC_HANDLERS),
    F("mp", "struct", struct=KVMVAPIC_HANDLERS),
))
KVM_TPR_OPT = simple("kvm-tpr-opt", 1, (
    F("rom_state", "struct", struct=KVMVAPIC_GUEST_ROM),
    *fields(("state", "uint32"), ("real_tpr_addr", "uint32"), ("rom_state_vaddr", "uint32"),
            ("vapic_paddr", "uint32"), ("rom_state_paddr", "uint32")),
))

# -- apic (hw/intc/apic_common.c) ------------------------------------------------------------
APIC_SIPI = subsection("apic_sipi", fields(("sipi_vector", "int32"), ("wait_for_sipi", "int32")),
                       lambda own, v, c: own["wait_for_sipi"] != 0)
APIC = simple("apic", 3, fields(
    ("apicbase", "uint32"), ("id", "uint8"), ("arb_id", "uint8"), ("tpr", "uint8"),
    ("spurious_vec", "uint32"), ("log_dest", "uint8"), ("dest_mode", "uint8"),
    ("isr", "uint32", 8), ("tmr", "uint32", 8), ("irr", "uint32", 8), ("lvt", "uint32", 6),
    ("esr", "uint32"), ("icr", "uint32", 2), ("divide_conf", "uint32"),
    ("count_shift", "int32"), ("initial_count", "uint32"),
    ("initial_count_load_time", "int64"), ("next_time", "int64"), ("timer_expiry", "int64"),
), subsections=(APIC_SIPI,))

# -- ioapic (hw/intc/ioapic_common.c): two instances on microvm ---------------------------------
IOAPIC_NUM_PINS = 24
IOAPIC = simple("ioapic", 3, (
    F("id", "uint8"), F("ioregsel", "uint8"),
    F("unused", "unused_buffer", 8, since=2),      # qemu-kvm's v2 format
    F("irr", "uint32", since=2),
    F("ioredtbl", "uint64", count=IOAPIC_NUM_PINS),
), minimum=1)

# -- kvmclock (hw/i386/kvm/clock.c) ----------------------------------------------------------
KVMCLOCK_RELIABLE = simple("kvmclock/clock_is_reliable", 1,
                           fields(("clock_is_reliable", "bool")),
                           needed=lambda v, c: _config(c).kvmclock_reliable)
KVMCLOCK = simple("kvmclock", 1, fields(("clock", "uint64")), subsections=(KVMCLOCK_RELIABLE,))

# -- acpi-ged (hw/acpi/generic_event_device.c, hw/acpi/memory_hotplug.c) ---------------------
# memhp is always sent; its per-slot array (devs) has one element per DIMM
# slot: microvm without -m slots=N has none (MEMHP_SLOTS), and slots are not
# supported here. acpi-ged/cpuhp is sent only where the machine has
# hotpluggable CPUs (microvm has not): not described, refused as unknown.
MEMHP_SLOTS = 0
MEMORY_HOTPLUG_DEVICE = simple("memory hotplug device state", 1, fields(
    ("is_enabled", "bool"), ("is_inserting", "bool"), ("ost_event", "uint32"),
    ("ost_status", "uint32")))
MEMORY_HOTPLUG = simple("memory hotplug state", 1, (
    F("selector", "uint32"),
    F("devs", "struct", count=MEMHP_SLOTS, struct=MEMORY_HOTPLUG_DEVICE),
))
ACPI_GED_MEMHP = simple("acpi-ged/memhp", 1, (F("memhp_state", "struct", struct=MEMORY_HOTPLUG,
                                                since=1),))
ACPI_GHES = simple("acpi-ghes", 1, fields(("hw_error_le", "uint64")))
ACPI_GED_GHES = subsection("acpi-ged/ghes", (F("ghes_state", "struct", struct=ACPI_GHES, since=1),),
                           lambda own, v, c: own["ghes_state"]["hw_error_le"] != 0)
ACPI_GED_STATE = simple("acpi-ged-state", 1, fields(("sel", "uint32")))
ACPI_GED = simple("acpi-ged", 1, (F("ged_state", "struct", struct=ACPI_GED_STATE, since=1),),
                  subsections=(ACPI_GED_MEMHP, ACPI_GED_GHES))

# -- globalstate (migration/global_state.c): the layout of wire/global_state.py ---------------
GLOBALSTATE = simple("globalstate", GLOBAL_STATE_VERSION, tuple(
    F(name, kind, size) for name, kind, size in GLOBAL_STATE_FIELDS))

# -- serial (hw/char/serial.c, serial-isa.c): the 16550 of COM1 ----------------------------------
UART_FIFO_LENGTH = 16
UART_IER_THRI = 0x02
UART_IIR_ID = 0x06
UART_IIR_THRI = 0x02
FIFO8 = simple("Fifo8", 1, (
    F("data", "buffer", UART_FIFO_LENGTH, since=1),   # VMSTATE_VBUFFER_UINT32: capacity bytes
    F("head", "uint32"), F("num", "uint32"),
))


def _thr_ipending_needed(v: dict[str, Any], c: Any) -> bool:
    # Sent only where the interrupt state cannot be recomputed from IER/IIR;
    # not sent, it is what QEMU's post_load recomputes (so never needed).
    got = v.get(SERIAL_THR_IPENDING.name)
    if got is None or not v["ier"] & UART_IER_THRI:
        return False
    expected = (v["iir"] & UART_IIR_ID) == UART_IIR_THRI
    return bool(got["thr_ipending"] != int(expected))


SERIAL_THR_IPENDING = simple("serial/thr_ipending", 1, fields(("thr_ipending", "int32")),
                             needed=_thr_ipending_needed)
SERIAL_TSR = subsection("serial/tsr", fields(("tsr_retry", "uint32"), ("thr", "uint8"),
                                             ("tsr", "uint8")),
                        lambda own, v, c: own["tsr_retry"] != 0)


def _fifo(name: str) -> VMStateDescription:
    """serial/recv_fifo, serial/xmit_fifo: sent while the FIFO holds bytes."""
    return subsection(f"serial/{name}", (F(name, "struct", struct=FIFO8, since=1),),
                      lambda own, v, c: own[name]["num"] != 0)


SERIAL_RECV_FIFO = _fifo("recv_fifo")
SERIAL_XMIT_FIFO = _fifo("xmit_fifo")
SERIAL_FIFO_TIMEOUT_TIMER = subsection(
    "serial/fifo_timeout_timer", fields(("fifo_timeout_timer", "timer")),
    lambda own, v, c: own["fifo_timeout_timer"] != -1, defaults={"fifo_timeout_timer": -1})
SERIAL_TIMEOUT_IPENDING = subsection(
    "serial/timeout_ipending", fields(("timeout_ipending", "int32")),
    lambda own, v, c: own["timeout_ipending"] != 0)
SERIAL_POLL = subsection("serial/poll", fields(("poll_msl", "int32"),
                                               ("modem_status_poll", "timer")),
                         lambda own, v, c: own["poll_msl"] >= 0,
                         defaults={"poll_msl": -1, "modem_status_poll": -1})
SERIAL_STATE = simple("serial", 3, (
    F("divider", "uint16", since=2),
    *fields(("rbr", "uint8"), ("ier", "uint8"), ("iir", "uint8"), ("lcr", "uint8"),
            ("mcr", "uint8"), ("lsr", "uint8"), ("msr", "uint8"), ("scr", "uint8")),
    F("fcr_vmstate", "uint8", since=3),
), minimum=2, subsections=(SERIAL_THR_IPENDING, SERIAL_TSR, SERIAL_RECV_FIFO, SERIAL_XMIT_FIFO,
                           SERIAL_FIFO_TIMEOUT_TIMER, SERIAL_TIMEOUT_IPENDING, SERIAL_POLL))
SERIAL = simple("serial", 3, (F("state", "struct", struct=SERIAL_STATE),), minimum=2)
