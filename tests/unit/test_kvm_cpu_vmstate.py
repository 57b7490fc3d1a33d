"""KVM vCPU state <-> QEMU's ``cpu`` section values (machine/kvm_cpu_vmstate.py),
pure: the conversions QEMU's kvm_get/put_* make, checked both ways."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.machine import kvm_abi as abi
from livemig.machine.kvm_cpu_vmstate import (
    HF_INHIBIT_IRQ_MASK,
    MTRR_FIXED,
    MTRR_VAR_BASE,
    QEMU_SEGS,
    KvmCpuState,
    check_loadable,
    cpu_values,
    load_kvm_state,
    reset_template,
    section_msrs,
    segment_cache,
    set_segment,
    update_hflags,
)
from livemig.wire.vmstate.codec import decode, encode
from livemig.wire.vmstate.cpu import CPU

u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
PHYS_BITS = 40


@st.composite
def segments(draw) -> abi.kvm_segment:
    seg = abi.kvm_segment(base=draw(u64), limit=draw(u32), selector=draw(u16),
                          type=draw(st.integers(0, 15)), present=1,
                          dpl=draw(st.integers(0, 3)), db=draw(st.integers(0, 1)),
                          s=draw(st.integers(0, 1)), l=draw(st.integers(0, 1)),
                          g=draw(st.integers(0, 1)), avl=draw(st.integers(0, 1)))
    return seg


@given(segments())
def test_usable_segments_round_trip(seg):
    back = abi.kvm_segment()
    set_segment(back, segment_cache(seg))
    assert back.to_bytes() == seg.to_bytes()


def test_an_unusable_segment_has_no_flags_and_comes_back_unusable():
    seg = abi.kvm_segment(selector=0x10, type=3, present=0, unusable=1)
    cache = segment_cache(seg)
    assert cache["flags"] == 0
    back = abi.kvm_segment()
    set_segment(back, cache)
    assert back.unusable == 1 and back.present == 0


def _seg(flags: int, base: int = 0) -> dict[str, int]:
    return {"selector": 0, "base": base, "limit": 0xFFFF, "flags": flags}


def test_hflags_as_qemu_computes_them():
    real = {"env.segs": [_seg(0x9300)] * 6, "env.cr[0]": 0x10, "env.eflags": 2,
            "env.cr[4]": 0, "env.efer": 0}
    assert update_hflags(0, real) == 1 << 6               # ADDSEG only (real mode)
    flat = {"env.segs": [_seg(0xCF9300), _seg(0xCF9B00), _seg(0xCF9300), _seg(0xCF9300),
                         _seg(0xCF9300), _seg(0xCF9300)],
            "env.cr[0]": 0x11, "env.eflags": 2, "env.cr[4]": 0, "env.efer": 0}
    assert update_hflags(0, flat) == 1 << 7 | 1 << 4 | 1 << 5     # PE, CS32, SS32
    # bits QEMU does not recompute are kept (here: the interrupt shadow)
    assert update_hflags(HF_INHIBIT_IRQ_MASK, flat) & HF_INHIBIT_IRQ_MASK


@st.composite
def kvm_states(draw) -> KvmCpuState:
    regs = abi.kvm_regs()
    for name, _ in abi.kvm_regs._fields_:
        setattr(regs, name, draw(u64))
    sregs = abi.kvm_sregs()
    for name in (*QEMU_SEGS, "ldt", "tr"):
        setattr(sregs, name, draw(segments()))
    for name in ("gdt", "idt"):
        setattr(sregs, name, abi.kvm_dtable(base=draw(u64), limit=draw(u16)))
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = (draw(u64) for _ in range(5))
    xsave = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(4096))
    for i in range(8):      # ST registers use 10 of their 16 bytes
        xsave[32 + 16 * i + 10:32 + 16 * i + 16] = bytes(6)
    xsave[5] = 0
    struct.pack_into("<Q", xsave, 520, 0)                # XCOMP_BV: standard format
    msrs = {m: draw(u64) for m in section_msrs()}
    msrs[0x174] &= 0xFFFFFFFF                           # sysenter_cs is 32-bit in QEMU
    msrs[0xE1] &= 0xFFFFFFFF                            # so is umwait
    for i in range(8):
        msrs[MTRR_VAR_BASE + 2 * i + 1] &= (1 << PHYS_BITS) - 1
    events = abi.kvm_vcpu_events(flags=abi.KVM_VCPUEVENT_VALID_NMI_PENDING
                                 | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                                 | abi.KVM_VCPUEVENT_VALID_SHADOW)
    injected = draw(st.booleans())
    events.exception[0], events.exception[1] = int(injected), draw(u8) if injected else 0
    events.exception[2] = draw(st.integers(0, 1))
    irq = draw(st.booleans())
    events.interrupt[0], events.interrupt[1] = int(irq), draw(u8) if irq else 0
    events.interrupt[2], events.interrupt[3] = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    events.nmi[0], events.nmi[1], events.nmi[2] = (draw(st.integers(0, 1)) for _ in range(3))
    events.sipi_vector = draw(u32)
    debug = abi.kvm_debugregs(dr6=draw(u64), dr7=draw(u64))
    for i in range(4):
        debug.db[i] = draw(u64)
    return KvmCpuState(regs=regs, sregs=sregs, xsave=bytes(xsave), xcr0=draw(u64), events=events,
                       debugregs=debug, msrs=msrs, mp_state=draw(st.sampled_from([0, 3])),
                       tsc_khz=draw(st.integers(1, 2**31)),
                       xsave_offsets={2: 576, 5: 1088, 6: 1152, 7: 1664, 9: 2688},
                       phys_bits=PHYS_BITS)


def _blank(like: KvmCpuState) -> KvmCpuState:
    """What a fresh vCPU would report: zeros, the same MSRs listed and layout."""
    return KvmCpuState(regs=abi.kvm_regs(), sregs=abi.kvm_sregs(), xsave=bytes(4096), xcr0=1,
                       events=abi.kvm_vcpu_events(flags=like.events.flags),
                       debugregs=abi.kvm_debugregs(), msrs=dict.fromkeys(like.msrs, 0),
                       mp_state=0, tsc_khz=like.tsc_khz, xsave_offsets=like.xsave_offsets,
                       phys_bits=like.phys_bits)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow])
@given(kvm_states())
def test_kvm_state_through_qemus_values_comes_back(state):
    """KVM -> cpu values -> KVM gives back every register, segment, FPU/SSE/AVX
    byte, MSR and event QEMU's section carries; the values encode as a cpu v12
    payload that decodes to themselves."""
    values = cpu_values(state, reset_template())
    back = load_kvm_state(values, _blank(state))
    assert back.regs.to_bytes() == state.regs.to_bytes()
    for name in (*QEMU_SEGS, "ldt", "tr"):
        assert getattr(back.sregs, name).to_bytes() == getattr(state.sregs, name).to_bytes()
    for name in ("gdt", "idt", "cr0", "cr2", "cr3", "cr4", "efer"):
        a, b = getattr(back.sregs, name), getattr(state.sregs, name)
        assert (a.to_bytes() == b.to_bytes()) if isinstance(a, abi.KvmStruct) else a == b, name
    x, y = back.xsave, state.xsave
    assert x[:28] == y[:28] and x[32:416] == y[32:416] and x[512:520] == y[512:520]
    for comp, size in ((2, 256), (5, 64), (6, 512), (7, 1024), (9, 4)):
        assert x[comp_off(comp):comp_off(comp) + size] == y[comp_off(comp):comp_off(comp) + size]
    assert back.xcr0 == state.xcr0
    assert back.msrs == state.msrs
    assert back.debugregs.to_bytes() == state.debugregs.to_bytes()
    for field in ("exception", "interrupt", "nmi"):
        assert bytes(getattr(back.events, field))[:4] == bytes(getattr(state.events, field))[:4]
    assert back.events.sipi_vector == state.events.sipi_vector
    assert back.mp_state == state.mp_state and back.tsc_khz == state.tsc_khz
    payload = encode(CPU, values)
    assert decode(CPU, payload, complete=True) == (values, len(payload))


def comp_off(comp: int) -> int:
    return {2: 576, 5: 1088, 6: 1152, 7: 1664, 9: 2688}[comp]


def test_the_mtrr_masks_carry_qemus_top_bits():
    blank = _blank(KvmCpuState(
        regs=abi.kvm_regs(), sregs=abi.kvm_sregs(), xsave=bytes(4096), xcr0=1,
        events=abi.kvm_vcpu_events(), debugregs=abi.kvm_debugregs(),
        msrs=dict.fromkeys(section_msrs(), 0), mp_state=0, tsc_khz=1, xsave_offsets={},
        phys_bits=PHYS_BITS))
    values = cpu_values(blank, reset_template())
    # QEMU 10.0.2's stream here: bits 48..51 set in a cleared mask
    assert {v["mask"] for v in values["env.mtrr_var"]} == {0xF000000000000}
    assert values["env.mtrr_fixed"] == [0] * len(MTRR_FIXED)
    assert load_kvm_state(values, blank).msrs[MTRR_VAR_BASE + 1] == 0


def test_subsections_livemig_cannot_load_are_refused():
    values = reset_template()
    values["cpu/msr_hyperv_vapic"] = {"env.msr_hv_vapic": 1}
    try:
        check_loadable(values)
    except ValueError as exc:
        assert "cpu/msr_hyperv_vapic" in str(exc)
    else:
        raise AssertionError("a Hyper-V MSR was accepted")
