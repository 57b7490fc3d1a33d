"""Soak: migrate one guest back and forth between two VM slots, ``--count`` times.

    python bench/soak.py --count 50 --accel soft

Slot ``left`` starts the guest; each hop starts a fresh ``-incoming defer -S``
destination in the other slot (a VM process receives one migration, as a
QEMU process does), migrates with return-path + switchover-ack and a
VFIO-like device whose memory keeps changing, then checks integrity:

* the stopped source's RAM equals the destination's byte for byte, and the
  walk pattern (QEMU's check_guests_ram) holds;
* the device state (``x-accel-digest``) is the same on both sides;
* after ``cont`` the guest runs on the destination (its walk advances).

The old source then quits and the destination is the next hop's source.
Every step has a deadline (``--hop-timeout``) and the whole run another
(``--timeout``); the first failure stops the run with exit status 1. Every
process started here is ended by PID. One line per hop, then a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from livemig.cli.driver import TERMINAL, Vm, VmSpec
from livemig.machine.guest import parse_size
from livemig.machine.walk_check import check_walk_pattern

PAGE = 4096
WALK_START = 1 << 20


class SoakError(Exception):
    pass


async def until(predicate, timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {timeout} s: {what}")
        await asyncio.sleep(poll)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.vms: list[Vm] = []
        self.caps = {"return-path": True, "switchover-ack": True, "events": True}

    def spec(self, name: str, incoming: bool) -> VmSpec:
        a = self.args
        return VmSpec(name=name, ram=a.ram, accel=a.accel, walk_end=a.walk_end,
                      incoming="defer" if incoming else None, paused=incoming,
                      devices=[a.device] if a.device else [])

    async def start(self, name: str, incoming: bool) -> Vm:
        vm = await Vm.start(self.spec(name, incoming), self.workdir, timeout=self.args.hop_timeout)
        self.vms.append(vm)
        await vm.set_caps(**self.caps)
        return vm

    async def retire(self, vm: Vm) -> None:
        try:
            await asyncio.wait_for(vm.close(timeout=5), 10)
        except Exception:  # noqa: BLE001 - killed by PID below
            vm.kill()
        self.vms.remove(vm)

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()

    async def wait_walking(self, vm: Vm) -> None:
        await vm.wait_serial(lambda d: d.startswith(b"A"), timeout=self.args.hop_timeout)
        end = parse_size(self.args.walk_end) - PAGE

        async def walked() -> bool:
            return (await vm.pmem(end, 1))[0] != 0 or (await vm.pmem(WALK_START, 1))[0] > 1
        await until(walked, self.args.hop_timeout, f"{vm.spec.name}: first walk pass")

    async def guest_runs(self, vm: Vm) -> None:
        before = await vm.pmem(WALK_START, 1)

        async def moved() -> bool:
            return await vm.pmem(WALK_START, 1) != before
        await until(moved, self.args.hop_timeout, f"{vm.spec.name}: guest progress")

    async def check(self, src: Vm, dst: Vm) -> None:
        size = parse_size(self.args.ram, default_unit="m")
        a, b = await src.pmem(0, size), await dst.pmem(0, size)
        if a != b:
            pa = np.frombuffer(a, np.uint8).reshape(-1, PAGE)
            pb = np.frombuffer(b, np.uint8).reshape(-1, PAGE)
            bad = np.flatnonzero((pa != pb).any(axis=1))
            raise SoakError(f"{bad.size} pages differ, first {bad[:8].tolist()}")
        first = np.frombuffer(b, np.uint8).reshape(-1, PAGE)[:, 0]
        problems = check_walk_pattern(first[WALK_START // PAGE:
                                            parse_size(self.args.walk_end) // PAGE])
        if problems:
            raise SoakError(f"walk pattern broken: {problems[:3]}")
        if self.args.device:
            da = (await src.cmd("x-accel-digest", id="acc0"))["sha256"]
            db = (await dst.cmd("x-accel-digest", id="acc0"))["sha256"]
            if da != db:
                raise SoakError("device state differs")

    async def hop(self, i: int, src: Vm) -> tuple[Vm, dict]:
        t = self.args.hop_timeout
        slot = "right" if i % 2 == 0 else "left"
        dst = await self.start(f"{slot}-{i + 1}", incoming=True)
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        addr = (await dst.cmd("query-migrate"))["socket-address"][0]
        await src.cmd("migrate", uri=f"tcp:{addr['host']}:{addr['port']}")
        info = await src.wait_status(TERMINAL, timeout=t, poll=0.01)
        dinfo = await dst.wait_status(TERMINAL, timeout=t, poll=0.01)
        if info["status"] != "completed" or dinfo["status"] != "completed":
            raise SoakError(f"hop {i + 1}: source {info.get('status')} "
                            f"({info.get('error-desc')}), destination {dinfo.get('status')} "
                            f"({dinfo.get('error-desc')})")
        await self.check(src, dst)
        await dst.cmd("cont")
        await self.guest_runs(dst)
        await self.retire(src)
        return dst, info

    async def run(self) -> int:
        a = self.args
        t0 = time.monotonic()
        downtimes, totals = [], []
        src = await self.start("left-0", incoming=False)
        await src.set_params(max_bandwidth=0)
        await self.wait_walking(src)
        for i in range(a.count):
            left = a.timeout - (time.monotonic() - t0)
            if left <= 0:
                raise SoakError(f"soak exceeded {a.timeout} s after {i} migrations")
            try:
                src, info = await asyncio.wait_for(self.hop(i, src), min(left, 4 * a.hop_timeout))
            except TimeoutError:
                raise SoakError(f"hop {i + 1} exceeded its deadline") from None
            downtimes.append(info["downtime"])
            totals.append(info["total-time"])
            print(f"hop={i + 1} {src.spec.name} total_ms={info['total-time']} "
                  f"downtime_ms={info['downtime']} transferred={info['ram']['transferred']} "
                  f"acked={info.get('x-switchover-ack', {}).get('acked')} ok", flush=True)
        wall = time.monotonic() - t0
        print(f"soak ok: {a.count} migrations in {wall:.1f} s; downtime ms median "
              f"{statistics.median(downtimes):.0f} max {max(downtimes)}; total ms median "
              f"{statistics.median(totals):.0f} max {max(totals)}", flush=True)
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=50, help="migrations (default 50)")
    p.add_argument("--accel", default="soft", choices=("soft", "kvm", "auto"))
    p.add_argument("--ram", default="64M")
    p.add_argument("--walk-end", default="16M")
    p.add_argument("--device", default="accel,id=acc0,size=4M,init-size=512K,prepare-ms=50,"
                   "dirty-rate=20", help="accel device spec ('' for none)")
    p.add_argument("--hop-timeout", type=float, default=60.0, help="seconds per step")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole soak")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="livemig-soak-")
    os.makedirs(workdir, exist_ok=True)
    soak = Soak(args, workdir)

    async def go() -> int:
        try:
            return await soak.run()
        finally:
            for vm in list(soak.vms):
                await soak.retire(vm)
    try:
        return asyncio.run(go())
    except SoakError as exc:
        print(f"soak FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        soak.kill_all()


if __name__ == "__main__":
    sys.exit(main())
