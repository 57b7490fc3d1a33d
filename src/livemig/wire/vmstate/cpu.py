"""QEMU 10.0's x86 ``cpu`` section (target/i386/machine.c), version 12.

The main fields are the vCPU's registers, segment caches, FPU/SSE state,
MTRRs, MCE banks and the KVM event state; the 43 subsections carry MSRs
and state most guests never set, each sent only when its ``needed`` rule
says so. The rules are QEMU's: most send a subsection when any of its
values differs from what reset leaves; some depend on the CPU model's
CPUID features or the machine (``MicrovmConfig``); ``cpu/pdptrs`` on
whether KVM reported valid PDPTRs, which the migrated state shows only by
the subsection being there. Not described (refused as unknown
subsections): ``cpu/nested_state`` (a guest using VMX/SVM; qemu64 has
neither), ``cpu/xen_vcpu`` (Xen emulation), ``cpu/arch_lbr`` (arch-lbr CPUs).
"""

from __future__ import annotations

from typing import Any

from .codec import Needed, VMStateDescription, VMStateField, fields, simple, subsection, u64s
from .devices import MicrovmConfig, _config

F = VMStateField
CPU_NB_REGS = 16
MCE_BANKS_DEF = 10
MAX_FIXED_COUNTERS = 3
MAX_GP_COUNTERS = 18
HV_CRASH_PARAMS = 5
HV_SINT_COUNT = 16
HV_STIMER_COUNT = 4
NB_OPMASK_REGS = 8
MAX_RTIT_ADDRS = 8
HF_GUEST_MASK = 1 << 21          # hflags: the vCPU runs a nested guest (L2)
HF2_NPT_MASK = 1 << 6            # hflags2: SVM nested paging

SEGMENT = simple("segment", 1, fields(("selector", "uint32"), ("base", "uint64"),
                                      ("limit", "uint32"), ("flags", "uint32")))
FPREG_TMP = simple("fpreg_tmp", 0, fields(("tmp_mant", "uint64"), ("tmp_exp", "uint16")))
FPREG = simple("fpreg", 0, (F("tmp", "tmp", struct=FPREG_TMP),))   # the 80-bit register
XMM_REG = simple("xmm_reg", 1, u64s("_q_ZMMReg[0]", "_q_ZMMReg[1]"))
YMMH_REG = simple("ymmh_reg", 1, u64s("_q_ZMMReg[2]", "_q_ZMMReg[3]"))
ZMMH_REG = simple("zmmh_reg", 1, u64s(*(f"_q_ZMMReg[{i}]" for i in range(4, 8))))
HI16_ZMM_REG = simple("hi16_zmm_reg", 1, u64s(*(f"_q_ZMMReg[{i}]" for i in range(8))))
MTRR_VAR = simple("mtrr_var", 1, u64s("base", "mask"))
BND_REGS = simple("bnd_regs", 1, u64s("lb", "ub"))


def _nonzero(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_nonzero(v) for v in value.values())
    if isinstance(value, list):
        return any(_nonzero(v) for v in value)
    if isinstance(value, bytes):
        return any(value)
    return bool(value)


def _when_set(name: str, flds: tuple[VMStateField, ...]) -> VMStateDescription:
    """A subsection sent when any of its values is non-zero (QEMU's usual rule)."""
    return subsection(name, flds, lambda own, v, c: _nonzero(dict(own)))


def _msr(name: str, *msrs: str, kind: str = "uint64") -> VMStateDescription:
    return _when_set(name, tuple(F(m, kind) for m in msrs))


def _feature(name: str, feature: str, flds: tuple[VMStateField, ...]) -> VMStateDescription:
    """A subsection sent whenever the CPU model has ``feature`` (CPUID)."""
    return simple(name, 1, flds, needed=lambda v, c: feature in _config(c).cpu_features)


def _value_not(name: str, msr: str, default: int) -> VMStateDescription:
    """Sent when the MSR differs from its reset value ``default``."""
    return subsection(name, (F(msr, "uint64"),), lambda own, v, c: own[msr] != default,
                      defaults={msr: default})


def _gated(name: str, msr: str, gate: str, kind: str = "uint64") -> VMStateDescription:
    """Sent when the MSR is non-zero and the configuration flag ``gate`` is on."""
    return subsection(name, (F(msr, kind),),
                      lambda own, v, c: bool(getattr(_config(c), gate)) and own[msr] != 0)


def _present(v: dict[str, Any], c: Any, name: str = "cpu/pdptrs") -> bool:
    return name in v


EXCEPTION_INFO = subsection("cpu/exception_info", fields(
    ("env.exception_pending", "uint8"), ("env.exception_injected", "uint8"),
    ("env.exception_has_payload", "uint8"), ("env.exception_payload", "uint64")),
    lambda own, v, c: bool(own["env.exception_pending"] and v["env.hflags"] & HF_GUEST_MASK))
TSC_KHZ = subsection("cpu/tsc_khz", (F("env.tsc_khz", "int64"),),
                     lambda own, v, c: _config(c).save_tsc_khz and own["env.tsc_khz"] != 0)
SVM_NPT = simple("cpu/svn_npt", 1, fields(("env.nested_cr3", "uint64"),
                                          ("env.nested_pg_mode", "uint32")),
                 needed=lambda v, c: bool(v["env.hflags2"] & HF2_NPT_MASK))
SVM_GUEST = subsection("cpu/svm_guest", (F("env.int_ctl", "uint32"),),
                       lambda own, v, c: _config(c).tcg and own["env.int_ctl"] != 0)
PDPTRS_NEEDED: Needed = _present
PDPTRS = simple("cpu/pdptrs", 1, (F("env.pdptrs", "uint64", count=4),), needed=PDPTRS_NEEDED)

CPU_SUBSECTIONS: tuple[VMStateDescription, ...] = (
    EXCEPTION_INFO,
    _msr("cpu/async_pf_msr", "env.async_pf_en_msr"),
    _msr("cpu/async_pf_int_msr", "env.async_pf_int_msr"),
    _msr("cpu/async_pv_eoi_msr", "env.pv_eoi_en_msr"),
    _msr("cpu/steal_time_msr", "env.steal_time_msr"),
    _value_not("cpu/poll_control_msr", "env.poll_control_msr", 1),     # enabled at reset
    _when_set("cpu/fpop_ip_dp", fields(("env.fpop", "uint16"), ("env.fpip", "uint64"),
                                       ("env.fpdp", "uint64"))),
    _msr("cpu/msr_tsc_adjust", "env.tsc_adjust"),
    _msr("cpu/msr_tscdeadline", "env.tsc_deadline"),
    _value_not("cpu/msr_ia32_misc_enable", "env.msr_ia32_misc_enable", 1),  # fast strings
    _msr("cpu/msr_ia32_feature_control", "env.msr_ia32_feature_control"),
    _when_set("cpu/msr_architectural_pmu", (
        *u64s("env.msr_fixed_ctr_ctrl", "env.msr_global_ctrl", "env.msr_global_status",
              "env.msr_global_ovf_ctrl"),
        F("env.msr_fixed_counters", "uint64", count=MAX_FIXED_COUNTERS),
        F("env.msr_gp_counters", "uint64", count=MAX_GP_COUNTERS),
        F("env.msr_gp_evtsel", "uint64", count=MAX_GP_COUNTERS),
    )),
    _when_set("cpu/mpx", (
        F("env.bnd_regs", "struct", count=4, struct=BND_REGS),
        *u64s("env.bndcs_regs.cfgu", "env.bndcs_regs.sts", "env.msr_bndcfgs"),
    )),
    _msr("cpu/msr_hyperv_hypercall", "env.msr_hv_guest_os_id", "env.msr_hv_hypercall"),
    _msr("cpu/msr_hyperv_vapic", "env.msr_hv_vapic"),
    _msr("cpu/msr_hyperv_time", "env.msr_hv_tsc"),
    _when_set("cpu/msr_hyperv_crash", (F("env.msr_hv_crash_params", "uint64",
                                         count=HV_CRASH_PARAMS),)),
    _gated("cpu/msr_hyperv_runtime", "env.msr_hv_runtime", "hyperv_runtime"),
    _when_set("cpu/msr_hyperv_synic", (
        *u64s("env.msr_hv_synic_control", "env.msr_hv_synic_evt_page",
              "env.msr_hv_synic_msg_page"),
        F("env.msr_hv_synic_sint", "uint64", count=HV_SINT_COUNT),
    )),
    _when_set("cpu/msr_hyperv_stimer", (
        F("env.msr_hv_stimer_config", "uint64", count=HV_STIMER_COUNT),
        F("env.msr_hv_stimer_count", "uint64", count=HV_STIMER_COUNT),
    )),
    _msr("cpu/msr_hyperv_reenlightenment", "env.msr_hv_reenlightenment_control",
         "env.msr_hv_tsc_emulation_control", "env.msr_hv_tsc_emulation_status"),
    _when_set("cpu/avx512", (
        F("env.opmask_regs", "uint64", count=NB_OPMASK_REGS),
        F("env.xmm_regs[0]", "struct", count=CPU_NB_REGS, struct=ZMMH_REG),
        F("env.xmm_regs[1]", "struct", count=CPU_NB_REGS, struct=HI16_ZMM_REG),
    )),
    _msr("cpu/xss", "env.xss"),
    _msr("cpu/umwait", "env.umwait", kind="uint32"),
    TSC_KHZ,
    _gated("cpu/msr_smi_count", "env.msr_smi_count", "migrate_smi_count"),
    _msr("cpu/pkru", "env.pkru", kind="uint32"),
    _msr("cpu/pkrs", "env.pkrs", kind="uint32"),
    _msr("cpu/spec_ctrl", "env.spec_ctrl"),
    _feature("cpu/amd_tsc_scale_msr", "svm-tsc-scale", (F("env.amd_tsc_scale_msr", "uint64"),)),
    _gated("cpu/mcg_ext_ctl", "env.mcg_ext_ctl", "enable_lmce"),
    _when_set("cpu/intel_pt", (
        *u64s("env.msr_rtit_ctrl", "env.msr_rtit_status", "env.msr_rtit_output_base",
              "env.msr_rtit_output_mask", "env.msr_rtit_cr3_match"),
        F("env.msr_rtit_addrs", "uint64", count=MAX_RTIT_ADDRS),
    )),
    _msr("cpu/virt_ssbd", "env.virt_ssbd"),
    SVM_NPT,
    SVM_GUEST,
    _feature("cpu/msr_tsx_ctrl", "tsx-ctrl", (F("env.tsx_ctrl", "uint32"),)),
    _feature("cpu/intel_sgx", "sgx-lc", (F("env.msr_ia32_sgxlepubkeyhash", "uint64", count=4),)),
    PDPTRS,
    _feature("cpu/msr_xfd", "xfd", u64s("env.msr_xfd", "env.msr_xfd_err")),
    _feature("cpu/fred", "fred", u64s(
        "env.fred_rsp0", "env.fred_rsp1", "env.fred_rsp2", "env.fred_rsp3", "env.fred_stklvls",
        "env.fred_ssp0", "env.fred_ssp1", "env.fred_ssp2", "env.fred_ssp3", "env.fred_config")),
    _feature("cpu/intel_amx_xtile", "amx-tile", (F("env.xtilecfg", "uint8", count=64),
                                                 F("env.xtiledata", "uint8", count=8192))),
    _msr("cpu/triple_fault", "env.triple_fault_pending", kind="uint8"),
)

CPU = simple("cpu", 12, (
    F("env.regs", "uint64", count=CPU_NB_REGS),
    *u64s("env.eip", "env.eflags"),
    F("env.hflags", "uint32"),
    *fields(("env.fpuc", "uint16"), ("env.fpus_vmstate", "uint16"),
            ("env.fptag_vmstate", "uint16"), ("env.fpregs_format_vmstate", "uint16")),
    F("env.fpregs", "struct", count=8, struct=FPREG),
    F("env.segs", "struct", count=6, struct=SEGMENT),
    *(F(f"env.{s}", "struct", struct=SEGMENT) for s in ("ldt", "tr", "gdt", "idt")),
    F("env.sysenter_cs", "uint32"),
    *u64s("env.sysenter_esp", "env.sysenter_eip", "env.cr[0]", "env.cr[2]", "env.cr[3]",
          "env.cr[4]"),
    F("env.dr", "uint64", count=8),
    F("env.a20_mask", "int32"),
    F("env.mxcsr", "uint32"),
    F("env.xmm_regs[0]", "struct", count=CPU_NB_REGS, struct=XMM_REG),
    *u64s("env.efer", "env.star", "env.lstar", "env.cstar", "env.fmask", "env.kernelgsbase"),
    F("env.smbase", "uint32"),
    F("env.pat", "uint64"),
    F("env.hflags2", "uint32"),
    *u64s("env.vm_hsave", "env.vm_vmcb", "env.tsc_offset", "env.intercept"),
    *fields(("env.intercept_cr_read", "uint16"), ("env.intercept_cr_write", "uint16"),
            ("env.intercept_dr_read", "uint16"), ("env.intercept_dr_write", "uint16"),
            ("env.intercept_exceptions", "uint32"), ("env.v_tpr", "uint8")),
    F("env.mtrr_fixed", "uint64", count=11),
    F("env.mtrr_deftype", "uint64"),
    F("env.mtrr_var", "struct", count=8, struct=MTRR_VAR, since=8),
    *fields(("env.interrupt_injected", "int32"), ("env.mp_state", "uint32"),
            ("env.tsc", "uint64"), ("env.exception_nr", "int32"),
            ("env.soft_interrupt", "uint8"), ("env.nmi_injected", "uint8"),
            ("env.nmi_pending", "uint8"), ("env.has_error_code", "uint8"),
            ("env.sipi_vector", "uint32")),
    *u64s("env.mcg_cap", "env.mcg_status", "env.mcg_ctl"),
    F("env.mce_banks", "uint64", count=MCE_BANKS_DEF * 4),
    *u64s("env.tsc_aux", "env.system_time_msr", "env.wall_clock_msr"),
    F("env.xcr0", "uint64", since=12),
    F("env.xstate_bv", "uint64", since=12),
    F("env.xmm_regs[1]", "struct", count=CPU_NB_REGS, struct=YMMH_REG, since=12),
), minimum=11, subsections=CPU_SUBSECTIONS)

__all__ = ["CPU", "CPU_SUBSECTIONS", "MicrovmConfig"]
