"""Migrate one livemig VM over loopback TCP and print the figures.

    python bench/migrate_once.py --ram 2G --walk-end 1G [--ack] [--accel soft]
"""

import argparse
import asyncio
import json
import tempfile

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import parse_size


async def main(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as wd:
        src = await Vm.start(VmSpec(name="src", ram=a.ram, accel=a.accel, walk_end=a.walk_end,
                                    devices=a.device), wd)
        dst = await Vm.start(VmSpec(name="dst", ram=a.ram, accel=a.accel, walk_end=a.walk_end,
                                    devices=a.device, incoming="defer"), wd)
        try:
            caps = {"events": True}
            if a.ack:
                caps |= {"return-path": True, "switchover-ack": True}
            for vm in (src, dst):
                await vm.set_caps(**caps)
            await src.set_params(max_bandwidth=0, downtime_limit=a.downtime_limit)
            await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await src.wait_serial(lambda d: d.startswith(b"A"))
            last = parse_size(a.walk_end) - 4096
            while (await src.pmem(last, 1)) == b"\0":   # the walk's first pass is done
                await asyncio.sleep(0.05)
            if a.stopped:
                await asyncio.sleep(2)  # let the walk dirty its range
                await src.cmd("stop")
            await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = await src.wait_status(timeout=300)
            await dst.wait_status(timeout=30)
            ram = info.get("ram", {})
            out = {k: info.get(k) for k in ("status", "total-time", "downtime", "setup-time",
                                            "error-desc")}
            out["MB/s"] = round(ram.get("transferred", 0) / 1e3 / max(1, info["total-time"]), 1)
            out["mbps"] = ram.get("mbps")
            out["transferred"] = ram.get("transferred")
            out["dirty-sync-count"] = ram.get("dirty-sync-count")
            out["rss-kib"] = {"src": src.peak_rss_kib(), "dst": dst.peak_rss_kib()}
            out["checkpoints"] = info.get("x-downtime-checkpoints")
            out["downtime-bytes"] = ram.get("downtime-bytes")
            out["windows"] = info.get("x-windows")
            out["precopy-bytes"] = ram.get("precopy-bytes")
            print(json.dumps(out, indent=1))
        finally:
            await src.close()
            await dst.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ram", default="512M")
    p.add_argument("--walk-end", default="100M")
    p.add_argument("--accel", default="auto")
    p.add_argument("--ack", action="store_true")
    p.add_argument("--stopped", action="store_true", help="stop the guest first (non-live)")
    p.add_argument("--device", action="append", default=[])
    p.add_argument("--downtime-limit", type=int, default=300)
    asyncio.run(main(p.parse_args()))
