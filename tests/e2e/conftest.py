"""Fixtures and helpers for the end-to-end tests: real ``livemig run`` processes
driven over QMP by ``qemu.qmp`` (through :class:`livemig.cli.driver.Vm`).

Every test body is a coroutine run with :func:`run` (no pytest-asyncio). VMs
are started through the :func:`vms` fixture's :class:`Launcher`, which quits
them at the end of the coroutine and kills (by PID) whatever is still alive
when the test is torn down. VMs are small and use the soft accelerator, so
the whole suite runs in well under two minutes on two cores.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from e2e_helpers import (  # noqa: F401 - re-exported for the tests
    PAGE,
    WALK_END,
    WALK_START,
    accel_digest,
    events_enabled,
    find_event,
    runstate,
    wait_blocked_in_send,
    wait_event,
    wait_exited,
    wait_guest_runs,
    wait_migration_status,
    wait_runstate,
    wait_until,
    wait_walking,
)
from e2e_helpers import walk_problems_of as walk_problems
from qemu.qmp import ExecuteError

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import parse_size

RAM = "64M"
PREPARE_MS = 400
# A VFIO-like device that needs PREPARE_MS of preparation on the destination
# (ACCEL_FAST: 100 ms, for tests that do not measure the preparation).
ACCEL = f"accel,id=acc0,size=8M,init-size=1M,prepare-ms={PREPARE_MS}"
ACCEL_FAST = "accel,id=acc0,size=8M,init-size=1M,prepare-ms=100,dirty-rate=50"
# A source guest paced far below any link here: 2500 pages/s (10 MB/s) over a
# 3 MiB walk (1M..4M). A free-running walk re-dirties its whole 15 MiB every
# few ms, so a live migration of it completes only while the link moves 15 MiB
# within the downtime limit: a race the machine's load can lose. With the paced
# guest each pass leaves fewer dirty pages than the last (dirty rate << link
# rate) and the 3 MiB fit the downtime budget of any link above 10 MB/s, so
# completion is certain; the guest still runs and dirties pages throughout.
PACED_WALK = 2500
PACED_WALK_END = "4M"


def run(coro: Awaitable[Any]) -> Any:
    """Run one test body (a coroutine) to completion on a fresh event loop."""
    return asyncio.run(coro)


class Launcher:
    """Starts VMs for one test and makes sure none outlives it."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.vms: list[Vm] = []

    async def start(self, name: str, *, ram: str = RAM, walk_end: str = WALK_END,
                    incoming: str | None = None, paused: bool = False,
                    devices: list[str] | None = None, extra: list[str] | None = None,
                    walk_rate: int | None = None) -> Vm:
        spec = VmSpec(engine="livemig", name=name, ram=ram, accel="soft", walk_end=walk_end,
                      walk_rate=walk_rate, incoming=incoming, paused=paused,
                      devices=list(devices or []), extra=list(extra or []))
        vm = await Vm.start(spec, self.workdir, timeout=20)
        self.vms.append(vm)
        return vm

    async def close_all(self) -> None:
        for vm in self.vms:
            try:
                await asyncio.wait_for(vm.close(timeout=5), 10)
            except Exception:  # noqa: BLE001 - the finalizer kills it
                vm.kill()

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()


@pytest.fixture
def vms(tmp_path):
    launcher = Launcher(str(tmp_path))
    yield launcher
    launcher.kill_all()


def run_with(launcher: Launcher, body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``body()`` and quit the launcher's VMs afterwards, on the same loop."""
    async def main() -> Any:
        try:
            return await body()
        finally:
            await launcher.close_all()
    return run(main())


# -- QMP helpers -----------------------------------------------------------------------------

async def qmp_error(vm: Vm, command: str, **args: Any) -> ExecuteError:
    """Execute a command that must fail; return the error (``str(err)`` is the desc)."""
    try:
        result = await vm.cmd(command, **args)
    except ExecuteError as err:
        return err
    raise AssertionError(f"{command} {args} succeeded: {result!r}")


def event_time(event: dict) -> float:
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def event_trace(vm: Vm, with_pass: bool = False) -> list[str]:
    """The vm's events as ``MIGRATION:<status>``, ``STOP``, ``RESUME``... (in order)."""
    out = []
    for ev in vm.events:
        if ev["event"] == "MIGRATION":
            out.append(f"MIGRATION:{ev['data']['status']}")
        elif ev["event"] != "MIGRATION_PASS" or with_pass:
            out.append(ev["event"])
    return out


# -- migration helpers -----------------------------------------------------------------------

async def start_incoming(dst: Vm, uri: str = "tcp:127.0.0.1:0", **args: Any) -> str:
    """``migrate-incoming`` (exit-on-error off) and return the URI the source must use
    (for ``tcp:...:0`` the real port, from ``query-migrate``'s ``socket-address``)."""
    await dst.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False, **args})
    if not uri.startswith("tcp:"):
        return uri
    info = await dst.cmd("query-migrate")
    addr = info["socket-address"][0]
    return f"tcp:{addr['host']}:{addr['port']}"


async def set_caps_both(src: Vm, dst: Vm, caps: dict[str, bool]) -> None:
    if caps:
        for vm in (src, dst):
            await vm.set_caps(**caps)


async def wait_booted(vm: Vm, timeout: float = 20.0) -> None:
    """The walk guest wrote its ``A``: it zeroed nothing yet but runs."""
    await vm.wait_serial(lambda data: data.startswith(b"A"), timeout=timeout)


async def wait_completed(vm: Vm, timeout: float = 30.0) -> dict:
    """``query-migrate`` once its status is terminal (woken by ``MIGRATION`` events
    when ``events`` is on, polled otherwise: see ``wait_migration_status``)."""
    return await wait_migration_status(vm, timeout=timeout, poll=0.005)


def ram_size(vm: Vm) -> int:
    return parse_size(vm.spec.ram, default_unit="m")


async def whole_ram(vm: Vm) -> bytes:
    return await vm.pmem(0, ram_size(vm))


async def vm_walk_problems(vm: Vm) -> list[str]:
    end = parse_size(vm.spec.walk_end, default_unit="")
    return walk_problems(await vm.pmem(0, end), vm.spec.walk_end)


async def start_pair(vms: Launcher, *, src_caps: dict[str, bool] | None = None,
                     dst_caps: dict[str, bool] | None = None,
                     devices: tuple[str, ...] = (ACCEL_FAST,), dst_paused: bool = True,
                     dst_ram: str = RAM, dst_name: str = "dst",
                     paced: bool = True) -> tuple[Vm, Vm]:
    """A running source and a ``-incoming defer`` destination (``-S`` unless told),
    capabilities set on each (``dst_caps`` defaults to ``src_caps``), bandwidth
    unlimited, and the source guest walking: paced (``PACED_WALK``, so a live
    migration surely converges) unless ``paced=False`` (the free-running 15 MiB
    walk, for tests that need the data, not the completion)."""
    walk = {"walk_rate": PACED_WALK, "walk_end": PACED_WALK_END} if paced else {}
    src = await vms.start("src", devices=list(devices), **walk)
    dst = await vms.start(dst_name, devices=list(devices), incoming="defer",
                          paused=dst_paused, ram=dst_ram, **walk)   # the same guest program
    if src_caps:
        await src.set_caps(**src_caps)
    dst_caps = src_caps if dst_caps is None else dst_caps
    if dst_caps:
        await dst.set_caps(**dst_caps)
    await src.set_params(max_bandwidth=0)
    await wait_walking(src)
    return src, dst


async def assert_same_guest(src: Vm, dst: Vm, devices: bool = True) -> None:
    """Destination (never run, ``-S``) RAM is the stopped source's, byte for byte;
    device state too; and the walk pattern holds on the destination."""
    # The source enters postmigrate just after its completed status (as QEMU:
    # migration_iteration_finish), with no event of its own: wait for the state.
    await wait_runstate(src, "postmigrate")
    assert await runstate(src) == "postmigrate"
    src_mem, dst_mem = await whole_ram(src), await whole_ram(dst)
    assert len(src_mem) == len(dst_mem) == ram_size(src)
    if src_mem != dst_mem:
        a = np.frombuffer(src_mem, np.uint8).reshape(-1, PAGE)
        b = np.frombuffer(dst_mem, np.uint8).reshape(-1, PAGE)
        pages = np.flatnonzero((a != b).any(axis=1))
        raise AssertionError(f"{pages.size} pages differ, first {pages[:8].tolist()}")
    if devices:
        assert await accel_digest(src) == await accel_digest(dst)
    assert walk_problems(dst_mem, src.spec.walk_end) == []   # the walk that ran: the source's


def pass_numbers(vm: Vm) -> list[int]:
    return [ev["data"]["pass"] for ev in vm.events if ev["event"] == "MIGRATION_PASS"]


def socket_fds(vm: Vm) -> int:
    """How many socket descriptors the VM process holds (Linux /proc)."""
    count = 0
    fd_dir = f"/proc/{vm.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{fd}").startswith("socket:")
        except OSError:
            pass            # closed while we looked
    return count
