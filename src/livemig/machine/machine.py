"""The Machine: RAM, one vCPU (via an accelerator), serial port, devices, run state.

It owns *what* the VM is and how it starts and stops; it knows nothing of
migration policy. Run-state changes are reported through ``on_event`` (the
QMP layer turns them into ``STOP``/``RESUME`` events).
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from livemig.machine.accel_device import AccelDevice, AccelDeviceConfig
from livemig.machine.accel_vmstate import AccelHandler
from livemig.machine.accelerator import Accelerator
from livemig.machine.cpu_vmstate import CpuHandler
from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import GuestConfig
from livemig.machine.hostmem import HostMemoryBackend
from livemig.machine.microvm import (
    MICROVM_MACHINE,
    RAM_SECTION_ID,
    MicrovmMemory,
    MicrovmOptions,
    MicrovmState,
    firmware_image,
)
from livemig.machine.microvm import (
    RAM_BLOCK_NAME as MICROVM_RAM_BLOCK_NAME,
)
from livemig.machine.ram import RamBlock
from livemig.machine.runstate import RunState, check_transition
from livemig.machine.serial import Serial
from livemig.machine.throttle import CpuThrottle
from livemig.machine.vmstate import SaveVMHandlers

MACHINE_TYPE = "livemig-pc-10.0"
NONE_MACHINE = "none"     # QEMU's empty machine: no vCPU, no guest (libvirt's probe)
RAM_BLOCK_NAME = "pc.ram"


@dataclass
class MachineConfig:
    ram_size: int = 128 << 20
    accel: str = "auto"          # soft | kvm | auto
    guest: GuestConfig = field(default_factory=GuestConfig)
    serial_path: str | None = None
    serial: Serial | None = None  # a ready Serial (socket chardev): wins over serial_path
    devices: list[AccelDeviceConfig] = field(default_factory=list)
    name: str | None = None
    uuid: str | None = None
    incoming: bool = False       # -incoming given: start in inmigrate
    start_paused: bool = False   # -S
    mem_prealloc: bool = False   # -mem-prealloc
    machine_type: str = MACHINE_TYPE   # or NONE_MACHINE, MICROVM_MACHINE
    microvm: MicrovmOptions = field(default_factory=MicrovmOptions)  # -M microvm,...
    bios_path: str | None = None  # -bios (microvm): default the walk firmware
    dump_guest_core: bool = True  # -machine dump-guest-core=off: MADV_DONTDUMP on RAM
    ram_backend: HostMemoryBackend | None = None  # -machine memory-backend=ID's object


def kvm_usable() -> tuple[bool, str]:
    try:
        from livemig.machine import kvm
    except ImportError as exc:  # pragma: no cover - kvm module always ships
        return False, f"kvm support unavailable: {exc}"
    return kvm.kvm_usable()


def choose_accelerator(name: str) -> str:
    """Resolve ``auto`` to ``kvm`` when /dev/kvm is usable, else ``soft``."""
    if name == "auto":
        return "kvm" if kvm_usable()[0] else "soft"
    if name == "kvm":
        ok, why = kvm_usable()
        if not ok:
            raise ValueError(f"failed to initialize kvm: {why}")
    elif name != "soft":
        raise ValueError(f"invalid accelerator {name}")
    return name


class NoVcpu:
    """The empty machine's accelerator (QEMU's ``-machine none``): no vCPU, so
    nothing runs, nothing is dirtied and there is no CPU state to migrate."""

    def __init__(self, name: str) -> None:
        self.name = name

    def reset(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def pause(self) -> None:
        pass

    @property
    def running(self) -> bool:
        return False

    def log_dirty_start(self) -> None:
        pass

    def log_dirty_stop(self) -> None:
        pass

    def log_dirty_sync(self) -> None:
        pass

    def save_cpu_state(self) -> bytes:
        return b""

    def load_cpu_state(self, data: bytes) -> None:
        raise ValueError(f"machine '{NONE_MACHINE}' has no vCPU to load")

    def close(self) -> None:
        pass


class Machine:
    """One VM. Thread-safe: QMP and migration threads call stop/start."""

    def __init__(self, config: MachineConfig,
                 on_event: Callable[[str, dict | None], None] | None = None) -> None:
        self.config = config
        self.on_event = on_event or (lambda name, data: None)
        self.empty = config.machine_type == NONE_MACHINE
        if not self.empty:
            config.guest.validate(config.ram_size)
        self.accel_name = choose_accelerator(config.accel)
        self.is_microvm = config.machine_type == MICROVM_MACHINE
        if self.is_microvm:
            if self.accel_name != "kvm":
                raise ValueError("livemig's microvm runs on KVM only (-accel kvm): its "
                                 "LAPIC, IOAPIC and clock are KVM's in-kernel ones")
            if config.devices:
                raise ValueError(f"machine '{MICROVM_MACHINE}' takes no livemig accel devices")
        backend = config.ram_backend
        if backend is None:
            self.ram = RamBlock(MICROVM_RAM_BLOCK_NAME if self.is_microvm else RAM_BLOCK_NAME,
                                config.ram_size)
        else:   # QEMU names the block after the backend (libvirt's is "pc.ram")
            fd = backend.open_fd()
            try:
                self.ram = RamBlock(backend.id, backend.size, fd, shared=backend.share)
            finally:
                if fd is not None:
                    os.close(fd)
        if config.mem_prealloc or (backend is not None and backend.prealloc):
            self.ram.prealloc()
        if not config.dump_guest_core or (backend is not None and not backend.dump):
            self.ram.mem.madvise(mmap.MADV_DONTDUMP)
        self.dirty_log = DirtyLog(self.ram.npages)
        if self.is_microvm and not config.microvm.isa_serial:
            self.serial = Serial(None)      # isa-serial=off: no COM1, the walk writes to nothing
        else:
            self.serial = config.serial or Serial(config.serial_path)
        self.cpu: Accelerator
        # Blocks besides RAM that the ram section carries (microvm's firmware and ROMs).
        self.extra_ram: list[RamBlock] = []
        self.microvm_state: MicrovmState | None = None
        self.ram_section_id: int | None = None      # the ram section's id: QEMU's on microvm
        self._microvm_memory: MicrovmMemory | None = None
        if self.is_microvm:
            from livemig.machine.kvm import KvmAccelerator
            memory = MicrovmMemory(self.ram, firmware_image(config.bios_path, config.guest))
            self._microvm_memory = memory
            self.extra_ram = memory.extra_blocks()
            kvm = KvmAccelerator(self.ram, self.dirty_log, self.serial, config.guest,
                                 irqchip=True, slots=memory.slots(), firmware=True)
            self.cpu = kvm
            has_serial = config.serial is not None or config.serial_path is not None
            self.microvm_state = MicrovmState(kvm, config.microvm, serial=has_serial)
            self.ram_section_id = RAM_SECTION_ID
        elif self.empty:
            if config.devices:
                raise ValueError(f"machine '{NONE_MACHINE}' takes no devices")
            self.cpu = NoVcpu(self.accel_name)
        elif self.accel_name == "kvm":
            from livemig.machine.kvm import KvmAccelerator
            self.cpu = KvmAccelerator(self.ram, self.dirty_log, self.serial, config.guest)
        else:
            from livemig.machine.soft import SoftAccelerator
            self.cpu = SoftAccelerator(self.ram, self.dirty_log, self.serial, config.guest)
        self.devices: dict[str, AccelDevice] = {}
        for dev in config.devices:
            if dev.id in self.devices:
                raise ValueError(f"Duplicate device ID '{dev.id}'")
            self.devices[dev.id] = AccelDevice(dev, incoming=config.incoming)
        self.uuid_bytes = uuidlib.UUID(config.uuid).bytes if config.uuid else None
        self._lock = threading.RLock()
        # auto-converge's throttle: never resumes a guest that is not meant to run.
        self.throttle = CpuThrottle(self.cpu, self._lock, self.is_running)
        if config.incoming:
            self.runstate = RunState.INMIGRATE
        else:
            self.cpu.reset()
            self.runstate = RunState.PRELAUNCH
        # Whether the guest starts once an incoming migration completes (-S clears it).
        self.autostart = not config.start_paused

    @property
    def machine_type(self) -> str:
        return self.config.machine_type

    # -- run state -------------------------------------------------------------
    def vmstate_handlers(self) -> list[SaveVMHandlers]:
        """The machine's own sections, fresh for one migration (QEMU's
        register_savevm_live / vmstate_register by each device): the devices
        in creation order, then the vCPU state. The engine adds ``ram`` before
        them and ``globalstate`` after."""
        if self.microvm_state is not None:     # QEMU's sections, in QEMU's order
            return self.microvm_state.handlers()
        cpu: list[SaveVMHandlers] = [] if self.empty else [CpuHandler(self)]
        return [*(AccelHandler(dev) for dev in self.devices.values()), *cpu]

    def physical_map(self) -> list[tuple[int, RamBlock, int, int]]:
        """Guest-physical memory as (address, block, offset in it, length), for
        ``pmemsave``: RAM at 0, and microvm's firmware where its vCPU sees it."""
        if self._microvm_memory is None:
            return [(0, self.ram, 0, self.ram.size)]
        return sorted((s.gpa, s.block, s.offset, s.size) for s in self._microvm_memory.slots())

    def is_running(self) -> bool:
        return self.runstate is RunState.RUNNING

    def set_runstate(self, new: RunState) -> None:
        with self._lock:
            check_transition(self.runstate, new)
            self.runstate = new

    def vm_start(self) -> None:
        """Run the guest (QEMU's vm_start): runstate running, RESUME event."""
        with self._lock:
            if self.runstate is RunState.RUNNING:
                return
            check_transition(self.runstate, RunState.RUNNING)
            self.cpu.resume()
            for dev in self.devices.values():
                dev.vm_state_change(True)
            self.runstate = RunState.RUNNING
        self.on_event("RESUME", None)

    def vm_stop(self, state: RunState = RunState.PAUSED) -> bool:
        """Stop the guest and enter ``state``; STOP event if it was running.

        Returns whether it was running (so a failed migration knows whether
        to restart it)."""
        with self._lock:
            was_running = self.runstate is RunState.RUNNING
            if was_running:
                self.cpu.pause()
                for dev in self.devices.values():
                    dev.vm_state_change(False)
            if self.runstate is not state:
                check_transition(self.runstate, state)
                self.runstate = state
        if was_running:
            self.on_event("STOP", None)
        return was_running

    def system_reset(self) -> None:
        """QEMU's qemu_system_reset for ``system_reset``: the vCPU back at the guest's
        entry point (RAM is kept, as on a real reset), running on if it ran; a stopped
        VM goes to prelaunch (QEMU's main loop), an incoming one is left to its load."""
        with self._lock:
            if self.runstate in (RunState.INMIGRATE, RunState.FINISH_MIGRATE):
                return
            running = self.runstate is RunState.RUNNING
            if running:
                self.cpu.pause()
            self.cpu.reset()
            if running:
                self.cpu.resume()
            elif self.runstate is RunState.PAUSED or self.runstate is RunState.SHUTDOWN:
                self.runstate = RunState.PRELAUNCH

    def close(self) -> None:
        self.throttle.set(0)
        self.cpu.close()
        for dev in self.devices.values():
            dev.close()
        self.serial.close()
        if self._microvm_memory is not None:
            self._microvm_memory.close()
