"""Drive VM processes, livemig's or QEMU's, over QMP with ``qemu.qmp``.

The management side of livemig (``migrate``, ``demo``, ``bench``, and the
end-to-end tests) speaks only QMP, so the same code drives both engines.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import QMPClient

from livemig.cli.guest_clock import SerialObserver, serial_socket_path

QEMU_BINARY = "qemu-system-x86_64"
# QEMU's microvm as issue 16 measures it: no option ROMs, PIT, PIC or RTC; the
# ISA serial stays on (QEMU's default), so -serial is the guest's COM1.
MICROVM_MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off"
TERMINAL = ("completed", "failed", "cancelled")


def qemu_available() -> str | None:
    return shutil.which(QEMU_BINARY)


@dataclass
class VmSpec:
    """What to start. ``engine`` is ``livemig`` or ``qemu``."""

    engine: str = "livemig"
    name: str = "vm"
    ram: str = "256M"
    accel: str = "auto"
    walk_end: str = "100M"
    walk_rate: int | None = None
    incoming: str | None = None
    paused: bool = False
    devices: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    boot_image: str | None = None     # QEMU needs the boot sector image (microvm: -bios)
    machine: str = "q35"              # QEMU: q35 boots boot_image as a disk, microvm as -bios
    walk_tick: int = 0                # a '.' on COM1 every N pages (livemig; QEMU: the image)
    walk_pace: int = 0                # TSC cycles after each page (livemig; QEMU: the image)
    serial_socket: bool = False       # -serial unix:...,server=on,wait=off, read by an observer


class Vm:
    """One VM process and its QMP client. Use ``await Vm.start(spec, workdir)``."""

    def __init__(self, spec: VmSpec, workdir: str) -> None:
        self.spec = spec
        self.workdir = workdir
        self.qmp_path = os.path.join(workdir, f"{spec.name}.qmp")
        self.serial_path = os.path.join(workdir, f"{spec.name}.serial")
        self.serial_sock_path = serial_socket_path(workdir, spec.name)
        self.serial: SerialObserver | None = None
        self.stderr_path = os.path.join(workdir, f"{spec.name}.stderr")
        self.proc: subprocess.Popen | None = None
        self.qmp = QMPClient(spec.name)
        self.events: list[dict[str, Any]] = []
        self._event_task: asyncio.Task | None = None

    def argv(self) -> list[str]:
        s = self.spec
        serial = (f"unix:{self.serial_sock_path},server=on,wait=off" if s.serial_socket
                  else f"file:{self.serial_path}")
        common = ["-m", s.ram, "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                  "-serial", serial, "-name", s.name]
        if s.incoming:
            common += ["-incoming", s.incoming]
        # A serial socket drops what the guest writes before the observer is
        # connected: such a VM starts paused and runs once it is (Vm.start).
        if s.paused or (s.serial_socket and not s.incoming):
            common += ["-S"]
        if s.engine == "qemu":
            accel = "kvm" if s.accel in ("kvm", "auto") else "tcg"
            if not s.boot_image:
                raise ValueError("QEMU needs a boot image (spec.boot_image)")
            if s.machine == "microvm":
                return [QEMU_BINARY, "-M", MICROVM_MACHINE, "-accel", accel, "-nodefaults",
                        "-display", "none", "-bios", s.boot_image, *common, *s.extra]
            return [QEMU_BINARY, "-M", f"q35,accel={accel}", "-nodefaults", "-display", "none",
                    "-drive", f"file={s.boot_image},format=raw", *common, *s.extra]
        if s.machine not in ("q35", "microvm"):
            raise ValueError(f"livemig has no machine '{s.machine}' yet")
        machine = []
        if s.machine == "microvm":      # QEMU's options; -bios: the same firmware as QEMU's
            machine = ["-M", MICROVM_MACHINE, "-nodefaults"]
            if s.boot_image:
                machine += ["-bios", s.boot_image]
        walk = f"walk,start=1M,end={s.walk_end}"
        if s.walk_rate is not None:
            walk += f",rate={s.walk_rate}"
        if s.walk_tick:
            walk += f",tick={s.walk_tick}"
        if s.walk_pace:
            walk += f",pace={s.walk_pace}"
        argv = [sys.executable, "-m", "livemig", "run", *machine, "-accel", s.accel,
                "-guest", walk, *common]
        for dev in s.devices:
            argv += ["-device", dev]
        return argv + s.extra

    @classmethod
    async def start(cls, spec: VmSpec, workdir: str, timeout: float = 30.0) -> Vm:
        vm = cls(spec, workdir)
        with open(vm.stderr_path, "wb") as err:
            vm.proc = subprocess.Popen(vm.argv(), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            if vm.proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {vm.proc.returncode}: "
                                   f"{vm.stderr_text().strip()}")
            if os.path.exists(vm.qmp_path):
                try:
                    await vm.qmp.connect(vm.qmp_path)
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
            if time.monotonic() > deadline:
                vm.kill()
                raise TimeoutError(f"{spec.name}: QMP socket did not come up")
            await asyncio.sleep(0.02)
        vm._event_task = asyncio.create_task(vm._collect_events())
        if spec.serial_socket:
            try:
                vm.serial = await asyncio.to_thread(SerialObserver, vm.serial_sock_path,
                                                    timeout=timeout)
            except BaseException:
                vm.kill()
                raise
            if not spec.paused and not spec.incoming:
                await vm.cmd("cont")
        return vm

    async def _collect_events(self) -> None:
        async for event in self.qmp.events:
            self.events.append(dict(event))

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def serial_bytes(self) -> bytes:
        """What the guest wrote to COM1 (without ticks when a socket observer reads it)."""
        if self.serial is not None:
            return self.serial.data()
        try:
            with open(self.serial_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    async def cmd(self, name: str, **args: Any) -> Any:
        return await self.qmp.execute(name, args or None)

    async def set_caps(self, **caps: bool) -> None:
        await self.cmd("migrate-set-capabilities", capabilities=[
            {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])

    async def set_params(self, **params: Any) -> None:
        await self.cmd("migrate-set-parameters", **{k.replace("_", "-"): v
                                                    for k, v in params.items()})

    async def wait_status(self, goals: Container[str] = TERMINAL, timeout: float = 120.0,
                          poll: float = 0.005) -> dict[str, Any]:
        """Poll query-migrate (as QEMU's qtests do) until the status is in ``goals``."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.cmd("query-migrate")
            if info.get("status") in goals:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: migration still {info.get('status')}")
            await asyncio.sleep(poll)

    async def wait_runstate(self, goal: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (await self.cmd("query-status"))["status"] != goal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: run state never became {goal}")
            await asyncio.sleep(0.005)

    async def wait_serial(self, predicate: Callable[[bytes], bool],
                          timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not predicate(data := self.serial_bytes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: serial output {data[-20:]!r}")
            await asyncio.sleep(0.01)
        return data

    async def wait_booted(self, timeout: float = 30.0) -> None:
        """The guest runs: it wrote to COM1. A serial socket may have dropped the
        'A' (the VM accepts its observer on its own thread, so the first bytes
        can come before): then a tick or a 'B' says it as well."""
        if self.serial is None:
            await self.wait_serial(lambda d: d.startswith(b"A"), timeout)
            return
        deadline = time.monotonic() + timeout
        while not self.serial.log.bytes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: no serial output")
            await asyncio.sleep(0.01)

    async def pmem(self, addr: int, size: int) -> bytes:
        fd, path = tempfile.mkstemp(dir=self.workdir, suffix=".mem")
        os.close(fd)
        try:
            await self.cmd("pmemsave", val=addr, size=size, filename=path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the process (peak resident set), while it lives."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    async def close(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                await asyncio.wait_for(self.cmd("quit"), 5)
            except Exception:  # noqa: BLE001 - it may already be gone
                pass
        try:
            await self.qmp.disconnect()
        except Exception:  # noqa: BLE001
            pass
        if self._event_task is not None:
            self._event_task.cancel()
        if self.serial is not None:
            self.serial.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
