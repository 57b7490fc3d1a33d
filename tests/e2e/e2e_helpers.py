"""Waiting, event and guest helpers shared by ``conftest.py`` (migration and QMP
tests) and ``fault_helpers.py`` (fault, hostile-input, two-host and soak tests).

Nothing here sleeps "long enough": every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np

from livemig.cli.driver import Vm
from livemig.machine.guest import MIB, parse_size
from livemig.machine.walk_check import check_walk_pattern

PAGE = 4096
WALK_START = 1 * MIB
WALK_END = "16M"


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)


def find_event(vm: Vm, name: str, status: str | None = None) -> dict | None:
    for ev in vm.events:
        if ev["event"] == name and (status is None or ev.get("data", {}).get("status") == status):
            return ev
    return None


async def wait_event(vm: Vm, name: str, status: str | None = None,
                     timeout: float = 20.0) -> dict:
    """Wait until ``vm`` has delivered event ``name`` (with ``data.status``)."""
    async def seen() -> bool:
        return find_event(vm, name, status) is not None
    await wait_until(seen, timeout, f"{vm.spec.name}: event {name} {status or ''}")
    return find_event(vm, name, status)  # type: ignore[return-value]


async def runstate(vm: Vm) -> str:
    return (await vm.cmd("query-status"))["status"]


async def wait_walking(vm: Vm, timeout: float = 20.0) -> None:
    """The walk guest wrote its ``A`` and finished a first pass over its range."""
    await vm.wait_serial(lambda data: data.startswith(b"A"), timeout=timeout)
    end = parse_size(vm.spec.walk_end, default_unit="") - PAGE

    async def walked() -> bool:
        return (await vm.pmem(end, 1))[0] != 0 or (await vm.pmem(WALK_START, 1))[0] > 1
    await wait_until(walked, timeout, f"{vm.spec.name}: first walk pass")


async def wait_guest_runs(vm: Vm, timeout: float = 10.0) -> None:
    """The first byte of the walk range changes: the vCPU really executes."""
    before = await vm.pmem(WALK_START, 1)

    async def moved() -> bool:
        return await vm.pmem(WALK_START, 1) != before
    await wait_until(moved, timeout, f"{vm.spec.name}: guest progress")


def walk_problems_of(mem: bytes, walk_end: str = WALK_END) -> list[str]:
    """QEMU's check_guests_ram on the first byte of every page of the walk range."""
    pages = np.frombuffer(mem, dtype=np.uint8).reshape(-1, PAGE)[:, 0]
    end = parse_size(walk_end, default_unit="")
    return check_walk_pattern(pages[WALK_START // PAGE: end // PAGE])


async def accel_digest(vm: Vm, dev: str = "acc0") -> str:
    return (await vm.cmd("x-accel-digest", id=dev))["sha256"]
