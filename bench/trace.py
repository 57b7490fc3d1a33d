"""One migration on QEMU or livemig with ``query-migrate`` polled every 50 ms:
how remaining, syncs and the dirty rate evolve (the convergence picture).

    python bench/trace.py --engine qemu --ram 2G --walk-end 1G
    python bench/trace.py --engine livemig --cap multifd --channels 4 --mem-prealloc
"""

import argparse
import asyncio
import time

from common import add_pair_args, pair

TERMINAL = ("completed", "failed", "cancelled")


async def main(a: argparse.Namespace) -> None:
    async with pair(a, caps=tuple(a.cap), channels=a.channels,
                         downtime_limit=a.downtime_limit) as (src, _dst, uri):
        if a.stopped:
            await src.cmd("stop")
        t0 = time.monotonic()
        await src.cmd("migrate", uri=uri)
        print("   t-ms  transferred-MB  remaining-MB  syncs  dirty-pages/s   mbps")
        while True:
            info = await src.cmd("query-migrate")
            ram = info.get("ram", {})
            t = (time.monotonic() - t0) * 1000
            print(f"{t:7.0f} {ram.get('transferred', 0) / 1e6:15.0f} "
                  f"{ram.get('remaining', 0) / 1e6:13.0f} {ram.get('dirty-sync-count', 0):6} "
                  f"{ram.get('dirty-pages-rate', 0):14} {ram.get('mbps', 0):6.0f}")
            if info.get("status") in TERMINAL:
                print({k: info.get(k) for k in ("status", "total-time", "downtime",
                                                "setup-time")},
                      "downtime-bytes", ram.get("downtime-bytes"))
                if "x-downtime-checkpoints" in info:
                    print("downtime checkpoints (ms):", info["x-downtime-checkpoints"])
                return
            await asyncio.sleep(a.interval)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_pair_args(p)
    p.add_argument("--cap", action="append", default=[])
    p.add_argument("--channels", type=int, default=0)
    p.add_argument("--downtime-limit", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--stopped", action="store_true",
                   help="stop the guest first: the data path alone, no dirtying")
    asyncio.run(main(p.parse_args()))
