"""``livemig demo``: the seed's point, shown on this machine in well under a minute.

Starts a source and a destination VM (walk guest + an ``accel`` device that
needs 400 ms of preparation), migrates twice — without, then with
return-path + switchover-ack — checks integrity byte for byte, and prints
downtime as the source reports it *and* as the guest lives it: the walk
ticks on its serial port every few pages, both serial ports are sockets
read from here, and the gap from the source guest's last tick to the
destination guest's first is the pause the guest saw (``guest_clock``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from livemig.cli.driver import Vm, VmSpec
from livemig.cli.guest_clock import guest_gap
from livemig.machine.guest import parse_size
from livemig.machine.walk_check import check_walk_pattern

MIB = 1 << 20
ACCEL = "accel,id=acc0,size=64M,init-size=4M,prepare-ms=400"
TICK_PAGES = 32               # a tick per 32 pages: well under a millisecond at walk speed
RUN_TICKS = 100               # the destination must tick this often to count as running


@dataclass
class DemoRun:
    label: str
    downtime_ms: int
    guest_downtime_ms: float
    total_ms: int
    throughput_mb_s: float
    ack_ms: int | None
    tick_period_ms: float
    ram_equal: bool
    accel_equal: bool
    pattern_ok: bool
    dest_runs: bool

    @property
    def integrity(self) -> bool:
        return self.ram_equal and self.accel_equal and self.pattern_ok and self.dest_runs


async def migrate_once(workdir: str, label: str, *, ack: bool, ram: str, walk_end: str,
                       accel: str) -> DemoRun:
    def spec(name: str, incoming: str | None = None) -> VmSpec:
        return VmSpec(name=name, ram=ram, accel=accel, walk_end=walk_end, devices=[ACCEL],
                      walk_tick=TICK_PAGES, serial_socket=True, incoming=incoming)
    short = "ack" if ack else "noack"
    src = await Vm.start(spec(f"src-{short}"), workdir)
    dst = await Vm.start(spec(f"dst-{short}", incoming="defer"), workdir)
    try:
        assert src.serial is not None and dst.serial is not None
        caps = {"events": True, "return-path": ack, "switchover-ack": ack}
        for vm in (src, dst):
            await vm.set_caps(**caps)
        await src.set_params(max_bandwidth=0, downtime_limit=300)
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
        port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
        await src.wait_booted()
        t = time.monotonic()
        await asyncio.sleep(0.2)        # a stretch of ticks to measure the walk's rate on
        rate = src.serial.snapshot().rate(t, time.monotonic()) * TICK_PAGES
        await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = await src.wait_status()
        dinfo = await dst.wait_status()
        if info["status"] != "completed":
            raise RuntimeError(f"{label}: source {info['status']}: {info.get('error-desc')}")
        if dinfo["status"] != "completed":
            raise RuntimeError(f"{label}: destination {dinfo['status']}: "
                               f"{dinfo.get('error-desc')}")
        # The destination runs the guest on: it must tick, and its first tick ends the gap.
        deadline, runs = time.monotonic() + 10, False
        while time.monotonic() < deadline and not runs:
            runs = dst.serial.snapshot().ticks >= RUN_TICKS
            await asyncio.sleep(0.01)
        gap = guest_gap(src.serial.snapshot(), dst.serial.snapshot())
        await dst.cmd("stop")
        size = int(info["ram"]["total"])
        src_mem, dst_mem = await src.pmem(0, size), await dst.pmem(0, size)
        lo, hi = MIB // 4096, parse_size(walk_end) // 4096
        pages = [np.frombuffer(m, dtype=np.uint8).reshape(-1, 4096).copy()
                 for m in (src_mem, dst_mem)]
        walks = [p[lo:hi, 0].copy() for p in pages]
        for p in pages:          # the walk's bytes move on at the destination: mask them
            p[lo:hi, 0] = 0
        digests = [(await vm.cmd("x-accel-digest", id="acc0"))["sha256"] for vm in (src, dst)]
        ack_info = info.get("x-switchover-ack", {})
        total = int(info["total-time"])
        return DemoRun(
            label=label, downtime_ms=int(info["downtime"]),
            guest_downtime_ms=float("nan") if gap is None else gap * 1000,
            total_ms=total,
            throughput_mb_s=info["ram"]["transferred"] / 1e6 / (total / 1000),
            ack_ms=ack_info.get("ack-time"),
            tick_period_ms=TICK_PAGES / rate * 1000 if rate else float("nan"),
            ram_equal=bool(np.array_equal(pages[0], pages[1])),
            accel_equal=digests[0] == digests[1],
            pattern_ok=not check_walk_pattern(walks[0]) and not check_walk_pattern(walks[1]),
            dest_runs=runs)
    finally:
        await src.close()
        await dst.close()


def print_table(runs: list[DemoRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="livemig demo: accel device with prepare-ms=400")
    for col in ("migration", "downtime (source says)", "downtime (guest lives)",
                "total time", "throughput", "time to ACK", "integrity"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r.label, f"{r.downtime_ms} ms",
                      f"{r.guest_downtime_ms:.0f} ms (±{r.tick_period_ms:.1f})",
                      f"{r.total_ms} ms", f"{r.throughput_mb_s:.0f} MB/s",
                      "-" if r.ack_ms is None else f"{r.ack_ms} ms",
                      "ok" if r.integrity else
                      f"FAILED ram={r.ram_equal} accel={r.accel_equal} "
                      f"pattern={r.pattern_ok} runs={r.dest_runs}")
    Console(width=max(120, Console().width)).print(table)


async def demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as workdir:
        runs = [await migrate_once(workdir, "without switchover-ack", ack=False, ram=args.ram,
                                   walk_end=args.walk_end, accel=args.accel),
                await migrate_once(workdir, "return-path + switchover-ack", ack=True,
                                   ram=args.ram, walk_end=args.walk_end, accel=args.accel)]
    print_table(runs)
    ok = all(r.integrity for r in runs)
    print("integrity: all checks passed" if ok else "integrity: FAILED")
    return 0 if ok else 1


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livemig demo", description=__doc__)
    p.add_argument("--ram", default="256M")
    p.add_argument("--walk-end", default="16M")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "soft"))
    return asyncio.run(demo(p.parse_args(argv)))
