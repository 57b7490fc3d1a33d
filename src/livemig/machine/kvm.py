"""The KVM accelerator: the guest runs on a real vCPU through /dev/kvm.

Pure Python over ``fcntl.ioctl``, ctypes and ``mmap`` (no extension). One VM,
one memory slot at guest-physical 0 backed by the RAM block's mapping (so a
RAM offset *is* a guest-physical address), one vCPU run by the ``vcpu0``
thread. The guest is a 512-byte boot sector loaded at 0x7c00 and entered in
real mode at 0000:7c00 with no BIOS: the walk (guest/walk.S, shipped as
``walk-bootsector.bin`` and patched with the walk range) or a raw image.

Devices are emulated in userspace on I/O exits: COM1's data port goes to the
serial port, its line status reads "transmitter empty", port 0x92 reads A20
on; other ports read 0xff and ignore writes.

Stopping the vCPU (QEMU's technique): ``immediate_exit`` in ``kvm_run`` plus a
SIGUSR1 sent to the vCPU thread. The thread keeps SIGUSR1 blocked and gives
KVM a run-time signal mask without it (KVM_SET_SIGNAL_MASK), so the signal
interrupts KVM_RUN and is then consumed with ``sigtimedwait``: no Python
signal handler is installed, so the accelerator may be created on any thread
and leaves the process's SIGUSR1 disposition alone.

The walk runs at the vCPU's speed: ``GuestConfig.rate_pages_per_s`` paces the
soft accelerator only. On this project's machines (nested ``kvm_pvm``) that is
~300k pages/s, as for QEMU: the kernel emulates a guest without paging
instruction by instruction (the vCPU's ``insn_emulation`` stat counts ~5
instructions per page), with no exit to userspace. ``GuestConfig.pace_cycles``
and ``tick_pages`` are the guest's own (patched into the image, words 0x1ec
and 0x1e8): it busy-waits ``pace`` TSC cycles after each page (the vCPU's TSC
runs at the host's rate, ``machine/tsc.py``), so pages/s is about
``tsc_hz / (pace + per-page cost)``, and writes ``.`` to COM1 after every
``tick_pages`` pages, one I/O exit each.

Dirty logging is the classic KVM_GET_DIRTY_LOG (get, clear and re-protect in
one call). KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 was measured and not adopted: for
2 GiB it saves under 1.5 ms per sync and per log start, within the noise.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import sys
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livemig.machine import kvm_abi as abi
from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import GuestConfig
from livemig.machine.kvm_cpu_vmstate import KvmCpuState, section_msrs
from livemig.machine.ram import TARGET_PAGE_SIZE, RamBlock
from livemig.machine.serial import COM1_PORT, Serial
from livemig.threadname import name_native_thread

KVM_DEVICE = "/dev/kvm"

# -- the boot sector ------------------------------------------------------------
BOOT_ADDR = 0x7C00          # where a BIOS loads a boot sector (guest-physical bytes)
BOOTSECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
WALK_BOOTSECTOR_PATH = Path(__file__).with_name("walk-bootsector.bin")
# Byte offsets in walk-bootsector.bin of its patchable little-endian u32 words
# (guest/walk.S; guest/build.sh checks them against the symbol table).
WALK_TAG_OFFSET = 0x1F0     # b"LMWK"
WALK_START_OFFSET = 0x1F4   # first page of the walk (bytes), default 1 MiB
WALK_END_OFFSET = 0x1F8     # end of the walk (bytes, exclusive), default 100 MiB
WALK_TICK_OFFSET = 0x1E8    # a '.' to COM1 after every N pages; 0 = off
WALK_PACE_OFFSET = 0x1EC    # TSC cycles to busy-wait after each page; 0 = full speed
U32_MAX = 0xFFFFFFFF
WALK_TAG = b"LMWK"
# The walk as firmware (guest/walk-bios.S): the boot sector at offset 0, a
# loader that copies it to 0x7c00, the reset vector at 0xfff0; QEMU maps a
# -bios image so that it ends at 4 GiB ("pc.bios"), in multiples of 64 KiB.
WALK_BIOS_PATH = Path(__file__).with_name("walk-bios.bin")
WALK_BIOS_SIZE = 64 * 1024
WALK_BIOS_TAG_OFFSET = 0xFFF5   # b"LMWB", right after the reset vector's far jump
WALK_BIOS_TAG = b"LMWB"
WALK_END_MAX = 0xFFFFF000   # the walk is 32-bit code

# -- the PC's I/O ports the vCPU thread answers ----------------------------------------
COM1_LSR = COM1_PORT + 5                  # line status register
LSR_THR_EMPTY = 0x20 | 0x40               # THRE | TEMT: ready to send
PORT_A20 = 0x92                           # System Control Port A
A20_ON = 0x02                             # KVM has no A20 gate: always on
OPEN_BUS = 0xFF

# Private regions KVM needs for real mode on VMX without unrestricted guest
# (QEMU's addresses, just below the 4 GiB BIOS area); set only when RAM ends below.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFEFFC000

_SLOT = 0
_KICK_SIGNAL = signal.SIGUSR1
PAUSE_TIMEOUT_S = 5.0       # pause()/close() give up on a vCPU thread this stuck

# -- the saved vCPU state blob ---------------------------------------------------------
CPU_STATE_MAGIC = b"KVMC"
CPU_STATE_VERSION = 1
_HEADER = struct.Struct("<4sHHI")       # magic, version, section count, total bytes
_SECTION = struct.Struct("<4sI")        # tag, payload bytes
_TRAILER = struct.Struct("<I")          # crc32 of everything before it
_VMST = struct.Struct("<I")             # flags
_VMST_HALTED = 1 << 0
_FIXED_SECTIONS = {
    b"REGS": ctypes.sizeof(abi.kvm_regs), b"SREG": ctypes.sizeof(abi.kvm_sregs),
    b"XSAV": ctypes.sizeof(abi.kvm_xsave), b"FPU ": ctypes.sizeof(abi.kvm_fpu),
    b"XCRS": ctypes.sizeof(abi.kvm_xcrs), b"EVNT": ctypes.sizeof(abi.kvm_vcpu_events),
    b"DBGR": ctypes.sizeof(abi.kvm_debugregs), b"VMST": _VMST.size,
}
_MSR_ENTRY = struct.Struct("<IIQ")      # kvm_msr_entry
_MAX_MSRS = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


@dataclass(frozen=True)
class MemorySlot:
    """One KVM memory slot: ``size`` bytes of ``block`` from ``offset`` at
    guest-physical ``gpa``; ``readonly`` for firmware (KVM_MEM_READONLY)."""

    gpa: int
    block: RamBlock
    offset: int
    size: int
    readonly: bool = False


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    """ioctl with an unsigned long argument (fcntl.ioctl's int is only 32-bit signed)."""
    ret = _libc.ioctl(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# -- module helpers --------------------------------------------------------------------
def bootsector_image(start: int, end: int, *, tick_pages: int = 0, pace: int = 0) -> bytes:
    """The walk boot sector patched to walk ``[start, end)`` (guest-physical bytes,
    4 KiB aligned, end <= 0xFFFFF000), ticking on COM1 every ``tick_pages``
    pages and waiting ``pace`` TSC cycles after each page: 512 bytes ending in
    0x55 0xAA."""
    if not (0 <= tick_pages <= U32_MAX and 0 <= pace <= U32_MAX):
        raise ValueError("walk tick and pace must be unsigned 32-bit numbers")
    if start % TARGET_PAGE_SIZE or end % TARGET_PAGE_SIZE or not 0 <= start < end:
        raise ValueError("walk start and end must be 4 KiB aligned with start < end")
    if end > WALK_END_MAX:
        raise ValueError(f"walk end 0x{end:x} is beyond what the 32-bit walk reaches "
                         f"(0x{WALK_END_MAX:x})")
    image = bytearray(WALK_BOOTSECTOR_PATH.read_bytes())
    if (len(image) != BOOTSECTOR_SIZE or image[-2:] != BOOT_SIGNATURE
            or image[WALK_TAG_OFFSET:WALK_TAG_OFFSET + 4] != WALK_TAG):
        raise ValueError(f"{WALK_BOOTSECTOR_PATH} is not livemig's walk boot sector "
                         "(rebuild it with guest/build.sh)")
    struct.pack_into("<I", image, WALK_START_OFFSET, start)
    struct.pack_into("<I", image, WALK_END_OFFSET, end)
    struct.pack_into("<I", image, WALK_TICK_OFFSET, tick_pages)
    struct.pack_into("<I", image, WALK_PACE_OFFSET, pace)
    return bytes(image)


def walk_bios_image(start: int, end: int, *, tick_pages: int = 0, pace: int = 0) -> bytes:
    """The walk firmware (64 KiB, for ``-bios``) with its boot sector patched as
    :func:`bootsector_image` patches it: the patch words keep their offsets."""
    bios = WALK_BIOS_PATH.read_bytes()
    sector = bootsector_image(start, end, tick_pages=tick_pages, pace=pace)
    if (len(bios) != WALK_BIOS_SIZE
            or bios[WALK_BIOS_TAG_OFFSET:WALK_BIOS_TAG_OFFSET + 4] != WALK_BIOS_TAG
            or bios[:BOOTSECTOR_SIZE] != WALK_BOOTSECTOR_PATH.read_bytes()):
        raise ValueError(f"{WALK_BIOS_PATH} is not livemig's walk firmware for "
                         f"{WALK_BOOTSECTOR_PATH.name} (rebuild both with guest/build.sh)")
    return sector + bios[BOOTSECTOR_SIZE:]


def read_boot_image(path: str) -> bytes:
    """The first 512 bytes of a raw disk image; they must end in 0x55 0xAA."""
    with open(path, "rb") as f:
        sector = f.read(BOOTSECTOR_SIZE)
    if len(sector) < BOOTSECTOR_SIZE:
        raise ValueError(f"'{path}' is {len(sector)} bytes: shorter than a "
                         f"{BOOTSECTOR_SIZE}-byte boot sector")
    if sector[-2:] != BOOT_SIGNATURE:
        raise ValueError(f"'{path}' has no boot signature (bytes 510-511 are "
                         f"{sector[-2:].hex()}, expected 55aa)")
    return sector


def kvm_usable() -> tuple[bool, str]:
    """Whether a VM can be created here; the reason when not."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open {KVM_DEVICE}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, abi.KVM_GET_API_VERSION, 0)
        if version != abi.KVM_API_VERSION:
            return False, f"KVM API version {version}, expected {abi.KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, abi.KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"{KVM_DEVICE} does not create VMs: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return True, "ok"


def query_kvm(active: bool) -> dict[str, bool]:
    """QEMU's ``query-kvm`` answer: ``present`` is whether KVM support is built in
    (always, for livemig), ``enabled`` whether it is the running accelerator."""
    return {"enabled": bool(active), "present": True}


def _kernel_sigset(signals: Iterable[int]) -> bytes:
    """A set of signals as the kernel's 64-bit sigset_t (bit n-1 for signal n)."""
    bits = 0
    for sig in signals:
        if 0 < int(sig) <= 64:
            bits |= 1 << (int(sig) - 1)
    return struct.pack("<Q", bits)


class KvmAccelerator:
    """One vCPU on /dev/kvm. ``resume``/``pause``/``save``/``load`` from any thread
    (serialised by the caller, as the Machine does); guest code runs only on
    the ``vcpu0`` thread, inside KVM_RUN."""

    name = "kvm"

    def __init__(self, ram: RamBlock, dirty_log: DirtyLog, serial: Serial,
                 guest: GuestConfig, *, irqchip: bool = False,
                 slots: Sequence[MemorySlot] | None = None, firmware: bool = False) -> None:
        """``slots``: the guest-physical map (default: ``ram`` at 0); the slots of
        ``ram`` are dirty-logged. ``firmware``: the vCPU starts at the reset
        vector (0xfffffff0) in the firmware a slot maps there, no boot sector."""
        guest.validate(ram.size)
        self.irqchip = irqchip              # KVM's in-kernel LAPIC, IOAPIC and PICs
        self.ram, self.dirty_log, self.serial, self.guest = ram, dirty_log, serial, guest
        self.firmware = firmware
        self._image = b"" if firmware else self._guest_image(guest)  # fail early on a bad one
        self.slots = list(slots) if slots is not None else [MemorySlot(0, ram, 0, ram.size)]
        if ram.size < BOOT_ADDR + BOOTSECTOR_SIZE:
            raise ValueError(f"RAM of {ram.size} bytes cannot hold a boot sector at "
                             f"0x{BOOT_ADDR:x}")
        self._run = threading.Event()       # set while the guest should run
        self._idle = threading.Event()      # set while no guest code runs
        self._idle.set()
        self._cond = threading.Condition()
        self._quit = False
        self._thread: threading.Thread | None = None
        self._halted = False                # parked by the guest (HLT) or an error
        self.stop_reason: str | None = None  # why the vCPU parked on its own
        self._logging = False
        self._bitmaps = [np.zeros((slot.size // TARGET_PAGE_SIZE + 63) // 64, dtype=np.uint64)
                         for slot in self.slots]
        self._kvm_fd = self._vm_fd = self._vcpu_fd = -1
        self._run_map: mmap.mmap | None = None
        self._head: abi.kvm_run_head | None = None
        try:
            self._open()
        except BaseException:
            self._close_fds()
            raise
        self._reset_state = self._collect_state()
        self._reset_lapic = self._lapic_page() if irqchip else b""

    # -- setup -----------------------------------------------------------------------
    @staticmethod
    def _guest_image(guest: GuestConfig) -> bytes:
        if guest.kind == "walk":
            return bootsector_image(guest.start, guest.end, tick_pages=guest.tick_pages,
                                    pace=guest.pace_cycles)
        if guest.kind == "image":
            if not guest.image_path:
                raise ValueError("guest kind 'image' needs an image path")
            return read_boot_image(guest.image_path)
        raise ValueError(f"unknown guest kind '{guest.kind}'")

    def _open(self) -> None:
        try:
            self._kvm_fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {KVM_DEVICE}: {exc.strerror}") from None
        version = fcntl.ioctl(self._kvm_fd, abi.KVM_GET_API_VERSION, 0)
        if version != abi.KVM_API_VERSION:
            raise OSError(errno.ENOTSUP, f"KVM API version {version}, "
                                         f"expected {abi.KVM_API_VERSION}")
        self._caps = {cap: self._check_extension(cap) for cap in (
            abi.KVM_CAP_SET_TSS_ADDR, abi.KVM_CAP_SET_IDENTITY_MAP_ADDR, abi.KVM_CAP_XSAVE,
            abi.KVM_CAP_XCRS, abi.KVM_CAP_VCPU_EVENTS, abi.KVM_CAP_DEBUGREGS,
            abi.KVM_CAP_IMMEDIATE_EXIT)}
        if not self._caps[abi.KVM_CAP_IMMEDIATE_EXIT]:
            raise OSError(errno.ENOTSUP, "KVM lacks KVM_CAP_IMMEDIATE_EXIT (Linux >= 4.11)")
        self._vm_fd = fcntl.ioctl(self._kvm_fd, abi.KVM_CREATE_VM, 0)
        if self.ram.size <= IDENTITY_MAP_ADDR:
            if self._caps[abi.KVM_CAP_SET_IDENTITY_MAP_ADDR]:
                fcntl.ioctl(self._vm_fd, abi.KVM_SET_IDENTITY_MAP_ADDR,
                            struct.pack("<Q", IDENTITY_MAP_ADDR))
            if self._caps[abi.KVM_CAP_SET_TSS_ADDR]:
                _ioctl_ulong(self._vm_fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR)
        if any(slot.readonly for slot in self.slots) and \
                not self._check_extension(abi.KVM_CAP_READONLY_MEM):
            raise OSError(errno.ENOTSUP, "KVM lacks KVM_CAP_READONLY_MEM (firmware mapping)")
        self._set_slots(log=False)
        if self.irqchip:        # before the vCPU, so it gets an in-kernel LAPIC
            if not self._check_extension(abi.KVM_CAP_IRQCHIP):
                raise OSError(errno.ENOTSUP, "KVM lacks KVM_CAP_IRQCHIP")
            fcntl.ioctl(self._vm_fd, abi.KVM_CREATE_IRQCHIP, 0)
        self._vcpu_fd = fcntl.ioctl(self._vm_fd, abi.KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(self._kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0)
        self._run_map = mmap.mmap(self._vcpu_fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._head = abi.kvm_run_head.from_buffer(self._run_map)
        self._set_cpuid()
        self._msr_indices = self._savable_msrs()

    def _check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self._kvm_fd, abi.KVM_CHECK_EXTENSION, cap)

    def _set_slots(self, *, log: bool) -> None:
        """Register every slot; ``log``: the RAM block's with dirty logging."""
        for n, slot in enumerate(self.slots):
            flags = abi.KVM_MEM_READONLY if slot.readonly else 0
            if log and slot.block is self.ram and not slot.readonly:
                flags |= abi.KVM_MEM_LOG_DIRTY_PAGES
            region = abi.kvm_userspace_memory_region(
                slot=_SLOT + n, flags=flags, guest_phys_addr=slot.gpa, memory_size=slot.size,
                userspace_addr=slot.block.host_address + slot.offset)
            fcntl.ioctl(self._vm_fd, abi.KVM_SET_USER_MEMORY_REGION, region.to_bytes())

    def _set_cpuid(self) -> None:
        """Give the guest the host's supported CPUID (like ``-cpu host``)."""
        nent = 128
        while True:
            buf = bytearray(8 + nent * ctypes.sizeof(abi.kvm_cpuid_entry2))
            struct.pack_into("<I", buf, 0, nent)
            try:
                fcntl.ioctl(self._kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
                break
            except OSError as exc:
                if exc.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2
        fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_CPUID2, buf)
        self._cpuid: dict[tuple[int, int], abi.kvm_cpuid_entry2] = {}
        for i in range(struct.unpack_from("<I", buf)[0]):
            entry = abi.kvm_cpuid_entry2.from_buffer_copy(buf, 8 + i * 40)
            self._cpuid[(entry.function, entry.index)] = entry

    def _savable_msrs(self) -> list[int]:
        buf = bytearray(4 + 4 * 1024)
        struct.pack_into("<I", buf, 0, 1024)
        fcntl.ioctl(self._kvm_fd, abi.KVM_GET_MSR_INDEX_LIST, buf)
        (n,) = struct.unpack_from("<I", buf)
        listed = set(struct.unpack_from(f"<{n}I", buf, 4))
        self._listed_msrs = listed
        return [m for m in abi.SAVED_MSRS if m in listed]

    # -- control (any thread) ----------------------------------------------------------
    def reset(self) -> None:
        """Power-on vCPU state, the boot sector at 0x7c00, CS:IP = 0000:7c00 in real
        mode with the registers a BIOS leaves (DL = 0x80, the first hard disk)."""
        self._require_paused("reset")
        self._apply_state(self._reset_state)
        if self.firmware:       # KVM's reset state: F000:FFF0, base 0xffff0000
            if self.irqchip:    # QEMU's LAPIC reset: every LVT masked (no PIC: LINT0 too)
                lapic = bytearray(self._reset_lapic)
                struct.pack_into("<I", lapic, 0x350, 0x10000)
                fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_LAPIC,
                            abi.kvm_lapic_state.from_bytes(bytes(lapic)))
            # QEMU's x86 CPU reset: IA32_MISC_ENABLE is fast strings only (KVM's
            # reset value has the PEBS/BTS-unavailable bits instead).
            self.set_msrs({abi.MSR_IA32_MISC_ENABLE: 1})
            self._halted, self.stop_reason = False, None
            return
        self.ram.write(BOOT_ADDR, self._image)
        if self._logging:  # host writes are not in KVM's log
            page = BOOT_ADDR // TARGET_PAGE_SIZE
            self.dirty_log.mark_range(page, page + 1)
        sregs = abi.kvm_sregs()
        fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_SREGS, sregs)
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base, seg.selector, seg.limit = 0, 0, 0xFFFF
            seg.present, seg.s, seg.dpl, seg.db, seg.l, seg.g, seg.unusable = 1, 1, 0, 0, 0, 0, 0
            seg.type = 3  # read/write data, accessed
        sregs.cs.type = 11  # execute/read code, accessed
        sregs.cr0 = 0x10  # ET; caches on, as SeaBIOS leaves it
        fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_SREGS, sregs.to_bytes())
        regs = abi.kvm_regs(rip=BOOT_ADDR, rflags=0x2, rsp=BOOT_ADDR, rdx=0x80)
        fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_REGS, regs.to_bytes())
        self._halted, self.stop_reason = False, None

    def resume(self) -> None:
        if self._quit:
            raise RuntimeError("the KVM accelerator is closed")
        head, _ = self._kvm_run()
        if self._thread is None:
            self._thread = threading.Thread(target=self._vcpu_thread, name="vcpu0", daemon=True)
            self._thread.start()
        with self._cond:
            head.immediate_exit = 0
            self._idle.clear()
            self._run.set()
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            if self._head is not None:
                self._head.immediate_exit = 1   # a KVM_RUN about to start returns at once
            self._run.clear()
            self._cond.notify_all()
            self._kick()
        if self._thread is not None and not self._idle.wait(PAUSE_TIMEOUT_S):
            raise RuntimeError(f"vcpu0 did not stop within {PAUSE_TIMEOUT_S} s")
        self._idle.set()

    def _kick(self) -> None:
        """Interrupt a KVM_RUN in progress (the signal stays pending, harmless, if
        the thread is elsewhere). Called with ``_cond`` held: the thread ends
        only after taking it, so the thread id is still valid here."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            assert thread.ident is not None  # alive, so started
            signal.pthread_kill(thread.ident, _KICK_SIGNAL)

    @property
    def running(self) -> bool:
        return self._run.is_set()

    @property
    def halted(self) -> bool:
        """The guest parked the vCPU itself (HLT) or it stopped on an error
        (``stop_reason`` says which)."""
        return self._halted

    # -- dirty logging -----------------------------------------------------------------
    def log_dirty_start(self) -> None:
        """Re-register the slot with KVM_MEM_LOG_DIRTY_PAGES (KVM write-protects it)."""
        if not self._logging:
            self._set_slots(log=True)
            self._logging = True
        self.dirty_log.enabled = True

    def log_dirty_stop(self) -> None:
        if self._logging:
            self._set_slots(log=False)
            self._logging = False
        self.dirty_log.enabled = False

    def log_dirty_sync(self) -> None:
        """KVM_GET_DIRTY_LOG (get and clear, re-protecting what was dirty) merged
        into the DirtyLog."""
        if not self._logging:
            return
        for n, slot in enumerate(self.slots):
            if slot.block is not self.ram or slot.readonly:
                continue
            bitmap = self._bitmaps[n]
            log = abi.kvm_dirty_log(slot=_SLOT + n, dirty_bitmap=bitmap.ctypes.data)
            fcntl.ioctl(self._vm_fd, abi.KVM_GET_DIRTY_LOG, log.to_bytes())
            self.dirty_log.merge_packed(bitmap, first_page=slot.offset // TARGET_PAGE_SIZE,
                                        npages=slot.size // TARGET_PAGE_SIZE)

    # -- vCPU state ----------------------------------------------------------------------
    def save_cpu_state(self) -> bytes:
        """Registers, segment/control registers, XSAVE (or FPU) and XCRs, the MSRs
        in ``kvm_abi.SAVED_MSRS`` that this host has, pending events, debug
        registers and the halted flag, as a ``KVMC`` blob (version 1, CRC32)."""
        self._require_paused("save the vCPU state")
        sections = self._collect_state()
        body = b"".join(_SECTION.pack(tag, len(data)) + data for tag, data in sections.items())
        total = _HEADER.size + len(body) + _TRAILER.size
        blob = _HEADER.pack(CPU_STATE_MAGIC, CPU_STATE_VERSION, len(sections), total) + body
        return blob + _TRAILER.pack(zlib.crc32(blob))

    def load_cpu_state(self, data: bytes) -> None:
        self._require_paused("load the vCPU state")
        sections = self._parse_state(bytes(data))
        self._apply_state(sections)

    @staticmethod
    def cpu_state_layout(data: bytes) -> list[tuple[str, str, int]]:
        """The parts of a KVMC blob as (name, VMState type, bytes), in order, for
        the VM description: the header, each section's tag, size and payload,
        the CRC. Little-endian integers are ``buffer`` (VMState's are big-endian)."""
        out = [("magic", "buffer", 4), ("version", "buffer", 2), ("count", "buffer", 2),
               ("total", "buffer", 4)]
        pos, end = _HEADER.size, len(data) - _TRAILER.size
        while pos + _SECTION.size <= end:
            tag, size = _SECTION.unpack_from(data, pos)
            name = tag.decode("ascii", "replace").strip().lower()
            out += [(f"{name}.tag", "buffer", 4), (f"{name}.size", "buffer", 4)]
            if size:
                out.append((name, "buffer", min(size, end - pos - _SECTION.size)))
            pos += _SECTION.size + size
        out.append(("crc32", "buffer", _TRAILER.size))
        return out

    def _collect_state(self) -> dict[bytes, bytes]:
        fd, out = self._vcpu_fd, {}
        for tag, struct_cls, get, _set in self._state_parts():
            obj = struct_cls()
            fcntl.ioctl(fd, get, obj)
            out[tag] = obj.to_bytes()
        out[b"MSRS"] = self._get_msrs()
        out[b"VMST"] = _VMST.pack(_VMST_HALTED if self._halted else 0)
        return out

    def _state_parts(self) -> list[tuple[bytes, type[abi.KvmStruct], int, int]]:
        """(tag, struct, GET ioctl, SET ioctl) of the fixed-size parts this host
        has, in QEMU's put order: regs, xsave, xcrs, sregs (MSRs come next),
        then events and debug registers."""
        caps = self._caps
        parts: list[tuple[bytes, type[abi.KvmStruct], int, int]] = [
            (b"REGS", abi.kvm_regs, abi.KVM_GET_REGS, abi.KVM_SET_REGS)]
        if caps[abi.KVM_CAP_XSAVE]:
            parts.append((b"XSAV", abi.kvm_xsave, abi.KVM_GET_XSAVE, abi.KVM_SET_XSAVE))
        else:
            parts.append((b"FPU ", abi.kvm_fpu, abi.KVM_GET_FPU, abi.KVM_SET_FPU))
        if caps[abi.KVM_CAP_XCRS]:
            parts.append((b"XCRS", abi.kvm_xcrs, abi.KVM_GET_XCRS, abi.KVM_SET_XCRS))
        parts.append((b"SREG", abi.kvm_sregs, abi.KVM_GET_SREGS, abi.KVM_SET_SREGS))
        if caps[abi.KVM_CAP_VCPU_EVENTS]:
            parts.append((b"EVNT", abi.kvm_vcpu_events, abi.KVM_GET_VCPU_EVENTS,
                          abi.KVM_SET_VCPU_EVENTS))
        if caps[abi.KVM_CAP_DEBUGREGS]:
            parts.append((b"DBGR", abi.kvm_debugregs, abi.KVM_GET_DEBUGREGS,
                          abi.KVM_SET_DEBUGREGS))
        return parts

    def _get_msrs(self) -> bytes:
        n = len(self._msr_indices)
        buf = bytearray(8 + 16 * n)
        struct.pack_into("<I", buf, 0, n)
        for i, index in enumerate(self._msr_indices):
            _MSR_ENTRY.pack_into(buf, 8 + 16 * i, index, 0, 0)
        got = fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_MSRS, buf)
        return bytes(buf[8:8 + 16 * got])

    def _parse_state(self, data: bytes) -> dict[bytes, bytes]:
        """Split and check a KVMC blob; ValueError saying what is wrong."""
        if len(data) < _HEADER.size + _TRAILER.size:
            raise ValueError(f"KVM vCPU state is {len(data)} bytes: too short for a "
                             "KVMC blob")
        magic, version, count, total = _HEADER.unpack_from(data)
        if magic != CPU_STATE_MAGIC:
            raise ValueError(f"KVM vCPU state has magic {magic!r}, expected {CPU_STATE_MAGIC!r} "
                             "(was the source another accelerator?)")
        if version != CPU_STATE_VERSION:
            raise ValueError(f"KVM vCPU state version {version} is not supported "
                             f"(this build reads version {CPU_STATE_VERSION})")
        if total != len(data):
            raise ValueError(f"KVM vCPU state says {total} bytes but {len(data)} were given")
        (crc,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
        if crc != zlib.crc32(data[:-_TRAILER.size]):
            raise ValueError("KVM vCPU state fails its CRC32 check (corrupted)")
        sections: dict[bytes, bytes] = {}
        pos, end = _HEADER.size, len(data) - _TRAILER.size
        for _ in range(count):
            if pos + _SECTION.size > end:
                raise ValueError("KVM vCPU state is truncated inside a section header")
            tag, size = _SECTION.unpack_from(data, pos)
            pos += _SECTION.size
            if pos + size > end:
                raise ValueError(f"KVM vCPU state section {tag!r} runs past the end")
            if tag in sections:
                raise ValueError(f"KVM vCPU state has section {tag!r} twice")
            if tag == b"MSRS":
                if size % _MSR_ENTRY.size or size // _MSR_ENTRY.size > _MAX_MSRS:
                    raise ValueError(f"KVM vCPU state MSR section has a bad size ({size})")
            elif tag not in _FIXED_SECTIONS:
                raise ValueError(f"KVM vCPU state has unknown section {tag!r}")
            elif size != _FIXED_SECTIONS[tag]:
                raise ValueError(f"KVM vCPU state section {tag!r} is {size} bytes, "
                                 f"expected {_FIXED_SECTIONS[tag]}")
            sections[tag] = data[pos:pos + size]
            pos += size
        if pos != end:
            raise ValueError(f"KVM vCPU state has {end - pos} stray bytes after its sections")
        wanted = {part[0] for part in self._state_parts()} | {b"MSRS", b"VMST"}
        missing = wanted - sections.keys()
        if missing:
            raise ValueError("KVM vCPU state lacks section(s) "
                             f"{', '.join(sorted(t.decode() for t in missing))} "
                             "(saved on a host with other KVM capabilities?)")
        extra = sections.keys() - wanted
        if extra:
            raise ValueError("KVM vCPU state has section(s) this host cannot load: "
                             f"{', '.join(sorted(t.decode() for t in extra))}")
        for i in range(0, len(sections[b"MSRS"]), _MSR_ENTRY.size):
            index = _MSR_ENTRY.unpack_from(sections[b"MSRS"], i)[0]
            if index not in self._msr_indices:
                raise ValueError(f"KVM vCPU state has MSR 0x{index:x}, which this host's "
                                 "KVM does not save/restore")
        return sections

    def _apply_state(self, sections: dict[bytes, bytes]) -> None:
        """Put every part back in QEMU's order: regs, xsave, xcrs, sregs, MSRs
        (the TSC last of them), events, debug registers."""
        late = (b"EVNT", b"DBGR")
        parts = self._state_parts()
        for tag, _cls, _get, set_request in parts:
            if tag not in late:
                fcntl.ioctl(self._vcpu_fd, set_request, bytearray(sections[tag]))
        msrs = sections[b"MSRS"]
        n = len(msrs) // _MSR_ENTRY.size
        done = fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_MSRS,
                           bytearray(struct.pack("<II", n, 0) + msrs))
        if done != n:
            index = _MSR_ENTRY.unpack_from(msrs, done * _MSR_ENTRY.size)[0]
            raise ValueError(f"KVM refused MSR 0x{index:x} from the saved vCPU state")
        for tag, _cls, _get, set_request in parts:
            if tag in late:
                fcntl.ioctl(self._vcpu_fd, set_request, bytearray(sections[tag]))
        (flags,) = _VMST.unpack(sections[b"VMST"])
        self._halted = bool(flags & _VMST_HALTED)
        self.stop_reason = "halted (restored)" if self._halted else None

    # -- the vCPU as QEMU's cpu section sees it (machine/kvm_cpu_vmstate.py) -------------
    def get_kvm_cpu(self) -> KvmCpuState:
        """Every part QEMU's ``cpu`` section is made from, read while paused."""
        self._require_paused("read the vCPU state")
        fd = self._vcpu_fd
        regs, sregs = abi.kvm_regs(), abi.kvm_sregs()
        fcntl.ioctl(fd, abi.KVM_GET_REGS, regs)
        fcntl.ioctl(fd, abi.KVM_GET_SREGS, sregs)
        xsave = abi.kvm_xsave()
        fcntl.ioctl(fd, abi.KVM_GET_XSAVE, xsave)
        xcrs = abi.kvm_xcrs()
        fcntl.ioctl(fd, abi.KVM_GET_XCRS, xcrs)
        xcr0 = next((int(x.value) for x in xcrs.xcrs[:xcrs.nr_xcrs] if x.xcr == 0), 1)
        events, debugregs = abi.kvm_vcpu_events(), abi.kvm_debugregs()
        fcntl.ioctl(fd, abi.KVM_GET_VCPU_EVENTS, events)
        fcntl.ioctl(fd, abi.KVM_GET_DEBUGREGS, debugregs)
        mp = abi.kvm_mp_state()
        fcntl.ioctl(fd, abi.KVM_GET_MP_STATE, mp)
        return KvmCpuState(
            regs=regs, sregs=sregs, xsave=xsave.to_bytes(), xcr0=xcr0, events=events,
            debugregs=debugregs, msrs=self.get_msrs(section_msrs()), mp_state=int(mp.mp_state),
            tsc_khz=fcntl.ioctl(fd, abi.KVM_GET_TSC_KHZ, 0), xsave_offsets=self._xsave_offsets(),
            phys_bits=self._phys_bits())

    def set_kvm_cpu(self, st: KvmCpuState) -> None:
        """Put a state back in QEMU's order: regs, xsave, xcrs, sregs, MSRs (the TSC
        last), events, mp_state, debug registers; the TSC rate first."""
        self._require_paused("load the vCPU state")
        fd = self._vcpu_fd
        khz = fcntl.ioctl(fd, abi.KVM_GET_TSC_KHZ, 0)
        if st.tsc_khz and st.tsc_khz != khz:
            try:
                _ioctl_ulong(fd, abi.KVM_SET_TSC_KHZ, st.tsc_khz)
            except OSError as exc:
                raise ValueError(f"cpu: the TSC runs at {khz} kHz here and KVM cannot set "
                                 f"the guest's {st.tsc_khz} kHz: {exc.strerror}") from None
        fcntl.ioctl(fd, abi.KVM_SET_REGS, st.regs.to_bytes())
        fcntl.ioctl(fd, abi.KVM_SET_XSAVE, bytearray(st.xsave))
        xcrs = abi.kvm_xcrs(nr_xcrs=1)
        xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, st.xcr0
        fcntl.ioctl(fd, abi.KVM_SET_XCRS, xcrs.to_bytes())
        fcntl.ioctl(fd, abi.KVM_SET_SREGS, st.sregs.to_bytes())
        self.set_msrs(st.msrs)
        fcntl.ioctl(fd, abi.KVM_SET_VCPU_EVENTS, st.events.to_bytes())
        fcntl.ioctl(fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=st.mp_state).to_bytes())
        fcntl.ioctl(fd, abi.KVM_SET_DEBUGREGS, st.debugregs.to_bytes())
        self._halted, self.stop_reason = False, None

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """The MSRs of ``indices`` that this KVM lists (KVM_GET_MSR_INDEX_LIST)."""
        wanted = [i for i in indices if i in self._listed_msrs]
        buf = bytearray(8 + 16 * len(wanted))
        struct.pack_into("<I", buf, 0, len(wanted))
        for n, index in enumerate(wanted):
            _MSR_ENTRY.pack_into(buf, 8 + 16 * n, index, 0, 0)
        got = fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_MSRS, buf)
        return {_MSR_ENTRY.unpack_from(buf, 8 + 16 * n)[0]: _MSR_ENTRY.unpack_from(
            buf, 8 + 16 * n)[2] for n in range(got)}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """Set MSRs in order (a dict keeps it); those already at the value are left
        alone, so an MSR KVM lets the host read but not rewrite is no error."""
        current = self.get_msrs(msrs)
        todo = [(i, v) for i, v in msrs.items() if i in current and current[i] != v]
        buf = bytearray(struct.pack("<II", len(todo), 0))
        for index, value in todo:
            buf += _MSR_ENTRY.pack(index, 0, value & 0xFFFFFFFFFFFFFFFF)
        done = fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_MSRS, buf)
        if done != len(todo):
            index, value = todo[done]
            raise ValueError(f"cpu: KVM refused MSR 0x{index:x} = 0x{value:x}")

    def _xsave_offsets(self) -> dict[int, int]:
        """XSAVE component -> offset in the standard format (CPUID 0xD, sub-leaf n)."""
        out = {}
        for comp in range(2, 19):
            entry = self._cpuid.get((0xD, comp))
            if entry is not None and entry.eax and entry.ebx:
                out[comp] = int(entry.ebx)
        return out

    def _phys_bits(self) -> int:
        entry = self._cpuid.get((0x80000008, 0))
        return int(entry.eax & 0xFF) if entry is not None and entry.eax & 0xFF else 36

    def _lapic_page(self) -> bytes:
        buf = bytearray(ctypes.sizeof(abi.kvm_lapic_state))
        fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_LAPIC, buf)
        return bytes(buf)

    # -- the in-kernel irqchip and kvmclock (QEMU's kvm-apic, kvm-ioapic, kvmclock) ------
    def get_lapic(self) -> bytes:
        """The LAPIC's first KiB of registers (KVM_GET_LAPIC)."""
        self._require_irqchip("read the LAPIC")
        self._require_paused("read the LAPIC")
        buf = bytearray(ctypes.sizeof(abi.kvm_lapic_state))
        fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_LAPIC, buf)
        return bytes(buf)

    def set_lapic(self, regs: bytes) -> None:
        self._require_irqchip("load the LAPIC")
        self._require_paused("load the LAPIC")
        fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_LAPIC, abi.kvm_lapic_state.from_bytes(regs))

    def apic_base(self) -> int:
        """MSR_IA32_APICBASE, as KVM keeps it in the special registers."""
        self._require_paused("read the APIC base")
        sregs = abi.kvm_sregs()
        fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_SREGS, sregs)
        return int(sregs.apic_base)

    def get_ioapic(self) -> abi.kvm_ioapic_state:
        self._require_irqchip("read the IOAPIC")
        chip = abi.kvm_irqchip(chip_id=abi.KVM_IRQCHIP_IOAPIC)
        fcntl.ioctl(self._vm_fd, abi.KVM_GET_IRQCHIP, chip)
        return abi.kvm_ioapic_state.from_bytes(
            chip.to_bytes()[8:8 + ctypes.sizeof(abi.kvm_ioapic_state)])

    def set_ioapic(self, state: abi.kvm_ioapic_state) -> None:
        self._require_irqchip("load the IOAPIC")
        chip = abi.kvm_irqchip.from_bytes(
            struct.pack("<II", abi.KVM_IRQCHIP_IOAPIC, 0) + state.to_bytes().ljust(512, b"\0"))
        fcntl.ioctl(self._vm_fd, abi.KVM_SET_IRQCHIP, chip)

    def get_clock(self) -> abi.kvm_clock_data:
        """kvmclock's nanoseconds and flags (KVM_GET_CLOCK)."""
        data = abi.kvm_clock_data()
        fcntl.ioctl(self._vm_fd, abi.KVM_GET_CLOCK, data)
        return data

    def clock_reliable(self) -> bool:
        """QEMU's kvm_has_adjust_clock_stable: KVM_CAP_ADJUST_CLOCK reports TSC_STABLE."""
        return bool(self._check_extension(abi.KVM_CAP_ADJUST_CLOCK) & abi.KVM_CLOCK_TSC_STABLE)

    def set_clock(self, clock_ns: int) -> None:
        fcntl.ioctl(self._vm_fd, abi.KVM_SET_CLOCK, abi.kvm_clock_data(clock=clock_ns))

    def _require_irqchip(self, what: str) -> None:
        if not self.irqchip:
            raise RuntimeError(f"cannot {what}: the VM has no in-kernel irqchip")

    def _require_paused(self, what: str) -> None:
        if not self._idle.is_set():
            raise RuntimeError(f"cannot {what} while the vCPU runs (pause first)")

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            self._quit = True
            self._run.clear()
            if self._head is not None:
                self._head.immediate_exit = 1
            self._cond.notify_all()
            self._kick()
        if self._thread is not None:
            self._thread.join(timeout=PAUSE_TIMEOUT_S)
            if self._thread.is_alive():
                print("livemig: kvm: vcpu0 did not stop; leaking its VM", file=sys.stderr)
                return
        self._close_fds()

    def _kvm_run(self) -> tuple[abi.kvm_run_head, mmap.mmap]:
        """The vCPU's mmapped ``struct kvm_run``: its head and the whole map.
        Set up by ``__init__`` and dropped only by ``close``."""
        head, run_map = self._head, self._run_map
        assert head is not None and run_map is not None, "the KVM vCPU is not mapped"
        return head, run_map

    def _close_fds(self) -> None:
        self._head = None
        if self._run_map is not None:
            try:
                self._run_map.close()
            except BufferError:
                pass  # a ctypes view still alive; unmapped when collected
            self._run_map = None
        for attr in ("_vcpu_fd", "_vm_fd", "_kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    # -- vCPU thread -----------------------------------------------------------------------
    def _vcpu_thread(self) -> None:
        name_native_thread()
        # SIGUSR1 stays blocked here except inside KVM_RUN, where it makes the
        # ioctl fail with EINTR; it is then consumed, never delivered.
        normal = signal.pthread_sigmask(signal.SIG_BLOCK, {_KICK_SIGNAL})
        run_mask = _kernel_sigset(set(normal) - {_KICK_SIGNAL})
        try:
            fcntl.ioctl(self._vcpu_fd, abi.KVM_SET_SIGNAL_MASK,
                        struct.pack("<I", len(run_mask)) + run_mask)
        except OSError as exc:
            self._park(f"KVM_SET_SIGNAL_MASK failed: {exc}")
        while True:
            with self._cond:
                while (not self._run.is_set() or self._halted) and not self._quit:
                    self._idle.set()
                    self._cond.wait()
                if self._quit:
                    self._idle.set()
                    return
            try:
                self._run_guest()
            except Exception as exc:  # keep the thread: pause() must still find it idle
                self._park(f"vCPU thread error: {exc!r}")

    def _run_guest(self) -> None:
        """KVM_RUN until paused (EINTR) or the vCPU parks itself. An exit is always
        followed by another KVM_RUN before parking, so a port read's answer is
        in the guest's registers before anyone saves them."""
        (head, run_map), fd = self._kvm_run(), self._vcpu_fd
        while True:
            try:
                fcntl.ioctl(fd, abi.KVM_RUN, 0)
            except InterruptedError:
                signal.sigtimedwait({_KICK_SIGNAL}, 0)
                if not self._run.is_set():
                    return
                continue
            except OSError as exc:
                self._park(f"KVM_RUN failed: {exc}")
                return
            reason = head.exit_reason
            if reason == abi.KVM_EXIT_IO:
                self._handle_io(run_map, head.io)
            elif reason == abi.KVM_EXIT_HLT:
                self._halted, self.stop_reason = True, "guest halted"
                return
            elif reason == abi.KVM_EXIT_INTR:
                if not self._run.is_set():
                    return
            else:
                self._park(self._describe_exit(run_map, reason))
                return

    def _handle_io(self, run_map: mmap.mmap, io: abi.kvm_run_io) -> None:
        nbytes = io.size * io.count
        lo = io.data_offset
        if io.direction == abi.KVM_EXIT_IO_OUT:
            if io.port == COM1_PORT:
                data = run_map[lo:lo + nbytes]
                self.serial.write(data if io.size == 1 else data[::io.size])
            return
        if io.port == COM1_LSR:
            value = LSR_THR_EMPTY
        elif io.port == PORT_A20:
            value = A20_ON
        else:
            value = OPEN_BUS
        if io.size == 1:
            run_map[lo:lo + nbytes] = bytes([value]) * io.count
        else:  # wider reads: the value in the low byte, open bus above
            run_map[lo:lo + nbytes] = (bytes([value]) + b"\xff" * (io.size - 1)) * io.count

    def _describe_exit(self, run_map: mmap.mmap, reason: int) -> str:
        name = abi.EXIT_REASON_NAMES.get(reason, "?")
        union = run_map[abi.KVM_RUN_EXIT_UNION_OFFSET:abi.KVM_RUN_EXIT_UNION_OFFSET + 24]
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = struct.unpack_from("<QI", union)
            detail = f" hardware_entry_failure_reason=0x{hw:x} cpu={cpu}"
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from("<II", union)
            detail = f" suberror={suberror} ndata={ndata}"
        elif reason == abi.KVM_EXIT_MMIO:
            addr, _data, length, is_write = struct.unpack_from("<Q8sIB", union)
            detail = (f" {'write' if is_write else 'read'} of {length} bytes at "
                      f"guest-physical 0x{addr:x} (outside RAM)")
        else:
            detail = ""
        return f"unexpected exit {name} ({reason}){detail}"

    def _park(self, why: str) -> None:
        try:
            regs = abi.kvm_regs()
            fcntl.ioctl(self._vcpu_fd, abi.KVM_GET_REGS, regs)
            where = f" at rip=0x{regs.rip:x}"
        except OSError:
            where = ""
        self._halted, self.stop_reason = True, why + where
        print(f"livemig: kvm: vcpu0: {why}{where}; vCPU parked", file=sys.stderr)
