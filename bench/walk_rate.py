"""How fast the walk guest dirties memory, idle and while migrating, on QEMU or
livemig: convergence depends on send rate versus this rate, so it must be
the same on both engines for the comparison to mean anything.

    python bench/walk_rate.py --engine qemu
    python bench/walk_rate.py --engine livemig

The walk increments the first byte of each page of its range, in order, pass
after pass. Its position is found by bisection over single-byte ``pmemsave``
reads (the page where the new value meets the old one), twice, a second
apart. The migration runs with downtime-limit 1 ms so it stays live.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import parse_size
from livemig.machine.kvm import bootsector_image

START = 1 << 20
PAGE = 4096


async def position(vm: Vm, end: int) -> tuple[int, float]:
    """Pages walked since the walk began (mod 256 passes), and when."""
    first, last = START // PAGE, end // PAGE
    value = (await vm.pmem(START, 1))[0]
    lo, hi = first, last
    if (await vm.pmem((last - 1) * PAGE, 1))[0] != value:
        while hi - lo > 1:          # pages [first, lo] hold `value`, page hi does not
            mid = (lo + hi) // 2
            if (await vm.pmem(mid * PAGE, 1))[0] == value:
                lo = mid
            else:
                hi = mid
    return value * (last - first) + (hi - first), time.monotonic()


async def rate(vm: Vm, end: int, seconds: float) -> float:
    p0, t0 = await position(vm, end)
    await asyncio.sleep(seconds)
    p1, t1 = await position(vm, end)
    ring = 256 * (end // PAGE - START // PAGE)
    return ((p1 - p0) % ring) / (t1 - t0)


async def main(a: argparse.Namespace) -> None:
    end = parse_size(a.walk_end)
    with tempfile.TemporaryDirectory() as wd:
        image = os.path.join(wd, "walk.img")
        with open(image, "wb") as f:
            f.write(bootsector_image(START, end).ljust(1 << 20, b"\0"))
        spec = dict(engine=a.engine, ram=a.ram, accel="kvm", walk_end=a.walk_end,
                    boot_image=image)
        src = await Vm.start(VmSpec(name="src", **spec), wd)
        dst = await Vm.start(VmSpec(name="dst", incoming="defer", **spec), wd)
        try:
            await src.set_params(max_bandwidth=0, downtime_limit=1)
            await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await src.wait_serial(lambda d: d.startswith(b"A"))
            while (await src.pmem(end - PAGE, 1)) == b"\0":
                await asyncio.sleep(0.05)
            print(f"{a.engine}: idle walk {await rate(src, end, 1.0):,.0f} pages/s")
            await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            for _ in range(a.samples):
                r = await rate(src, end, 0.5)
                info = await src.cmd("query-migrate")
                if info.get("status") != "active":
                    break
                print(f"{a.engine}: migrating walk {r:,.0f} pages/s "
                      f"(dirty syncs so far: {info['ram']['dirty-sync-count']})")
            await src.cmd("migrate_cancel")
        finally:
            await src.close()
            await dst.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="livemig", choices=("livemig", "qemu"))
    p.add_argument("--ram", default="2G")
    p.add_argument("--walk-end", default="1G")
    p.add_argument("--samples", type=int, default=4)
    asyncio.run(main(p.parse_args()))
