"""The walk's ticks and pace under KVM, on livemig and on QEMU: both engines
boot the same patched image, tick on a serial socket, and pace the same."""

from __future__ import annotations

import asyncio
import time

import pytest
from kvm_harness import KVM_OK, KVM_WHY

from livemig.cli.bench import walk_image
from livemig.cli.driver import Vm, VmSpec, qemu_available

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable here: {KVM_WHY}")]
TICK = 256


async def pages_per_s(tmp_path, engine: str, pace: int) -> float:
    img = walk_image(str(tmp_path / f"w-{engine}-{pace}.img"), "32M", tick=TICK, pace=pace)
    vm = await Vm.start(VmSpec(engine=engine, name=f"{engine[0]}{pace}", ram="64M",
                               accel="kvm", walk_end="32M", boot_image=img, walk_tick=TICK,
                               walk_pace=pace, serial_socket=True), str(tmp_path))
    try:
        assert vm.serial is not None
        deadline = time.monotonic() + 30
        while vm.serial.snapshot().ticks < 200:     # the walk is past its zeroing pass
            assert time.monotonic() < deadline, "no ticks on the serial socket"
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await asyncio.sleep(0.5)                    # the window the rate is taken over
        log = vm.serial.snapshot()
        assert b"." not in bytes(log.other)         # ticks are counted, not kept
        return log.rate(t0, time.monotonic()) * TICK
    finally:
        await vm.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ["livemig", "qemu"])
def test_ticks_and_pace(tmp_path, engine):
    if engine == "qemu" and not qemu_available():
        pytest.skip("qemu-system-x86_64 not installed")

    async def body():
        fast = await pages_per_s(tmp_path, engine, 0)
        slow = await pages_per_s(tmp_path, engine, 100_000)   # ~26k pages/s at 2.6 GHz at most
        assert fast > 0 and slow > 0
        assert slow < fast * 0.5, (fast, slow)
    asyncio.run(body())
