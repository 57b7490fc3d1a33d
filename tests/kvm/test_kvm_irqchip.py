"""KVM's in-kernel irqchip and kvmclock from livemig (KvmAccelerator(irqchip=True)):
the walk runs with it, and the LAPIC, IOAPIC and clock go through QEMU's
``apic``, ``ioapic`` and ``kvmclock`` values and back (machine/kvm_vmstate.py)
unchanged. QEMU's own values are loaded in tests/e2e/test_microvm_sections.py."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvm_harness import wait_for

from livemig.machine.kvm_vmstate import (
    apic_values,
    count_shift,
    ioapic_values,
    kvm_ioapic,
    kvmclock_values,
    lapic_regs,
    next_timer,
)
from livemig.wire.vmstate.codec import decode, encode
from livemig.wire.vmstate.devices import APIC, IOAPIC, KVMCLOCK

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]
APIC_BASE_BSP_ENABLED = 0xFEE00900      # 0xfee00000 | enabled | BSP


def booted(make_vm):
    vm = make_vm(irqchip=True)
    vm.accel.reset()
    vm.accel.resume()
    wait_for(lambda: vm.serial.bytes_written >= 2, 20, "'A' and a 'B' with the irqchip")
    vm.accel.pause()
    return vm


def test_the_walk_runs_with_the_in_kernel_irqchip(make_vm):
    vm = booted(make_vm)
    regs = vm.accel.get_lapic()
    values = apic_values(regs, vm.accel.apic_base(), now_ns=1000)
    assert values["apicbase"] == APIC_BASE_BSP_ENABLED
    assert values["id"] == 0 and values["spurious_vec"] == 0xFF
    assert values["lvt"][0] & (1 << 16), "the LAPIC timer is masked"
    assert values["timer_expiry"] == -1
    got, _ = decode(APIC, encode(APIC, values), complete=True)
    assert got == values
    ioapic = ioapic_values(vm.accel.get_ioapic())
    assert len(ioapic["ioredtbl"]) == 24
    assert decode(IOAPIC, encode(IOAPIC, ioapic), complete=True)[0] == ioapic
    before = vm.serial.bytes_written
    vm.accel.resume()
    wait_for(lambda: vm.serial.bytes_written > before, 20, "the walk going on")
    vm.accel.pause()


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tpr=st.integers(0, 0xF0).map(lambda x: x & 0xF0), vector=st.integers(0x20, 0xFF),
       initial=st.integers(0, 0xFFFFFFFF), divide=st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11]),
       pins=st.lists(st.integers(0x20, 0xFF), min_size=24, max_size=24))
def test_lapic_and_ioapic_round_trip_through_kvm(make_vm, tpr, vector, initial, divide, pins):
    vm = make_vm(irqchip=True)
    values = apic_values(vm.accel.get_lapic(), vm.accel.apic_base(), now_ns=0)
    values.update(tpr=tpr, initial_count=initial, divide_conf=divide,
                  count_shift=count_shift(divide))
    values["lvt"] = [(1 << 16) | vector] + values["lvt"][1:]     # masked timer, a vector
    vm.accel.set_lapic(lapic_regs(values))
    back = apic_values(vm.accel.get_lapic(), vm.accel.apic_base(), now_ns=0)
    assert {k: back[k] for k in ("tpr", "lvt", "initial_count", "divide_conf", "count_shift",
                                 "spurious_vec", "id")} == \
        {k: values[k] for k in ("tpr", "lvt", "initial_count", "divide_conf", "count_shift",
                                "spurious_vec", "id")}
    io = {"id": 0, "ioregsel": 0, "irr": 0,
          "ioredtbl": [(1 << 16) | v for v in pins]}      # masked, so nothing fires
    vm.accel.set_ioapic(kvm_ioapic(io))
    assert ioapic_values(vm.accel.get_ioapic()) == io


def test_kvmclock_set_and_get(make_vm):
    vm = make_vm(irqchip=True)
    target = 5_000_000_000
    vm.accel.set_clock(target)
    t0 = time.monotonic_ns()
    got = kvmclock_values(vm.accel.get_clock())
    elapsed = time.monotonic_ns() - t0
    assert target <= got["clock"] <= target + elapsed + 1_000_000_000
    assert decode(KVMCLOCK, encode(KVMCLOCK, got), complete=True)[0] == got


def test_without_irqchip_the_lapic_is_userspaces(make_vm):
    vm = make_vm()
    with pytest.raises(RuntimeError, match="no in-kernel irqchip"):
        vm.accel.get_lapic()


@pytest.mark.parametrize("lvt,initial,now,expiry", [
    (1 << 16, 100, 10, -1),                 # masked
    (0, 0, 10, -1),                         # one-shot, nothing to count
    (0, 100, 0, (100 + 1) << 1),            # one-shot: expires at count + 1 ticks
    (1 << 17, 100, 1000, ((1000 >> 1) // 101 + 1) * 101 << 1),   # periodic
])
def test_next_timer_is_qemus_rule(lvt, initial, now, expiry):
    values = {"lvt": [lvt, 0, 0, 0, 0, 0], "count_shift": 1, "initial_count": initial,
              "initial_count_load_time": 0, "next_time": 0}
    assert next_timer(values, now)[1] == expiry
