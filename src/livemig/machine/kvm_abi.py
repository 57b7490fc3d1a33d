"""The x86-64 KVM ABI from <linux/kvm.h>: ioctl numbers, capabilities, structs.

Only what :mod:`livemig.machine.kvm` uses. ioctl numbers are built with the
kernel's ``_IOC`` encoding (direction << 30 | size << 16 | type << 8 | nr) from
the ctypes struct sizes, so a struct and its ioctl cannot disagree; the sizes
are asserted at import against the kernel's. All structs are little-endian,
natural alignment, as on x86-64.
"""

from __future__ import annotations

import ctypes
from typing import Self

KVM_API_VERSION = 12
KVMIO = 0xAE

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _S(ctypes.Structure):
    """Base: byte-exact copies in and out of ``bytes``."""

    def to_bytes(self) -> bytes:
        return bytes(memoryview(self).cast("B"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(f"{cls.__name__} is {ctypes.sizeof(cls)} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)


KvmStruct = _S  # the public name for "any of the structs below"


# -- memory ---------------------------------------------------------------------
class kvm_userspace_memory_region(_S):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1      # writes exit to userspace as MMIO (firmware images)


class kvm_dirty_log(_S):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]  # pointer


class kvm_clear_dirty_log(_S):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64),
                ("dirty_bitmap", u64)]  # pointer


class kvm_enable_cap(_S):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# -- vCPU registers ---------------------------------------------------------------
class kvm_regs(_S):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_S):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_S):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_S):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_fpu(_S):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class kvm_xsave(_S):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_S):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_S):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_debugregs(_S):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_vcpu_events(_S):
    """Pending exception / interrupt / NMI / SMI state. Round-tripped as a whole:
    KVM_GET_VCPU_EVENTS fills ``flags`` with the KVM_VCPUEVENT_VALID_* bits that
    KVM_SET_VCPU_EVENTS then honours."""

    _fields_ = [("exception", u8 * 8), ("interrupt", u8 * 4), ("nmi", u8 * 4),
                ("sipi_vector", u32), ("flags", u32), ("smi", u8 * 4),
                ("triple_fault", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_msr_entry(_S):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_S):
    """Header only; ``nmsrs`` kvm_msr_entry structs follow in the same buffer."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_S):
    """Header only; ``nmsrs`` u32 indices follow."""

    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_S):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_S):
    """Header only; ``nent`` kvm_cpuid_entry2 structs follow."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_signal_mask(_S):
    """Header only; ``len`` bytes of kernel sigset follow (8 on x86-64)."""

    _fields_ = [("len", u32)]


# -- the shared kvm_run page ------------------------------------------------------------
class kvm_run_io(_S):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_head(_S):
    """The fixed head of ``struct kvm_run`` plus the I/O member of the exit union
    (at offset 32); the rest of the page is read through raw offsets."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("io", kvm_run_io)]


KVM_RUN_IMMEDIATE_EXIT_OFFSET = 1
KVM_RUN_EXIT_UNION_OFFSET = 32

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR", KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}

# -- capabilities (KVM_CHECK_EXTENSION) ---------------------------------------------------
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MP_STATE = 14
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_TSC_CONTROL = 60

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# -- ioctls ------------------------------------------------------------------------------
# on /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# on a VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _ioc(_IOC_WRITE, 0x48, 8)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
# on a vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = _iow(0x8B, kvm_signal_mask)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, kvm_debugregs)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)

# -- the in-kernel irqchip and kvmclock (QEMU's kvm-apic, kvm-ioapic, kvmclock) ----------
KVM_APIC_REG_SIZE = 0x400
KVM_IOAPIC_NUM_PINS = 24
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
KVM_CLOCK_TSC_STABLE = 2
KVM_CAP_IRQCHIP = 0
KVM_CAP_ADJUST_CLOCK = 39


class kvm_lapic_state(_S):
    """The local APIC's 4 KiB register page, first KiB: register N at N * 16."""

    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class kvm_ioapic_state(_S):
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32),
                ("pad", u32), ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class kvm_irqchip(_S):
    """One chip's state: ``chip`` is a 512-byte union (PIC or IOAPIC)."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", ctypes.c_char * 512)]


class kvm_clock_data(_S):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_mp_state(_S):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_HALTED = 0, 3
KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 1 << 5

KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_GET_IRQCHIP = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, kvm_irqchip)      # sic: _IOR in <linux/kvm.h>
KVM_SET_CLOCK = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, kvm_clock_data)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)

# -- MSRs saved with the vCPU (those the host lists in KVM_GET_MSR_INDEX_LIST) ------------
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

# EFER, FS/GS base and the APIC base travel in kvm_sregs; the TSC is set last on
# load (after everything else) so it lands as close as possible to the resume.
SAVED_MSRS = (
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
    MSR_IA32_MISC_ENABLE, MSR_IA32_CR_PAT, MSR_MTRR_DEF_TYPE,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE, MSR_TSC_AUX,
    MSR_IA32_TSC_ADJUST, MSR_IA32_TSC,
)

_SIZES = {
    kvm_userspace_memory_region: 32, kvm_dirty_log: 16, kvm_clear_dirty_log: 24,
    kvm_enable_cap: 104, kvm_regs: 144, kvm_segment: 24, kvm_dtable: 16, kvm_sregs: 312,
    kvm_fpu: 416, kvm_xsave: 4096, kvm_xcrs: 392, kvm_debugregs: 128,
    kvm_vcpu_events: 64, kvm_msr_entry: 16, kvm_msrs: 8, kvm_cpuid_entry2: 40,
    kvm_cpuid2: 8, kvm_run_head: 48, kvm_lapic_state: 1024, kvm_ioapic_state: 216,
    kvm_irqchip: 520, kvm_clock_data: 48,
}
for _cls, _size in _SIZES.items():
    assert ctypes.sizeof(_cls) == _size, f"{_cls.__name__}: {ctypes.sizeof(_cls)} != {_size}"
