"""A KVM vCPU's state as QEMU's x86 ``cpu`` section (version 12) values, both
ways, pure.

QEMU keeps the vCPU in ``CPUX86State`` and converts at every register sync
(target/i386/kvm/kvm.c: kvm_get/put_regs, _sregs, _xsave, _xcrs, _msrs,
_vcpu_events, _debugregs, _mp_state); these are the same conversions, from
the layouts (``struct kvm_regs``, ``kvm_sregs``, the XSAVE standard format,
``kvm_vcpu_events``) and QEMU's field meanings:

- registers in QEMU's order (EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8..);
- segments as QEMU's ``SegmentCache`` flags (descriptor bits 8..23; an
  unusable segment has flags 0, a segment without P is unusable);
- the x87/SSE state from the XSAVE legacy area (QEMU's vmstate FPU words are
  the FSW with TOP, and the abridged tag word), the AVX halves, AVX-512 and
  PKRU from their XSAVE components where this vCPU has them;
- debug registers 0..3, 6, 7 (QEMU keeps dr[4] = dr[6], dr[5] = dr[7]);
- the MSRs the section carries (``MAIN_MSRS``, the MTRRs, ``SUBSECTION_MSRS``);
- pending events: QEMU's -1 for "no exception/interrupt", the NMI mask in
  hflags2, the interrupt shadow in hflags; ``hflags`` recomputed from the
  segments and control registers as QEMU's x86_update_hflags does.

What KVM does not hold (QEMU's own: SMBASE, the A20 mask, the SVM intercepts,
the MCE banks, ...) comes from a *template*: the values QEMU sent last, or
QEMU's reset values for a guest that started in livemig.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from typing import Any

from livemig.machine import kvm_abi as abi
from livemig.wire.vmstate.codec import Values, default_values, is_needed
from livemig.wire.vmstate.cpu import CPU, CPU_SUBSECTIONS
from livemig.wire.vmstate.devices import MicrovmConfig

# QEMU's register order (target/i386/cpu.h R_EAX..R_R15) as kvm_regs names.
QEMU_REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             *(f"r{i}" for i in range(8, 16)))
QEMU_SEGS = ("es", "cs", "ss", "ds", "fs", "gs")      # R_ES..R_GS
DESC_TYPE_SHIFT, DESC_S_MASK, DESC_DPL_SHIFT, DESC_P_MASK = 8, 1 << 12, 13, 1 << 15
DESC_AVL_MASK, DESC_L_SHIFT, DESC_B_SHIFT, DESC_G_MASK = 1 << 20, 21, 22, 1 << 23
# hflags / hflags2 bits (target/i386/cpu.h)
HF_CPL_MASK, HF_INHIBIT_IRQ_MASK, HF_CS32_SHIFT, HF_SS32_SHIFT = 3, 1 << 3, 4, 5
HF_ADDSEG_SHIFT, HF_PE_SHIFT, HF_MP_SHIFT = 6, 7, 9
HF_TF_MASK, HF_IOPL_MASK, HF_VM_MASK = 1 << 8, 3 << 12, 1 << 17
HF_LMA_MASK, HF_CS64_MASK, HF_OSFXSR_MASK = 1 << 14, 1 << 15, 1 << 22
HF_MP_EM_TS = 7 << HF_MP_SHIFT
_HF_COMPUTED = (HF_CPL_MASK | 1 << HF_PE_SHIFT | HF_MP_EM_TS | HF_TF_MASK | HF_VM_MASK
                | HF_IOPL_MASK | HF_OSFXSR_MASK | HF_LMA_MASK | 1 << HF_CS32_SHIFT
                | 1 << HF_SS32_SHIFT | HF_CS64_MASK | 1 << HF_ADDSEG_SHIFT)
HF2_GIF_MASK, HF2_NMI_MASK = 1 << 0, 1 << 2
CR0_PE, CR4_OSFXSR, EFER_LMA, EFLAGS_VM = 1, 1 << 9, 1 << 10, 1 << 17
CR4_OSXSAVE, HF_AVX_EN_MASK, XSTATE_SSE_YMM = 1 << 18, 1 << 28, 0b110
# The physical address bits QEMU 10.0.2's default CPU reports under KVM here: the
# variable MTRR masks it migrates carry the bits above them, up to 52, set
# (kvm_get_msrs' mtrr_top_bits; seen in its streams: 0xf000000000000).
QEMU_PHYS_BITS = 48

# XSAVE: the legacy region's layout, the header's XSTATE_BV, the components.
_LEGACY = struct.Struct("<HHBxHQQI")      # FCW FSW FTW(abridged) FOP FIP FDP MXCSR
XSAVE_ST, XSAVE_XMM, XSAVE_BV = 32, 160, 512
XCOMP_YMM, XCOMP_OPMASK, XCOMP_ZMM_HI256, XCOMP_HI16_ZMM, XCOMP_PKRU = 2, 5, 6, 7, 9
_U64 = struct.Struct("<Q")

MSR_TSC = abi.MSR_IA32_TSC
MAIN_MSRS: dict[str, int] = {
    "env.sysenter_cs": 0x174, "env.sysenter_esp": 0x175, "env.sysenter_eip": 0x176,
    "env.star": 0xC0000081, "env.lstar": 0xC0000082, "env.cstar": 0xC0000083,
    "env.fmask": 0xC0000084, "env.kernelgsbase": 0xC0000102, "env.tsc_aux": 0xC0000103,
    "env.pat": 0x277, "env.mtrr_deftype": 0x2FF,
    "env.system_time_msr": 0x4B564D01, "env.wall_clock_msr": 0x4B564D00,
    "env.tsc": MSR_TSC,
}
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRR_VAR_BASE = 0x200
# subsection -> {field: MSR}; a subsection whose MSRs KVM does not list keeps its defaults.
# (cpu/mcg_ext_ctl is not here: QEMU sends and puts it only with lmce=on.)
SUBSECTION_MSRS: dict[str, dict[str, int]] = {
    "cpu/async_pf_msr": {"env.async_pf_en_msr": 0x4B564D02},
    "cpu/async_pf_int_msr": {"env.async_pf_int_msr": 0x4B564D06},
    "cpu/async_pv_eoi_msr": {"env.pv_eoi_en_msr": 0x4B564D04},
    "cpu/steal_time_msr": {"env.steal_time_msr": 0x4B564D03},
    "cpu/poll_control_msr": {"env.poll_control_msr": 0x4B564D05},
    "cpu/msr_tsc_adjust": {"env.tsc_adjust": abi.MSR_IA32_TSC_ADJUST},
    "cpu/msr_tscdeadline": {"env.tsc_deadline": 0x6E0},
    "cpu/msr_ia32_misc_enable": {"env.msr_ia32_misc_enable": abi.MSR_IA32_MISC_ENABLE},
    "cpu/msr_ia32_feature_control": {"env.msr_ia32_feature_control": 0x3A},
    "cpu/xss": {"env.xss": 0xDA0},
    "cpu/umwait": {"env.umwait": 0xE1},
    "cpu/msr_smi_count": {"env.msr_smi_count": 0x34},
    "cpu/spec_ctrl": {"env.spec_ctrl": 0x48},
    "cpu/virt_ssbd": {"env.virt_ssbd": 0xC001011F},
}
# Subsections whose state livemig's KVM vCPU puts back besides the MSR ones (XSAVE,
# events, KVM_SET_TSC_KHZ) or that need nothing (pdptrs: KVM reloads them from CR3).
LOADED_SUBSECTIONS = frozenset({*SUBSECTION_MSRS, "cpu/fpop_ip_dp", "cpu/avx512", "cpu/pkru",
                                "cpu/tsc_khz", "cpu/exception_info", "cpu/triple_fault",
                                "cpu/pdptrs"})
_SUBSECTIONS = {s.name: s for s in CPU_SUBSECTIONS}


@dataclass
class KvmCpuState:
    """One vCPU as KVM's ioctls give it (what QEMU's cpu section is made from)."""

    regs: abi.kvm_regs
    sregs: abi.kvm_sregs
    xsave: bytes                    # KVM_GET_XSAVE's 4 KiB, standard format
    xcr0: int
    events: abi.kvm_vcpu_events
    debugregs: abi.kvm_debugregs
    msrs: dict[int, int]            # the MSRs below that this KVM lists
    mp_state: int
    tsc_khz: int
    xsave_offsets: dict[int, int]   # XSAVE component -> offset (CPUID 0xD)
    phys_bits: int = 40


def section_msrs() -> list[int]:
    """Every MSR the cpu section carries, the TSC last (QEMU puts it last too)."""
    out = [m for m in MAIN_MSRS.values() if m != MSR_TSC]
    out += MTRR_FIXED
    out += [MTRR_VAR_BASE + i for i in range(16)]
    out += [m for sub in SUBSECTION_MSRS.values() for m in sub.values()]
    return [*dict.fromkeys(out), MSR_TSC]


# -- segments --------------------------------------------------------------------------
def segment_cache(seg: abi.kvm_segment) -> dict[str, int]:
    """QEMU's get_seg: a SegmentCache from a kvm_segment."""
    flags = 0 if seg.unusable else (
        seg.type << DESC_TYPE_SHIFT | (DESC_P_MASK if seg.present else 0)
        | seg.dpl << DESC_DPL_SHIFT | seg.db << DESC_B_SHIFT | (DESC_S_MASK if seg.s else 0)
        | seg.l << DESC_L_SHIFT | (DESC_G_MASK if seg.g else 0)
        | (DESC_AVL_MASK if seg.avl else 0))
    return {"selector": seg.selector, "base": seg.base, "limit": seg.limit, "flags": flags}


def set_segment(seg: abi.kvm_segment, cache: dict[str, Any]) -> None:
    """QEMU's set_seg: a kvm_segment from a SegmentCache."""
    flags = cache["flags"]
    seg.selector, seg.base, seg.limit = cache["selector"], cache["base"], cache["limit"]
    seg.type = (flags >> DESC_TYPE_SHIFT) & 15
    seg.present = 1 if flags & DESC_P_MASK else 0
    seg.dpl = (flags >> DESC_DPL_SHIFT) & 3
    seg.db = (flags >> DESC_B_SHIFT) & 1
    seg.s = 1 if flags & DESC_S_MASK else 0
    seg.l = (flags >> DESC_L_SHIFT) & 1
    seg.g = 1 if flags & DESC_G_MASK else 0
    seg.avl = 1 if flags & DESC_AVL_MASK else 0
    seg.unusable = 0 if seg.present else 1
    seg.padding = 0


def update_hflags(hflags: int, v: Values) -> int:
    """QEMU's x86_update_hflags over the section's values (the other bits kept)."""
    segs, cr0, eflags = v["env.segs"], v["env.cr[0]"], v["env.eflags"]
    cs, ss = segs[1]["flags"], segs[2]["flags"]
    h = hflags & ~_HF_COMPUTED
    h |= (ss >> DESC_DPL_SHIFT) & HF_CPL_MASK
    h |= (cr0 & CR0_PE) << HF_PE_SHIFT
    h |= (cr0 << (HF_MP_SHIFT - 1)) & HF_MP_EM_TS
    h |= eflags & (HF_TF_MASK | HF_VM_MASK | HF_IOPL_MASK)
    if v["env.cr[4]"] & CR4_OSFXSR:
        h |= HF_OSFXSR_MASK
    if v["env.efer"] & EFER_LMA:
        h |= HF_LMA_MASK
    if h & HF_LMA_MASK and cs & (1 << DESC_L_SHIFT):
        h |= 1 << HF_CS32_SHIFT | 1 << HF_SS32_SHIFT | HF_CS64_MASK
    else:
        h |= ((cs >> DESC_B_SHIFT) & 1) << HF_CS32_SHIFT
        h |= ((ss >> DESC_B_SHIFT) & 1) << HF_SS32_SHIFT
        if not cr0 & CR0_PE or eflags & EFLAGS_VM or not h & (1 << HF_CS32_SHIFT):
            h |= 1 << HF_ADDSEG_SHIFT
        elif segs[3]["base"] | segs[0]["base"] | segs[2]["base"]:
            h |= 1 << HF_ADDSEG_SHIFT
    return h


# -- KVM -> QEMU -----------------------------------------------------------------------
# QEMU 10.0.2's machine-check state after reset for its default CPU (from its
# streams): MCG_CAP (10 banks, MCG_CTL_P, MCG_SER_P), MCG_CTL and each bank's CTL all
# ones. livemig's vCPU has no MCE banks set up: the values are held, not modelled.
QEMU_MCG_CAP = 0x100010A
ALL_ONES = 2**64 - 1


def reset_template() -> Values:
    """QEMU's values for what KVM does not hold, as its x86 CPU reset leaves them
    (x86_cpu_reset_hold, checked against QEMU 10.0.2's stream of a -S microvm):
    A20 on, SMBASE 0x30000, hflags2 GIF and VGIF, the MCE state; the rest zero."""
    values = default_values(CPU)
    values.update({"env.a20_mask": -1, "env.smbase": 0x30000,
                   "env.hflags2": HF2_GIF_MASK | 1 << 8, "env.mcg_cap": QEMU_MCG_CAP,
                   "env.mcg_ctl": ALL_ONES,
                   "env.mce_banks": [ALL_ONES if i % 4 == 0 else 0 for i in range(40)]})
    return values


def cpu_values(state: KvmCpuState, template: Values) -> Values:
    """The ``cpu`` section values for ``state`` (QEMU's kvm_arch_get_registers),
    subsections included where their ``needed`` rules send them."""
    v = copy.deepcopy({k: x for k, x in template.items() if not k.startswith("cpu/")})
    r, s = state.regs, state.sregs
    v["env.regs"] = [int(getattr(r, n)) for n in QEMU_REGS]
    v["env.eip"], v["env.eflags"] = int(r.rip), int(r.rflags)
    v["env.segs"] = [segment_cache(getattr(s, n)) for n in QEMU_SEGS]
    v["env.ldt"], v["env.tr"] = segment_cache(s.ldt), segment_cache(s.tr)
    for name in ("gdt", "idt"):     # QEMU keeps their selector and flags (reset: 0)
        table = getattr(s, name)
        v[f"env.{name}"] = {**v[f"env.{name}"], "base": int(table.base),
                            "limit": int(table.limit)}
    for i, cr in ((0, s.cr0), (2, s.cr2), (3, s.cr3), (4, s.cr4)):
        v[f"env.cr[{i}]"] = int(cr)
    v["env.efer"] = int(s.efer)
    d = state.debugregs
    v["env.dr"] = [int(d.db[0]), int(d.db[1]), int(d.db[2]), int(d.db[3]),
                   int(d.dr6), int(d.dr7), int(d.dr6), int(d.dr7)]
    subs = _xsave_values(state, v)
    v["env.xcr0"] = state.xcr0
    msrs = state.msrs
    for name, index in MAIN_MSRS.items():
        if index in msrs:
            v[name] = msrs[index] & (0xFFFFFFFF if name == "env.sysenter_cs" else ~0)
    v["env.mtrr_fixed"] = [msrs.get(m, 0) for m in MTRR_FIXED]
    top = ((1 << 52) - 1) & ~((1 << QEMU_PHYS_BITS) - 1)     # QEMU's mtrr_top_bits
    v["env.mtrr_var"] = [{"base": msrs.get(MTRR_VAR_BASE + 2 * i, 0),
                          "mask": msrs.get(MTRR_VAR_BASE + 2 * i + 1, 0) | top}
                         for i in range(8)]
    for sub, fields in SUBSECTION_MSRS.items():
        own = dict(_SUBSECTIONS[sub].defaults) or default_values(_SUBSECTIONS[sub])
        for name, index in fields.items():
            if index in msrs:
                own[name] = msrs[index] & (0xFFFFFFFF if name == "env.umwait" else ~0)
        subs[sub] = own
    _events_values(state, v, subs)
    v["env.mp_state"] = state.mp_state
    v["env.hflags"] = update_hflags(v["env.hflags"], v) & ~HF_AVX_EN_MASK
    if v["env.cr[4]"] & CR4_OSXSAVE and state.xcr0 & XSTATE_SSE_YMM == XSTATE_SSE_YMM:
        v["env.hflags"] |= HF_AVX_EN_MASK          # QEMU's cpu_sync_avx_hflag
    subs["cpu/tsc_khz"] = {"env.tsc_khz": state.tsc_khz}
    config = MicrovmConfig()
    for name, own in subs.items():
        if is_needed(_SUBSECTIONS[name], {**v, name: own}, config):
            v[name] = own
    return v


def _xsave_values(state: KvmCpuState, v: Values) -> dict[str, Values]:
    x = state.xsave
    fcw, fsw, ftw, fop, fip, fdp, mxcsr = _LEGACY.unpack_from(x, 0)
    v["env.fpuc"], v["env.fpus_vmstate"], v["env.fptag_vmstate"] = fcw, fsw, ftw
    v["env.fpregs_format_vmstate"] = 0
    v["env.fpregs"] = [{"tmp": {"tmp_mant": _U64.unpack_from(x, XSAVE_ST + 16 * i)[0],
                                "tmp_exp": struct.unpack_from("<H", x, XSAVE_ST + 16 * i + 8)[0]}}
                       for i in range(8)]
    v["env.mxcsr"] = mxcsr
    v["env.xmm_regs[0]"] = [{"_q_ZMMReg[0]": _U64.unpack_from(x, XSAVE_XMM + 16 * i)[0],
                             "_q_ZMMReg[1]": _U64.unpack_from(x, XSAVE_XMM + 16 * i + 8)[0]}
                            for i in range(16)]
    v["env.xstate_bv"] = _U64.unpack_from(x, XSAVE_BV)[0]
    off = state.xsave_offsets
    ymm = off.get(XCOMP_YMM)
    v["env.xmm_regs[1]"] = [
        {f"_q_ZMMReg[{2 + j}]": (_U64.unpack_from(x, ymm + 16 * i + 8 * j)[0] if ymm else 0)
         for j in range(2)} for i in range(16)]
    subs: dict[str, Values] = {"cpu/fpop_ip_dp": {"env.fpop": fop, "env.fpip": fip,
                                                  "env.fpdp": fdp}}
    if all(c in off for c in (XCOMP_OPMASK, XCOMP_ZMM_HI256, XCOMP_HI16_ZMM)):
        o, z, h = off[XCOMP_OPMASK], off[XCOMP_ZMM_HI256], off[XCOMP_HI16_ZMM]
        subs["cpu/avx512"] = {
            "env.opmask_regs": [_U64.unpack_from(x, o + 8 * i)[0] for i in range(8)],
            "env.xmm_regs[0]": [{f"_q_ZMMReg[{4 + j}]": _U64.unpack_from(x, z + 32 * i + 8 * j)[0]
                                 for j in range(4)} for i in range(16)],
            "env.xmm_regs[1]": [{f"_q_ZMMReg[{j}]": _U64.unpack_from(x, h + 64 * i + 8 * j)[0]
                                 for j in range(8)} for i in range(16)],
        }
    if XCOMP_PKRU in off:
        subs["cpu/pkru"] = {"env.pkru": struct.unpack_from("<I", x, off[XCOMP_PKRU])[0]}
    return subs


def _events_values(state: KvmCpuState, v: Values, subs: dict[str, Values]) -> None:
    """QEMU's kvm_get_vcpu_events (no exception payloads: livemig does not enable
    KVM_CAP_EXCEPTION_PAYLOAD, so a pending exception shows as injected)."""
    e = state.events
    exc, intr, nmi = bytes(e.exception), bytes(e.interrupt), bytes(e.nmi)
    v["env.exception_nr"] = exc[1] if exc[0] or exc[3] else -1
    v["env.has_error_code"] = exc[2]
    v["env.interrupt_injected"] = intr[1] if intr[0] else -1
    v["env.soft_interrupt"] = intr[2]
    v["env.nmi_injected"], v["env.nmi_pending"] = nmi[0], nmi[1]
    v["env.hflags2"] = (v["env.hflags2"] & ~HF2_NMI_MASK) | (HF2_NMI_MASK if nmi[2] else 0)
    v["env.hflags"] = (v["env.hflags"] & ~HF_INHIBIT_IRQ_MASK) | (
        HF_INHIBIT_IRQ_MASK if intr[3] else 0)
    if e.flags & abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR:
        v["env.sipi_vector"] = int(e.sipi_vector)
    subs["cpu/triple_fault"] = {"env.triple_fault_pending": int(e.triple_fault)}
    subs["cpu/exception_info"] = {"env.exception_pending": 0,
                                  "env.exception_injected": 1 if exc[0] or exc[3] else 0,
                                  "env.exception_has_payload": 0, "env.exception_payload": 0}


# -- QEMU -> KVM -----------------------------------------------------------------------
def check_loadable(v: Values) -> None:
    """Refuse what livemig's KVM vCPU would drop (ValueError in QEMU's section terms)."""
    for name in v:
        if name.startswith("cpu/") and name not in LOADED_SUBSECTIONS:
            raise ValueError(f"cpu: livemig's KVM vCPU cannot load subsection '{name}'")
    if v["env.hflags"] & (1 << 19):
        raise ValueError("cpu: the vCPU is in SMM, which livemig's KVM vCPU does not restore")


def load_kvm_state(v: Values, into: KvmCpuState) -> KvmCpuState:
    """``into`` (KVM's current state: what QEMU does not set stays) updated with
    the section's values, as QEMU's kvm_arch_put_registers would put them."""
    check_loadable(v)
    st = copy.copy(into)
    regs = abi.kvm_regs.from_bytes(into.regs.to_bytes())
    for name, value in zip(QEMU_REGS, v["env.regs"], strict=True):
        setattr(regs, name, value)
    regs.rip, regs.rflags = v["env.eip"], v["env.eflags"]
    st.regs = regs
    s = abi.kvm_sregs.from_bytes(into.sregs.to_bytes())
    for name, cache in zip(QEMU_SEGS, v["env.segs"], strict=True):
        set_segment(getattr(s, name), cache)
    set_segment(s.ldt, v["env.ldt"])
    set_segment(s.tr, v["env.tr"])
    for name in ("gdt", "idt"):
        table = getattr(s, name)
        table.base, table.limit = v[f"env.{name}"]["base"], v[f"env.{name}"]["limit"] & 0xFFFF
    s.cr0, s.cr2, s.cr3, s.cr4 = (v[f"env.cr[{i}]"] for i in (0, 2, 3, 4))
    s.efer = v["env.efer"]
    for i in range(4):
        s.interrupt_bitmap[i] = 0
    st.sregs = s
    d = abi.kvm_debugregs.from_bytes(into.debugregs.to_bytes())
    for i in range(4):
        d.db[i] = v["env.dr"][i]
    d.dr6, d.dr7 = v["env.dr"][6], v["env.dr"][7]
    st.debugregs = d
    st.xsave = _load_xsave(v, into)
    st.xcr0 = v["env.xcr0"]
    msrs: dict[int, int] = {}
    for name, index in MAIN_MSRS.items():
        msrs[index] = v[name] & 0xFFFFFFFFFFFFFFFF
    for index, value in zip(MTRR_FIXED, v["env.mtrr_fixed"], strict=True):
        msrs[index] = value
    keep = (1 << into.phys_bits) - 1
    for i, var in enumerate(v["env.mtrr_var"]):
        msrs[MTRR_VAR_BASE + 2 * i] = var["base"]
        msrs[MTRR_VAR_BASE + 2 * i + 1] = var["mask"] & keep
    for sub, fields in SUBSECTION_MSRS.items():
        own = v.get(sub) or dict(_SUBSECTIONS[sub].defaults) or default_values(_SUBSECTIONS[sub])
        for name, index in fields.items():
            msrs[index] = own[name]
    tsc = msrs.pop(MSR_TSC)
    msrs[MSR_TSC] = tsc                     # the TSC last, as QEMU puts it
    st.msrs = {k: x for k, x in msrs.items() if k in into.msrs}
    st.events = _load_events(v, into.events)
    st.mp_state = v["env.mp_state"]
    st.tsc_khz = v["cpu/tsc_khz"]["env.tsc_khz"] if "cpu/tsc_khz" in v else into.tsc_khz
    return st


def _load_xsave(v: Values, into: KvmCpuState) -> bytes:
    x = bytearray(into.xsave)
    fop = v.get("cpu/fpop_ip_dp", {"env.fpop": 0, "env.fpip": 0, "env.fpdp": 0})
    _LEGACY.pack_into(x, 0, v["env.fpuc"], v["env.fpus_vmstate"], v["env.fptag_vmstate"] & 0xFF,
                      fop["env.fpop"], fop["env.fpip"], fop["env.fpdp"], v["env.mxcsr"])
    for i, reg in enumerate(v["env.fpregs"]):
        x[XSAVE_ST + 16 * i:XSAVE_ST + 16 * i + 16] = struct.pack(
            "<QH6x", reg["tmp"]["tmp_mant"], reg["tmp"]["tmp_exp"])
    for i, reg in enumerate(v["env.xmm_regs[0]"]):
        _U64.pack_into(x, XSAVE_XMM + 16 * i, reg["_q_ZMMReg[0]"])
        _U64.pack_into(x, XSAVE_XMM + 16 * i + 8, reg["_q_ZMMReg[1]"])
    _U64.pack_into(x, XSAVE_BV, v["env.xstate_bv"])
    _U64.pack_into(x, XSAVE_BV + 8, 0)          # XCOMP_BV: the standard format
    off = into.xsave_offsets
    if XCOMP_YMM in off:
        for i, reg in enumerate(v["env.xmm_regs[1]"]):
            for j in range(2):
                _U64.pack_into(x, off[XCOMP_YMM] + 16 * i + 8 * j, reg[f"_q_ZMMReg[{2 + j}]"])
    avx = v.get("cpu/avx512")
    if avx is not None:
        if not all(c in off for c in (XCOMP_OPMASK, XCOMP_ZMM_HI256, XCOMP_HI16_ZMM)):
            raise ValueError("cpu: the AVX-512 state cannot be loaded: this vCPU has no AVX-512")
        for i, k in enumerate(avx["env.opmask_regs"]):
            _U64.pack_into(x, off[XCOMP_OPMASK] + 8 * i, k)
        for i, reg in enumerate(avx["env.xmm_regs[0]"]):
            for j in range(4):
                _U64.pack_into(x, off[XCOMP_ZMM_HI256] + 32 * i + 8 * j,
                               reg[f"_q_ZMMReg[{4 + j}]"])
        for i, reg in enumerate(avx["env.xmm_regs[1]"]):
            for j in range(8):
                _U64.pack_into(x, off[XCOMP_HI16_ZMM] + 64 * i + 8 * j, reg[f"_q_ZMMReg[{j}]"])
    pkru = v.get("cpu/pkru")
    if pkru is not None:
        if XCOMP_PKRU not in off:
            raise ValueError("cpu: the PKRU state cannot be loaded: this vCPU has no PKU")
        struct.pack_into("<I", x, off[XCOMP_PKRU], pkru["env.pkru"])
    return bytes(x)


def _load_events(v: Values, current: abi.kvm_vcpu_events) -> abi.kvm_vcpu_events:
    """QEMU's kvm_put_vcpu_events at the full level (no payloads, no SMM)."""
    e = abi.kvm_vcpu_events.from_bytes(current.to_bytes())
    nr = v["env.exception_nr"]
    e.exception[0] = 1 if nr != -1 else 0                   # injected (cpu_post_load)
    e.exception[1] = nr & 0xFF if nr != -1 else 0
    e.exception[2] = v["env.has_error_code"]
    e.exception[3] = 0
    injected = v["env.interrupt_injected"]
    e.interrupt[0] = 1 if injected >= 0 else 0
    e.interrupt[1] = injected & 0xFF if injected >= 0 else 0
    e.interrupt[2] = v["env.soft_interrupt"]
    e.interrupt[3] = 1 if v["env.hflags"] & HF_INHIBIT_IRQ_MASK else 0
    e.nmi[0], e.nmi[1] = v["env.nmi_injected"], v["env.nmi_pending"]
    e.nmi[2] = 1 if v["env.hflags2"] & HF2_NMI_MASK else 0
    e.sipi_vector = v["env.sipi_vector"]
    e.flags = (abi.KVM_VCPUEVENT_VALID_NMI_PENDING | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
               | abi.KVM_VCPUEVENT_VALID_SHADOW
               | (current.flags & abi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT))
    tf = v.get("cpu/triple_fault")
    e.triple_fault = tf["env.triple_fault_pending"] if tf else 0
    if e.triple_fault and not current.flags & abi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT:
        raise ValueError("cpu: a pending triple fault cannot be loaded into this KVM")
    return e
