"""The guest-visible downtime method checked against a pause of known length:
``stop`` / ``cont`` on one VM; the gap in the guest's serial ticks, read from
outside, must match the gap between the VM's own STOP and RESUME events."""

from __future__ import annotations

import asyncio
import time

import pytest
from e2e_helpers import wait_event

from livemig.cli.driver import Vm, VmSpec

TICK = 16          # pages per tick: ~0.06 ms at the soft walk's 280,000 pages/s


def event_s(ev: dict) -> float:
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


@pytest.mark.timeout(60)
def test_the_tick_gap_of_a_stop_cont_equals_the_pause(tmp_path):
    async def body():
        vm = await Vm.start(VmSpec(name="clock", ram="64M", accel="soft", walk_end="16M",
                                   walk_tick=TICK, serial_socket=True), str(tmp_path))
        try:
            assert vm.serial is not None
            await vm.cmd("migrate-set-capabilities", capabilities=[])   # a round trip
            deadline = time.monotonic() + 20
            while vm.serial.snapshot().ticks < 2000:
                assert time.monotonic() < deadline, "the walk does not tick"
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await vm.cmd("stop")
            await wait_event(vm, "STOP")
            await asyncio.sleep(0.3)               # the pause being measured
            with vm.qmp.listener("RESUME") as listener:
                await vm.cmd("cont")
                await asyncio.wait_for(listener.get(), 10)   # this cont's RESUME
            # The last of each: the VM started with -S and one RESUME already.
            stop = [e for e in vm.qmp.events.history if e["event"] == "STOP"][-1]
            resume = [e for e in vm.qmp.events.history if e["event"] == "RESUME"][-1]
            ticks_then = vm.serial.snapshot().ticks
            while vm.serial.snapshot().ticks < ticks_then + 2000:
                assert time.monotonic() < deadline + 20, "no ticks after cont"
                await asyncio.sleep(0.01)
            log = vm.serial.snapshot()
            gap = log.longest_gap(t0 - 1.0, time.monotonic())
            assert gap is not None
            seen = gap[1] - gap[0]
            paused = event_s(resume) - event_s(stop)
            period = 1 / (log.rate(t0 - 1.0, t0) or 1)
            # Both ends within a tick period, plus the observer's scheduling.
            assert abs(seen - paused) <= 2 * period + 0.02, (seen, paused, period)
        finally:
            await vm.close()
    asyncio.run(body())
