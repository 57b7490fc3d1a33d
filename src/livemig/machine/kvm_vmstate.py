"""KVM's in-kernel LAPIC, IOAPIC and clock as QEMU's ``apic``, ``ioapic`` and
``kvmclock`` section values (livemig.wire.vmstate), both ways, pure.

QEMU's kvm-apic, kvm-ioapic and kvmclock keep their state in the kernel and
convert it at each save and load; these are the same conversions, written
from the register layouts (the LAPIC page: register N at byte N * 16, as the
SDM numbers them; ``struct kvm_ioapic_state``; ``struct kvm_clock_data``):

- the LAPIC: ID (0x2, bits 31:24), TPR (0x8), APR (0x9, QEMU's ``arb_id``),
  LDR (0xd) and DFR (0xe) top bits, SVR (0xf), ISR/TMR/IRR (0x10/0x18/0x20,
  eight words each), ESR (0x28), ICR (0x30, 0x31), the six LVTs
  (0x32..0x37), the timer's initial count (0x38) and divide configuration
  (0x3e, with QEMU's ``count_shift`` derived from it). The timer's times are
  QEMU's virtual clock's, taken at save (``now_ns``), with QEMU's
  ``apic_next_timer`` rule for the next expiry. Loading writes what QEMU's
  ``kvm_put_apic_state`` writes (the APR and the current count are KVM's).
- the IOAPIC: id, ioregsel, irr and the 24 redirection entries as they are;
  loading also places it at ``IOAPIC_BASE``.
- kvmclock: the clock in ns; ``clock_is_reliable`` when KVM says its clock is
  TSC-stable (KVM_CLOCK_TSC_STABLE).
"""

from __future__ import annotations

import struct
from typing import Any

from livemig.machine import kvm_abi as abi

APIC_LVT_NB = 6
APIC_LVT_TIMER = 0
APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_PERIODIC = 1 << 17
IOAPIC_BASE = 0xFEC00000
_REG = struct.Struct("<I")


def _reg(regs: bytes, n: int) -> int:
    return int(_REG.unpack_from(regs, n * 16)[0])


def _set(regs: bytearray, n: int, value: int) -> None:
    _REG.pack_into(regs, n * 16, value & 0xFFFFFFFF)


def count_shift(divide_conf: int) -> int:
    """The timer's divisor as a shift: DCR bits 0, 1 and 3 (0b1011: divide by 1)."""
    v = (divide_conf & 3) | ((divide_conf >> 1) & 4)
    return (v + 1) & 7


def next_timer(values: dict[str, Any], now_ns: int) -> tuple[int, int]:
    """(next_time, timer_expiry) as QEMU's apic_next_timer leaves them; -1
    for the expiry when the timer is masked, one-shot and done, or periodic
    with no count. ``next_time`` keeps its old value then."""
    lvt = values["lvt"][APIC_LVT_TIMER]
    shift, initial = values["count_shift"], values["initial_count"]
    if lvt & APIC_LVT_MASKED:
        return values["next_time"], -1
    d = (now_ns - values["initial_count_load_time"]) >> shift
    if lvt & APIC_LVT_TIMER_PERIODIC:
        if not initial:
            return values["next_time"], -1
        d = (d // (initial + 1) + 1) * (initial + 1)
    else:
        if d >= initial:
            return values["next_time"], -1
        d = initial + 1
    nxt = values["initial_count_load_time"] + (d << shift)
    return nxt, nxt


def apic_values(regs: bytes, apicbase: int, now_ns: int, next_time: int = 0) -> dict[str, Any]:
    """QEMU's ``apic`` section values for the LAPIC page ``regs`` (xAPIC mode)."""
    divide = _reg(regs, 0x3E)
    values: dict[str, Any] = {
        "apicbase": apicbase & 0xFFFFFFFF,
        "id": _reg(regs, 0x2) >> 24,
        "arb_id": _reg(regs, 0x9) & 0xFF,
        "tpr": _reg(regs, 0x8) & 0xFF,
        "spurious_vec": _reg(regs, 0xF),
        "log_dest": _reg(regs, 0xD) >> 24,
        "dest_mode": _reg(regs, 0xE) >> 28,
        "isr": [_reg(regs, 0x10 + i) for i in range(8)],
        "tmr": [_reg(regs, 0x18 + i) for i in range(8)],
        "irr": [_reg(regs, 0x20 + i) for i in range(8)],
        "lvt": [_reg(regs, 0x32 + i) for i in range(APIC_LVT_NB)],
        "esr": _reg(regs, 0x28),
        "icr": [_reg(regs, 0x30), _reg(regs, 0x31)],
        "divide_conf": divide,
        "count_shift": count_shift(divide),
        "initial_count": _reg(regs, 0x38),
        "initial_count_load_time": now_ns,
        "next_time": next_time,
    }
    values["next_time"], values["timer_expiry"] = next_timer(values, now_ns)
    return values


def lapic_regs(values: dict[str, Any]) -> bytes:
    """The LAPIC page KVM_SET_LAPIC takes for QEMU's ``apic`` values."""
    regs = bytearray(abi.KVM_APIC_REG_SIZE)
    _set(regs, 0x2, values["id"] << 24)
    _set(regs, 0x8, values["tpr"])
    _set(regs, 0xD, values["log_dest"] << 24)
    _set(regs, 0xE, values["dest_mode"] << 28 | 0x0FFFFFFF)
    _set(regs, 0xF, values["spurious_vec"])
    for i in range(8):
        _set(regs, 0x10 + i, values["isr"][i])
        _set(regs, 0x18 + i, values["tmr"][i])
        _set(regs, 0x20 + i, values["irr"][i])
    _set(regs, 0x28, values["esr"])
    _set(regs, 0x30, values["icr"][0])
    _set(regs, 0x31, values["icr"][1])
    for i in range(APIC_LVT_NB):
        _set(regs, 0x32 + i, values["lvt"][i])
    _set(regs, 0x38, values["initial_count"])
    _set(regs, 0x3E, values["divide_conf"])
    return bytes(regs)


def ioapic_values(state: abi.kvm_ioapic_state) -> dict[str, Any]:
    """QEMU's ``ioapic`` section values for the in-kernel IOAPIC."""
    return {"id": state.id & 0xFF, "ioregsel": state.ioregsel & 0xFF, "irr": state.irr,
            "ioredtbl": [int(x) for x in state.redirtbl]}


def kvm_ioapic(values: dict[str, Any]) -> abi.kvm_ioapic_state:
    state = abi.kvm_ioapic_state(base_address=IOAPIC_BASE, ioregsel=values["ioregsel"],
                                 id=values["id"], irr=values["irr"])
    for i, bits in enumerate(values["ioredtbl"]):
        state.redirtbl[i] = bits
    return state


def kvmclock_values(data: abi.kvm_clock_data) -> dict[str, Any]:
    """QEMU's ``kvmclock`` values (with its clock_is_reliable subsection)."""
    return {"clock": int(data.clock), "kvmclock/clock_is_reliable": {
        "clock_is_reliable": bool(data.flags & abi.KVM_CLOCK_TSC_STABLE)}}
