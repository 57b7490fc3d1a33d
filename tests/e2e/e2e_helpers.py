"""Waiting, event and guest helpers shared by ``conftest.py`` (migration and QMP
tests) and ``fault_helpers.py`` (fault, hostile-input, two-host and soak tests).

Nothing here sleeps "long enough". A wait for an event (``wait_event``) or for
a state an event announces (``wait_migration_status``: ``MIGRATION`` with
``events`` on; ``wait_runstate``: ``STOP``/``RESUME``) blocks on a ``qemu.qmp``
``EventListener`` registered *before* the state is first read, so no change
can slip between the read and the wait. Only where no event exists (guest
memory, the serial file, ``query-migrate`` with ``events`` off) does a wait
poll, always with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from qemu.qmp import EventListener

from livemig.cli.driver import QEMU_BINARY, TERMINAL, Vm, qemu_available
from livemig.machine.guest import MIB, parse_size
from livemig.machine.walk_check import check_walk_pattern

PAGE = 4096
WALK_START = 1 * MIB
WALK_END = "16M"


def needs_qemu_and_kvm() -> list[pytest.MarkDecorator]:
    """Marks for a test that runs QEMU under KVM: skipped, with the reason,
    without either."""
    from livemig.machine.kvm import kvm_usable
    ok, why = kvm_usable()
    return [pytest.mark.skipif(qemu_available() is None, reason=f"{QEMU_BINARY} is not installed"),
            pytest.mark.skipif(not ok, reason=f"KVM not usable here: {why}")]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)


def _matches(ev, name: str, status: str | None) -> bool:
    return ev["event"] == name and (status is None
                                    or ev.get("data", {}).get("status") == status)


def find_event(vm: Vm, name: str, status: str | None = None) -> dict | None:
    for ev in vm.events:
        if _matches(ev, name, status):
            return ev
    return None


async def events_caught_up(vm: Vm, timeout: float = 5.0) -> None:
    """``vm.events`` (filled by the driver's collector task from the default
    listener) holds every event the client has received so far. The collector
    only needs its turn on the loop; this yields (``sleep(0)``, no time) until
    it had it."""
    deadline = time.monotonic() + timeout
    while len(vm.events) < len(vm.qmp.events.history):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.spec.name}: event collector stalled")
        await asyncio.sleep(0)


async def _next_event(listener: EventListener, deadline: float) -> dict | None:
    """The listener's next event, or None once ``deadline`` (monotonic) passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(listener.get(), remaining)
    except TimeoutError:
        return None


async def wait_event(vm: Vm, name: str, status: str | None = None,
                     timeout: float = 20.0) -> dict:
    """Wait until ``vm`` has delivered event ``name`` (with ``data.status``); return
    the first such event (an element of ``vm.events``).

    The listener is registered before the history (``vm.qmp.events.history``:
    every event received, in order) is searched, with no await in between, so
    an event arriving at any moment is either in the history or in the listener.
    """
    with vm.qmp.listener(name, lambda ev: _matches(ev, name, status)) as listener:
        if not any(_matches(ev, name, status) for ev in vm.qmp.events.history):
            if await _next_event(listener, time.monotonic() + timeout) is None:
                raise TimeoutError(f"timed out after {timeout} s waiting for "
                                   f"{vm.spec.name}: event {name} {status or ''}")
    await events_caught_up(vm)
    return find_event(vm, name, status)  # type: ignore[return-value]


async def events_enabled(vm: Vm) -> bool:
    """Whether the ``events`` capability is on (then every status change is a
    ``MIGRATION`` event)."""
    caps = await vm.cmd("query-migrate-capabilities")
    return any(c["capability"] == "events" and c["state"] for c in caps)


async def wait_migration_status(vm: Vm, goals=TERMINAL, timeout: float = 30.0, *,
                                stop_at=(), poll: float = 0.01) -> dict:
    """``query-migrate`` once its status is in ``goals``; return it.

    With the ``events`` capability on, this re-reads ``query-migrate`` only when
    a ``MIGRATION`` event arrives (the listener is registered before the first
    read, so no change is missed). With it off no event announces a status
    change, so it polls every ``poll`` s, until the deadline.
    A status in ``stop_at`` (not in ``goals``) raises AssertionError at once.
    """
    goals = (goals,) if isinstance(goals, str) else tuple(goals)
    deadline = time.monotonic() + timeout
    with vm.qmp.listener("MIGRATION") as listener:
        announced = await events_enabled(vm)
        while True:
            info = await vm.cmd("query-migrate")
            status = info.get("status")
            if status in goals:
                if announced:
                    # The status can be read before its event reaches this client (the
                    # engine sets it, then the event crosses threads): wait for it too,
                    # so a trace read after this wait has it.
                    await _event_seen(vm, status, deadline)
                await events_caught_up(vm)
                return info
            if status in stop_at:
                raise AssertionError(f"{vm.spec.name}: migration ended {status} while "
                                     f"waiting for {'/'.join(goals)}: {info}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm.spec.name}: migration still {status}, "
                                   f"not {'/'.join(goals)}")
            if announced:
                await _next_event(listener, deadline)
            else:
                await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))


async def _event_seen(vm: Vm, status: str, deadline: float) -> None:
    """Until the ``MIGRATION`` event of ``status`` is in the client's history
    (or ``deadline``: a caller that enabled events mid-migration may miss it)."""
    with vm.qmp.listener("MIGRATION", lambda ev: _matches(ev, "MIGRATION", status)) as lst:
        if not any(_matches(ev, "MIGRATION", status) for ev in vm.qmp.events.history):
            await _next_event(lst, min(deadline, time.monotonic() + 5.0))


async def wait_runstate(vm: Vm, goal: str, timeout: float = 10.0,
                        poll: float = 0.01) -> None:
    """``query-status`` shows ``goal``.

    Entering ``running`` is always announced (``RESUME``): the wait re-reads the
    state on each ``STOP``/``RESUME``/``MIGRATION`` event and nothing else. The
    other run states (``postmigrate``, ``paused`` after an incoming load, ...)
    may be entered without an event of their own, so for them the wait also
    re-reads every ``poll`` s, until the deadline.
    """
    deadline = time.monotonic() + timeout
    with vm.qmp.listener(("STOP", "RESUME", "MIGRATION")) as listener:
        while (status := (await vm.cmd("query-status"))["status"]) != goal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm.spec.name}: run state still {status}, never "
                                   f"became {goal}")
            await _next_event(listener, deadline if goal == "running"
                              else min(deadline, time.monotonic() + poll))
    await events_caught_up(vm)


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


# -- process and thread states (no event exists: read from /proc, with a deadline) ----------

# x86_64 system calls that write to a socket: write, writev, sendto, sendmsg.
SEND_SYSCALLS = {1, 20, 44, 46}


def threads_sleeping_in_send(pid: int, comm: str) -> list[bool]:
    """For each thread of ``pid`` named ``comm`` (livemig's threads carry their
    names into the kernel: ``live_migration``, ``vcpu0``...): whether it sleeps
    (state S) inside a socket write (``/proc/PID/task/TID/syscall``). A blocking
    socket write sleeps only while the socket buffer is full."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"{base}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"{base}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            continue            # the thread ended while we looked
        out.append(state == "S" and nr.isdigit() and int(nr) in SEND_SYSCALLS)
    return out


async def wait_blocked_in_send(vm: Vm, timeout: float = 15.0,
                               thread: str = "live_migration") -> None:
    """The source's migration thread sleeps in a socket write, waiting for room
    the peer (stopped, or behind a dead link) does not make: from then on nothing
    more goes out until the peer reads again or the connection ends."""
    async def blocked() -> bool:
        return any(threads_sleeping_in_send(vm.proc.pid, thread))
    await wait_until(blocked, timeout, f"{vm.spec.name}: {thread} blocked in send")


async def wait_exited(vm: Vm, timeout: float = 15.0) -> int:
    """Block (in a thread: ``Popen.wait``) until the VM process exited; its status."""
    try:
        return await asyncio.to_thread(vm.proc.wait, timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{vm.spec.name}: still running after {timeout} s") from None


def uffd_count(pid: int) -> int:
    """userfaultfd descriptors the process holds (Linux /proc)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
        except OSError:
            pass
    return n
