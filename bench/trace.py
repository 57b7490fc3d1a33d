"""One migration on QEMU or livemig with ``query-migrate`` polled every 50 ms:
how remaining, syncs and the dirty rate evolve (the convergence picture).

    python bench/trace.py --engine qemu --ram 2G --walk-end 1G
"""

import argparse
import asyncio
import os
import tempfile
import time

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import parse_size
from livemig.machine.kvm import bootsector_image


async def main(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as wd:
        image = os.path.join(wd, "walk.img")
        with open(image, "wb") as f:
            f.write(bootsector_image(1 << 20, parse_size(a.walk_end)).ljust(1 << 20, b"\0"))
        spec = dict(engine=a.engine, ram=a.ram, accel="kvm", walk_end=a.walk_end,
                    boot_image=image, extra=["-mem-prealloc"] if a.mem_prealloc else [])
        src = await Vm.start(VmSpec(name="src", **spec), wd)
        dst = await Vm.start(VmSpec(name="dst", incoming="defer", **spec), wd)
        try:
            caps = [{"capability": c, "state": True} for c in ("events", *a.cap)]
            for vm in (src, dst):
                await vm.cmd("migrate-set-capabilities", capabilities=caps)
                if a.channels:
                    await vm.set_params(multifd_channels=a.channels)
            await src.set_params(max_bandwidth=0, downtime_limit=a.downtime_limit)
            await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await src.wait_serial(lambda d: d.startswith(b"A"))
            last = parse_size(a.walk_end) - 4096
            while (await src.pmem(last, 1)) == b"\0":
                await asyncio.sleep(0.05)
            if a.stopped:
                await src.cmd("stop")
            t0 = time.monotonic()
            await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            print("   t-ms  transferred-MB  remaining-MB  syncs  dirty-pages/s   mbps")
            while True:
                info = await src.cmd("query-migrate")
                ram = info.get("ram", {})
                t = (time.monotonic() - t0) * 1000
                print(f"{t:7.0f} {ram.get('transferred', 0) / 1e6:15.0f} "
                      f"{ram.get('remaining', 0) / 1e6:13.0f} {ram.get('dirty-sync-count', 0):6} "
                      f"{ram.get('dirty-pages-rate', 0):14} {ram.get('mbps', 0):6.0f}")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    print({k: info.get(k) for k in ("status", "total-time", "downtime",
                                                    "setup-time")},
                          "downtime-bytes", ram.get("downtime-bytes"))
                    if "x-downtime-checkpoints" in info:
                        print("downtime checkpoints (ms):", info["x-downtime-checkpoints"])
                    break
                await asyncio.sleep(a.interval)
        finally:
            await src.close()
            await dst.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="livemig", choices=("livemig", "qemu"))
    p.add_argument("--ram", default="2G")
    p.add_argument("--walk-end", default="1G")
    p.add_argument("--cap", action="append", default=[])
    p.add_argument("--channels", type=int, default=0)
    p.add_argument("--downtime-limit", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--mem-prealloc", action="store_true", help="start both VMs with it")
    p.add_argument("--stopped", action="store_true",
                   help="stop the guest first: the data path alone, no dirtying")
    asyncio.run(main(p.parse_args()))
