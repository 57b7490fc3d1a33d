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
import time

from common import START, add_pair_args, pair

from livemig.cli.driver import Vm
from livemig.machine.guest import parse_size

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
    async with pair(a, downtime_limit=1) as (src, _dst, uri):
        print(f"{a.engine}: idle walk {await rate(src, end, 1.0):,.0f} pages/s")
        await src.cmd("migrate", uri=uri)
        for _ in range(a.samples):
            r = await rate(src, end, 0.5)
            info = await src.cmd("query-migrate")
            if info.get("status") != "active":
                break
            print(f"{a.engine}: migrating walk {r:,.0f} pages/s "
                  f"(dirty syncs so far: {info['ram']['dirty-sync-count']})")
        await src.cmd("migrate_cancel")

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_pair_args(p)
    p.add_argument("--samples", type=int, default=4)
    asyncio.run(main(p.parse_args()))
