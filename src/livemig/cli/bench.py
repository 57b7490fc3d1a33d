"""``livemig bench``: the same migration scenario on QEMU and on livemig, side by side.

Runs alternate engine by engine (QEMU, livemig, QEMU, livemig, ...) on the
identical guest (our walk boot sector; QEMU boots it from a raw drive),
with the same RAM and walk sizes, capabilities and parameters, over
loopback TCP. Writes JSON and a PNG plot; prints medians, ranges and
livemig/QEMU ratios. When QEMU is missing it says so and runs livemig alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from livemig.cli.driver import Vm, VmSpec, qemu_available
from livemig.machine.guest import parse_size

SCENARIOS = {
    # name: (ram, walk end, downtime-limit ms, capabilities, multifd channels)
    "512M-100M-dl300": ("512M", "100M", 300, (), 0),
    "512M-100M-dl50": ("512M", "100M", 50, (), 0),
    "512M-100M-ack": ("512M", "100M", 300, ("return-path", "switchover-ack"), 0),
    "2G-1G-dl300": ("2G", "1G", 300, (), 0),
    "2G-1G-dl50": ("2G", "1G", 50, (), 0),
    "2G-1G-ack": ("2G", "1G", 300, ("return-path", "switchover-ack"), 0),
    "2G-1G-multifd2": ("2G", "1G", 300, ("multifd",), 2),
    "2G-1G-multifd4": ("2G", "1G", 300, ("multifd",), 4),
}
WALK_START = 1 << 20          # the walk's first page (bytes), as livemig's default
DEFAULT_SCENARIOS = ("512M-100M-dl300", "2G-1G-dl300")


@dataclass
class Result:
    engine: str
    scenario: str
    rep: int
    status: str
    total_ms: int = 0
    downtime_ms: int = 0
    transferred: int = 0
    mbps: float = 0.0
    throughput_mb_s: float = 0.0
    src_peak_rss_kib: int = 0
    dst_peak_rss_kib: int = 0
    error: str | None = None


def walk_image(path: str, walk_end: str) -> str:
    """The walk boot sector as a raw drive for QEMU. SeaBIOS on q35 will not boot
    a disk smaller than about one cylinder: pad to 1 MiB (livemig reads 512 bytes)."""
    from livemig.machine.kvm import bootsector_image
    with open(path, "wb") as f:
        f.write(bootsector_image(WALK_START, parse_size(walk_end)).ljust(1 << 20, b"\0"))
    return path


@asynccontextmanager
async def walk_pair(engine: str, ram: str, walk_end: str, workdir: str, *,
                    image: str | None = None, accel: str = "kvm", caps: tuple[str, ...] = (),
                    channels: int = 0, downtime_limit: int = 300, mem_prealloc: bool = False,
                    names: tuple[str, str] = ("src", "dst"),
                    ) -> AsyncIterator[tuple[Vm, Vm, str]]:
    """A source and a destination of one engine running the walk guest, ready to
    migrate: capabilities (``events`` plus ``caps``) on both, ``max-bandwidth``
    lifted and ``downtime-limit`` on the source, the destination listening, and
    the walk past its first pass on the source (the last page's first byte
    turns non-zero: the same signal on both engines). Yields (src, dst, uri);
    quits both after. QEMU runs with named threads (``debug-threads=on``)."""
    image = image or walk_image(os.path.join(workdir, "walk.img"), walk_end)

    def spec(name: str, **kw: Any) -> VmSpec:
        extra = ["-name", f"{name},debug-threads=on"] if engine == "qemu" else []
        extra += ["-mem-prealloc"] if mem_prealloc else []
        return VmSpec(name=name, engine=engine, ram=ram, accel=accel, walk_end=walk_end,
                      boot_image=image, extra=extra, **kw)
    src = await Vm.start(spec(names[0]), workdir)
    try:
        dst = await Vm.start(spec(names[1], incoming="defer"), workdir)
    except BaseException:
        await src.close()
        raise
    try:
        enable = [{"capability": c, "state": True} for c in ("events", *caps)]
        for vm in (src, dst):
            await vm.cmd("migrate-set-capabilities", capabilities=enable)
            if channels:
                await vm.set_params(multifd_channels=channels)
        await src.set_params(max_bandwidth=0, downtime_limit=downtime_limit)
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
        await src.wait_serial(lambda d: d.startswith(b"A"))
        last = parse_size(walk_end) - 4096
        deadline = time.monotonic() + 120
        while (await src.pmem(last, 1)) == b"\0":
            if time.monotonic() > deadline:
                raise TimeoutError("the guest's walk did not complete a pass")
            await asyncio.sleep(0.05)
        yield src, dst, f"tcp:127.0.0.1:{port}"
    finally:
        await src.close()
        await dst.close()


async def one_run(engine: str, scenario: str, rep: int, workdir: str, image: str,
                  accel: str, mem_prealloc: bool = False) -> Result:
    ram, walk_end, limit, caps, channels = SCENARIOS[scenario]
    async with walk_pair(engine, ram, walk_end, workdir, image=image, accel=accel, caps=caps,
                         channels=channels, downtime_limit=limit, mem_prealloc=mem_prealloc,
                         names=(f"{engine}-src-{rep}", f"{engine}-dst-{rep}"),
                         ) as (src, dst, uri):
        await src.cmd("migrate", uri=uri)
        info = await src.wait_status(timeout=300, poll=0.01)
        await dst.wait_status(timeout=60)
        ram_info = info.get("ram", {})
        total = int(info.get("total-time", 0))
        return Result(engine, scenario, rep, info["status"], total,
                      int(info.get("downtime", 0)), int(ram_info.get("transferred", 0)),
                      float(ram_info.get("mbps", 0)),
                      ram_info.get("transferred", 0) / 1e3 / total if total else 0.0,
                      src.peak_rss_kib() or 0, dst.peak_rss_kib() or 0,
                      info.get("error-desc"))


def summarize(results: list[Result], engines: list[str]) -> list[dict]:
    rows = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        row: dict = {"scenario": scenario}
        for metric in ("total_ms", "downtime_ms", "throughput_mb_s", "mbps",
                       "src_peak_rss_kib", "dst_peak_rss_kib"):
            for engine in engines:
                vals = [getattr(r, metric) for r in results
                        if r.scenario == scenario and r.engine == engine
                        and r.status == "completed"]
                if vals:
                    row[f"{engine}.{metric}"] = {"median": statistics.median(vals),
                                                 "min": min(vals), "max": max(vals)}
            if len(engines) == 2 and all(f"{e}.{metric}" in row for e in engines):
                q = row[f"qemu.{metric}"]["median"]
                row[f"ratio.{metric}"] = row[f"livemig.{metric}"]["median"] / q if q else None
        rows.append(row)
    return rows


def print_summary(rows: list[dict], engines: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape("livemig bench (medians [min..max]; ratio = livemig / QEMU)"))
    table.add_column("scenario")
    table.add_column("metric")
    for e in engines:
        table.add_column(e, justify="right")
    if len(engines) == 2:
        table.add_column("ratio", justify="right")
    names = {"total_ms": "total time ms", "downtime_ms": "downtime ms",
             "throughput_mb_s": "transferred/total MB/s", "mbps": "mbps",
             "src_peak_rss_kib": "src peak RSS MiB", "dst_peak_rss_kib": "dst peak RSS MiB"}
    for row in rows:
        for metric, label in names.items():
            cells = []
            for e in engines:
                v = row.get(f"{e}.{metric}")
                scale = 1 / 1024 if "rss" in metric else 1
                cells.append("-" if v is None else
                             f"{v['median'] * scale:.0f} [{v['min'] * scale:.0f}.."
                             f"{v['max'] * scale:.0f}]")
            ratio = row.get(f"ratio.{metric}")
            extra = [f"{ratio:.2f}" if ratio else "-"] if len(engines) == 2 else []
            table.add_row(row["scenario"], label, *cells, *extra)
    Console(width=max(120, Console().width)).print(table)


def plot(rows: list[dict], engines: list[str], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no plot (pip install 'livemig[bench]')",
              file=sys.stderr)
        return False
    metrics = [("throughput_mb_s", "MB/s (transferred / total time)"),
               ("downtime_ms", "downtime (ms)"), ("total_ms", "total time (ms)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    labels = [r["scenario"] for r in rows]
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        width = 0.8 / len(engines)
        for i, e in enumerate(engines):
            med = [r.get(f"{e}.{metric}", {}).get("median", 0) for r in rows]
            stats = [r.get(f"{e}.{metric}", {}) for r in rows]
            lo = [m - st.get("min", 0) for m, st in zip(med, stats, strict=True)]
            hi = [st.get("max", 0) - m for m, st in zip(med, stats, strict=True)]
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, med, width, yerr=[lo, hi], label=e, capsize=3)
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(rows))])
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


async def bench(args: argparse.Namespace) -> int:
    engines = ["livemig"]
    if args.engines != "livemig":
        if qemu_available():
            engines = ["qemu", "livemig"]
        else:
            print("bench: qemu-system-x86_64 not found (../shared/tools/install-qemu.sh "
                  "installs QEMU 10.0); running livemig alone", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as workdir:
        for scenario in args.scenario or DEFAULT_SCENARIOS:
            image = walk_image(os.path.join(workdir, f"walk-{scenario}.img"),
                               SCENARIOS[scenario][1])
            for rep in range(args.reps):
                for engine in engines:     # alternate engines run by run
                    t0 = time.monotonic()
                    try:
                        r = await one_run(engine, scenario, rep, workdir, image, args.accel,
                                        args.mem_prealloc)
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        r = Result(engine, scenario, rep, "error", error=str(exc))
                    results.append(r)
                    print(f"{scenario} {engine} #{rep}: {r.status} total={r.total_ms}ms "
                          f"downtime={r.downtime_ms}ms {r.throughput_mb_s:.0f}MB/s "
                          f"({time.monotonic() - t0:.1f}s)"
                          + (f" error={r.error}" if r.error else ""), flush=True)
    rows = summarize(results, engines)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump({"engines": engines, "mem_prealloc": args.mem_prealloc,
                   "results": [asdict(r) for r in results],
                   "summary": rows, "machine": {"cpus": os.cpu_count(),
                                                "uname": " ".join(os.uname())}}, f, indent=1)
    print_summary(rows, engines)
    png = os.path.join(args.out, f"bench-{stamp}.png")
    print(f"results: {json_path}" + (f", plot: {png}" if plot(rows, engines, png) else ""))
    return 0 if all(r.status == "completed" for r in results) else 1


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livemig bench", description=__doc__)
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help=f"repeatable; default: {', '.join(DEFAULT_SCENARIOS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--engines", choices=("both", "livemig"), default="both")
    p.add_argument("--accel", choices=("auto", "kvm", "soft"), default="auto")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--mem-prealloc", action="store_true",
                   help="start every VM of both engines with -mem-prealloc (guest RAM "
                        "faulted in at start: no first-touch cost inside the migration)")
    return asyncio.run(bench(p.parse_args(argv)))
