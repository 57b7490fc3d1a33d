"""CPU seconds per GB moved, by thread, during a migration's later passes, on
QEMU or livemig: where the data path spends its time, engine against engine.

    python bench/cpu_per_gb.py --engine qemu
    python bench/cpu_per_gb.py --engine livemig

Migrates a 2G guest walking 1G with downtime-limit 1 ms (so it keeps
iterating), waits for the second dirty sync (the first pass, with its
first-touch of destination memory, is over), then reads every thread's
user and system time from /proc over a window and divides by the bytes
sent in it. The source vCPU thread is marked (it runs the guest). QEMU
runs with ``debug-threads=on``; livemig names its threads itself (vcpu0,
live_migration, incoming, mig/src/send_N...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time

from common import add_pair_args, pair

HZ = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float, float]]:
    """tid -> (name, user s, system s)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        fields = st[st.rindex(")") + 2:].split()
        out[int(tid)] = (name, int(fields[11]) / HZ, int(fields[12]) / HZ)
    return out


async def main(a: argparse.Namespace) -> None:
    caps = ("multifd",) if a.multifd else ()
    caps += ("zero-copy-send",) if a.zero_copy else ()
    async with pair(a, caps=caps, channels=a.multifd, downtime_limit=1) as (src, dst, uri):
        await src.cmd("migrate", uri=uri)
        while (await src.cmd("query-migrate")).get("ram", {}).get(
                "dirty-sync-count", 0) < a.after_sync:
            await asyncio.sleep(0.01)
        before = {n: thread_times(vm.proc.pid) for n, vm in (("src", src), ("dst", dst))}
        t0, b0 = time.monotonic(), (await src.cmd("query-migrate"))["ram"]["transferred"]
        perf = None
        if a.perf:
            # Both processes, every thread, over the same window (perf report
            # --sort comm,dso,sym splits it by thread name).
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-g", "-o", a.perf,
                                     "-p", f"{src.proc.pid},{dst.proc.pid}",
                                     "--", "sleep", str(a.seconds)])
        await asyncio.sleep(a.seconds)
        if perf is not None:
            await asyncio.to_thread(perf.wait)
        info = await src.cmd("query-migrate")
        t1 = time.monotonic()
        after = {n: thread_times(vm.proc.pid) for n, vm in (("src", src), ("dst", dst))}
        if info["status"] != "active":
            print(f"{a.engine}: the migration ended ({info['status']}) inside the window;"
                  " run again")
            return
        gb = (info["ram"]["transferred"] - b0) / 1e9
        print(f"{a.engine}: {gb / (t1 - t0) * 1000:.0f} MB/s over {t1 - t0:.1f} s"
              + (f", dirty-sync-missed-zero-copy {info['ram']['dirty-sync-missed-zero-copy']}"
                 if a.zero_copy else ""))
        for side in ("src", "dst"):
            for tid, (name, user, system) in sorted(after[side].items()):
                if tid not in before[side]:
                    continue
                du, ds = user - before[side][tid][1], system - before[side][tid][2]
                busy = (du + ds) / (t1 - t0)
                if busy < a.min_busy:
                    continue
                vcpu = side == "src" and (name.startswith("CPU ") or name == "vcpu0")
                label = "  (vCPU: runs the guest)" if vcpu else ""
                print(f"  {side} {name:16} user {du / gb:.3f} s/GB  sys {ds / gb:.3f} s/GB"
                      f"  ({busy:.0%} of a core){label}")
        await src.cmd("migrate_cancel")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_pair_args(p)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--after-sync", type=int, default=2,
                   help="start measuring at this dirty sync (1: from the first pass on)")
    p.add_argument("--min-busy", type=float, default=0.05,
                   help="leave out threads busy less than this share of a core")
    p.add_argument("--multifd", type=int, default=0, metavar="CHANNELS",
                   help="migrate with the multifd capability and this many channels")
    p.add_argument("--perf", metavar="FILE",
                   help="also record both processes with perf over the window")
    p.add_argument("--zero-copy", action="store_true",
                   help="with --multifd: QEMU's zero-copy-send capability too")
    asyncio.run(main(p.parse_args()))
