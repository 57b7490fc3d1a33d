"""A KVM VM for tests (RAM, dirty log, serial file, accelerator) and the checks
the tests make on it: waiting with a deadline, QEMU's walk pattern check."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.kvm import KvmAccelerator, kvm_usable
from livemig.machine.ram import TARGET_PAGE_SIZE, RamBlock
from livemig.machine.serial import Serial

KVM_OK, KVM_WHY = kvm_usable()

# A small walk: 1024 pages, 64 passes (one 'B') in a fraction of a second.
WALK_START, WALK_END, RAM_SIZE = 1 * MIB, 5 * MIB, 16 * MIB


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.002) -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def walk_pattern_errors(ram: RamBlock, start: int, end: int) -> list[str]:
    """QEMU's check_guests_ram: every page's first byte equals the previous one's,
    except at most one step down by exactly 1 (mod 256), where the pass was cut."""
    first = ram.pages[start // TARGET_PAGE_SIZE:end // TARGET_PAGE_SIZE, 0].astype(np.int16)
    diff = (first[1:] - first[:-1]) % 256
    steps = np.flatnonzero(diff)
    errors = [f"page 0x{start + (i + 1) * TARGET_PAGE_SIZE:x}: {first[i]} -> {first[i + 1]}"
              for i in steps if diff[i] != 255]
    if len(steps) > 1 and not errors:
        errors.append(f"{len(steps)} edges, at most one expected")
    return errors


class Vm:
    """An accelerator with its RAM, dirty log and serial file, closed at teardown."""

    def __init__(self, tmp_path, name: str, guest: GuestConfig, ram_size: int,
                 irqchip: bool = False) -> None:
        self.serial_path = tmp_path / f"{name}.serial"
        self.ram = RamBlock("pc.ram", ram_size)
        self.dirty_log = DirtyLog(self.ram.npages)
        self.serial = Serial(str(self.serial_path))
        self.guest = guest
        self.accel = KvmAccelerator(self.ram, self.dirty_log, self.serial, guest,
                                    irqchip=irqchip)

    def output(self) -> bytes:
        return self.serial_path.read_bytes()

    def close(self) -> None:
        self.accel.close()
        self.serial.close()
        self.ram.close()
