"""The contract every accelerator (``soft``, ``kvm``) fulfils.

An accelerator runs the guest's vCPU on the machine's RAM block, reports the
pages the guest dirtied into the machine's :class:`DirtyLog`, sends port
output to the serial port, and saves/loads the vCPU state as bytes (the
``cpu`` device in the migration stream). The machine and the migration
engine use only this interface.
"""

from __future__ import annotations

from typing import Protocol

from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import GuestConfig
from livemig.machine.ram import RamBlock
from livemig.machine.serial import Serial


class Accelerator(Protocol):
    name: str  # "soft" or "kvm", as query-kvm / -accel name them

    def __init__(self, ram: RamBlock, dirty_log: DirtyLog, serial: Serial,
                 guest: GuestConfig) -> None: ...

    def reset(self) -> None:
        """Put the vCPU at the guest's entry point (a fresh boot). Not used on
        an incoming VM, whose vCPU state comes from the stream."""

    def resume(self) -> None:
        """Start or continue running the guest (spawns the vCPU thread once)."""

    def pause(self) -> None:
        """Stop the vCPU promptly (well under 10 ms); return once no guest code
        runs. Idempotent. Guest RAM is quiescent afterwards."""

    @property
    def running(self) -> bool: ...

    def log_dirty_start(self) -> None:
        """Start tracking guest writes (migration setup). All later writes are
        reported by :meth:`log_dirty_sync`."""

    def log_dirty_stop(self) -> None: ...

    def log_dirty_sync(self) -> None:
        """Move what the accelerator tracked into the DirtyLog (KVM: GET_DIRTY_LOG)."""

    def save_cpu_state(self) -> bytes:
        """vCPU state, only while paused."""

    def load_cpu_state(self, data: bytes) -> None:
        """Restore state from :meth:`save_cpu_state` of the same accelerator kind;
        raise ValueError with a clear reason on a malformed or foreign blob."""

    def close(self) -> None: ...
