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

from qemu.qmp import ExecuteError

from livemig.cli.driver import Vm, VmSpec, qemu_available
from livemig.cli.guest_clock import guest_gap
from livemig.machine.guest import parse_size
from livemig.machine.tsc import tsc_hz


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting. ``pace_pct``: the walk paced to that share of the
    single-channel migration rate measured on this machine (None: full speed)."""

    ram: str
    walk_end: str
    downtime_limit: int
    caps: tuple[str, ...] = ()
    channels: int = 0
    pace_pct: int | None = None
    devices: tuple[str, ...] = ()
    livemig_only: bool = False       # QEMU has no accel device
    max_bandwidth: int = 0           # bytes/s, 0 = unlimited
    tls: bool = False                # x509 TLS on every channel, same creds for both engines
    postcopy_after_syncs: int = 0    # migrate-start-postcopy once this many dirty syncs


ACCEL_DEVICE = "accel,id=acc0,size=64M,init-size=4M,prepare-ms=400"
ACK = ("return-path", "switchover-ack")
SCENARIOS: dict[str, Scenario] = {
    "512M-100M-dl300": Scenario("512M", "100M", 300),
    "512M-100M-dl50": Scenario("512M", "100M", 50),
    "512M-100M-ack": Scenario("512M", "100M", 300, ACK),
    "2G-1G-dl300": Scenario("2G", "1G", 300),
    "2G-1G-dl50": Scenario("2G", "1G", 50),
    "2G-1G-ack": Scenario("2G", "1G", 300, ACK),
    "2G-1G-multifd2": Scenario("2G", "1G", 300, ("multifd",), 2),
    "2G-1G-multifd4": Scenario("2G", "1G", 300, ("multifd",), 4),
    # QEMU's zero-copy-send (issue 17): MSG_ZEROCOPY on the multifd channels.
    "2G-1G-multifd4-zerocopy": Scenario("2G", "1G", 300, ("multifd", "zero-copy-send"), 4),
    # Downtime as the guest lives it (issue 11): paced walks, both limits.
    **{f"2G-1G-p{pct}-dl{dl}": Scenario("2G", "1G", dl, pace_pct=pct)
       for dl in (300, 50) for pct in (25, 50, 75, 100)},
    "2G-1G-accel-dl300": Scenario("2G", "1G", 300, devices=(ACCEL_DEVICE,), livemig_only=True),
    "2G-1G-accel-ack": Scenario("2G", "1G", 300, ACK, devices=(ACCEL_DEVICE,),
                                livemig_only=True),
    # The downtime contract (issue 12): the full-speed walk under a 200 MiB/s cap.
    "2G-1G-autoconverge": Scenario("2G", "1G", 300, ("auto-converge",),
                                   max_bandwidth=200 << 20),
    "2G-1G-rp-dl300": Scenario("2G", "1G", 300, ("return-path",)),
    # TLS (issue 14): the same x509 directories for both engines (make_x509_dirs).
    "512M-100M-multifd4": Scenario("512M", "100M", 300, ("multifd",), 4),
    "512M-100M-tls": Scenario("512M", "100M", 300, tls=True),
    "512M-100M-tls-multifd4": Scenario("512M", "100M", 300, ("multifd",), 4, tls=True),
    # The contract measured (issue 12): with a return path the destination reports
    # its costs and the source waits for its SHUT; paced walks at both limits.
    **{f"2G-1G-p{pct}-rp-dl{dl}": Scenario("2G", "1G", dl, ("return-path",), pace_pct=pct)
       for dl in (300, 50) for pct in (50, 100)},
    # Postcopy (issue 15's anchor): the full-speed walk, postcopy after 2 dirty syncs.
    "2G-1G-postcopy-dl50": Scenario("2G", "1G", 50, ("postcopy-ram", "postcopy-blocktime"),
                                    postcopy_after_syncs=2),
}
POSTCOPY_SCENARIOS = ("2G-1G-postcopy-dl50",)
GUEST_SCENARIOS = tuple(n for n, sc in SCENARIOS.items()
                        if sc.pace_pct is not None or sc.devices)
CONTRACT_SCENARIOS = ("2G-1G-p50-rp-dl50", "2G-1G-p100-rp-dl50", "2G-1G-p50-rp-dl300",
                      "2G-1G-p100-rp-dl300", "2G-1G-rp-dl300", "2G-1G-accel-ack")
WALK_START = 1 << 20          # the walk's first page (bytes), as livemig's default
DEFAULT_SCENARIOS = ("512M-100M-dl300", "2G-1G-dl300")
TICK_PAGES = 256              # a tick every 1 MiB walked: ~1 ms at 250,000 pages/s
TIME_LIMIT_S = 60.0           # a migration not completed by then counts as not converged


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
    guest_downtime_ms: float | None = None   # last source tick -> first destination tick
    downtime_limit_ms: int = 0
    dirty_syncs: int = 0
    walk_pages_per_s: float = 0.0            # the guest's rate before migrating (ticks)
    tick_period_ms: float = 0.0              # the method's resolution at that rate
    pace_cycles: int = 0
    max_throttle: int = 0                    # auto-converge's highest cpu-throttle-percentage
    predicted_ms: int | None = None          # livemig: the prediction it switched over on
    downtime_bytes: int = 0                  # RAM sent with the guest stopped (both engines)
    pending_bytes: int | None = None         # livemig: the RAM the prediction priced
    dest_measured_ms: int | None = None      # livemig: the destination's measured part
    postcopy_requests: int | None = None     # postcopy: pages the destination asked for
    blocktime_ms: int | None = None          # postcopy: the destination's postcopy-blocktime
    request_median_ms: float | None = None   # livemig: fault read -> page placed
    request_p99_ms: float | None = None
    estimate: dict | None = None             # livemig: x-downtime-estimate at completion
    checkpoints: dict | None = None          # x-downtime-checkpoints (ms from the stop)


def walk_image(path: str, walk_end: str, *, tick: int = 0, pace: int = 0) -> str:
    """The walk boot sector as a raw drive for QEMU. SeaBIOS on q35 will not boot
    a disk smaller than about one cylinder: pad to 1 MiB (livemig reads 512 bytes)."""
    from livemig.machine.kvm import bootsector_image
    image = bootsector_image(WALK_START, parse_size(walk_end), tick_pages=tick, pace=pace)
    with open(path, "wb") as f:
        f.write(image.ljust(1 << 20, b"\0"))
    return path


def make_x509_dirs(workdir: str) -> tuple[str, str]:
    """QEMU-layout x509 directories (server, client) for 127.0.0.1, made with the
    openssl CLI in ``workdir`` (a CA, then a server and a client certificate)."""
    import shutil
    import subprocess
    root = os.path.join(workdir, "pki")
    server, client = os.path.join(root, "server"), os.path.join(root, "client")
    for d in (server, client):
        os.makedirs(d, exist_ok=True)
    ca_key, ca_cert = os.path.join(root, "ca-key.pem"), os.path.join(server, "ca-cert.pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "2",
            "-subj", "/CN=livemig bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    shutil.copyfile(ca_cert, os.path.join(client, "ca-cert.pem"))
    for d, role, usage in ((server, "server", "serverAuth"), (client, "client", "clientAuth")):
        key, csr = os.path.join(d, f"{role}-key.pem"), os.path.join(root, f"{role}.csr")
        ext = os.path.join(root, f"{role}.ext")
        with open(ext, "w") as text:
            text.write(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
                       "basicConstraints=CA:FALSE\n")
        openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN=livemig bench {role}")
        openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                "-CAcreateserial", "-days", "2", "-out", os.path.join(d, f"{role}-cert.pem"),
                "-extfile", ext)
    return server, client


@asynccontextmanager
async def walk_pair(engine: str, ram: str, walk_end: str, workdir: str, *,
                    image: str | None = None, accel: str = "kvm", caps: tuple[str, ...] = (),
                    channels: int = 0, downtime_limit: int = 300, mem_prealloc: bool = False,
                    names: tuple[str, str] = ("src", "dst"), tick: int = 0, pace: int = 0,
                    devices: tuple[str, ...] = (), max_bandwidth: int = 0,
                    tls: tuple[str, str] | None = None,
                    ) -> AsyncIterator[tuple[Vm, Vm, str]]:
    """A source and a destination of one engine running the walk guest, ready to
    migrate: capabilities (``events`` plus ``caps``) on both, ``max-bandwidth``
    lifted and ``downtime-limit`` on the source, the destination listening, and
    the walk past its first pass on the source (the last page's first byte
    turns non-zero: the same signal on both engines). Yields (src, dst, uri);
    quits both after. QEMU runs with named threads (``debug-threads=on``).
    ``tls``: (server dir, client dir): ``tls-creds-x509`` objects and ``tls-creds``
    on both sides, the same files for either engine.
    ``tick``: the guest ticks on a serial socket each VM's observer reads
    (``Vm.serial``), for the guest-visible downtime; ``pace`` slows the walk."""
    image = image or walk_image(os.path.join(workdir, "walk.img"), walk_end, tick=tick,
                                pace=pace)

    def spec(name: str, **kw: Any) -> VmSpec:
        extra = ["-name", f"{name},debug-threads=on"] if engine == "qemu" else []
        extra += ["-mem-prealloc"] if mem_prealloc else []
        return VmSpec(name=name, engine=engine, ram=ram, accel=accel, walk_end=walk_end,
                      boot_image=image, extra=extra, walk_tick=tick, walk_pace=pace,
                      serial_socket=bool(tick), devices=list(devices), **kw)
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
        await src.set_params(max_bandwidth=max_bandwidth, downtime_limit=downtime_limit)
        if tls is not None:
            for vm, endpoint, directory in ((dst, "server", tls[0]), (src, "client", tls[1])):
                await vm.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                              "endpoint": endpoint, "dir": directory})
                await vm.set_params(**{"tls-creds": "tls0"})
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
        await src.wait_booted()
        deadline = time.monotonic() + 120
        if pace and src.serial is not None:
            # A paced walk: its zeroing pass runs at full speed, its ticks start with
            # the walk; a second of them is enough (a full paced pass takes long).
            while src.serial.snapshot().ticks < 1000:
                if time.monotonic() > deadline:
                    raise TimeoutError("the paced walk does not tick")
                await asyncio.sleep(0.05)
        else:
            last = parse_size(walk_end) - 4096
            while (await src.pmem(last, 1)) == b"\0":
                if time.monotonic() > deadline:
                    raise TimeoutError("the guest's walk did not complete a pass")
                await asyncio.sleep(0.05)
        yield src, dst, f"tcp:127.0.0.1:{port}"
    finally:
        await src.close()
        await dst.close()


async def one_run(engine: str, scenario: str, rep: int, workdir: str, image: str,
                  accel: str, mem_prealloc: bool = False, *, pace: int = 0,
                  time_limit: float = TIME_LIMIT_S) -> Result:
    sc = SCENARIOS[scenario]
    async with walk_pair(engine, sc.ram, sc.walk_end, workdir, image=image, accel=accel,
                         caps=sc.caps, channels=sc.channels, downtime_limit=sc.downtime_limit,
                         mem_prealloc=mem_prealloc, tick=TICK_PAGES, pace=pace,
                         devices=sc.devices, max_bandwidth=sc.max_bandwidth,
                         tls=make_x509_dirs(workdir) if sc.tls else None,
                         names=(f"{engine}-src-{rep}", f"{engine}-dst-{rep}"),
                         ) as (src, dst, uri):
        assert src.serial is not None and dst.serial is not None
        t = time.monotonic()
        rate = src.serial.snapshot().rate(t - 0.5, t) * TICK_PAGES
        await src.cmd("migrate", uri=uri)
        throttle = 0
        postcopy_asked = False
        try:
            deadline = time.monotonic() + time_limit
            while True:
                info = await src.cmd("query-migrate")
                throttle = max(throttle, int(info.get("cpu-throttle-percentage", 0)))
                syncs = int(info.get("ram", {}).get("dirty-sync-count", 0))
                if (sc.postcopy_after_syncs and not postcopy_asked
                        and syncs >= sc.postcopy_after_syncs):
                    await src.cmd("migrate-start-postcopy")
                    postcopy_asked = True
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError()
                await asyncio.sleep(0.01)
        except TimeoutError:
            try:
                await src.cmd("migrate_cancel")
            except ExecuteError:    # in postcopy both engines refuse: it runs to its end
                pass
            info = await src.wait_status(timeout=30)
            info = {**info, "status": "not-converged"}
        result = Result(engine, scenario, rep, info["status"],
                        downtime_limit_ms=sc.downtime_limit,
                        dirty_syncs=int(info.get("ram", {}).get("dirty-sync-count", 0)),
                        walk_pages_per_s=rate, pace_cycles=pace,
                        tick_period_ms=TICK_PAGES / rate * 1000 if rate else 0.0,
                        max_throttle=throttle, error=info.get("error-desc"))
        if info["status"] != "completed":
            return result
        dinfo = await dst.wait_status(timeout=60)
        if sc.postcopy_after_syncs:
            result.postcopy_requests = int(info.get("ram", {}).get("postcopy-requests", 0))
            if "postcopy-blocktime" in dinfo:
                result.blocktime_ms = int(dinfo["postcopy-blocktime"])
            lat = dinfo.get("x-postcopy", {}).get("request-latency-ms")
            if lat:
                result.request_median_ms, result.request_p99_ms = lat["median"], lat["p99"]
        # The destination's guest runs: its first tick closes the gap.
        deadline = time.monotonic() + 20
        while not dst.serial.snapshot().ticks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        gap = guest_gap(src.serial.snapshot(), dst.serial.snapshot())
        ram_info = info.get("ram", {})
        total = int(info.get("total-time", 0))
        result.total_ms = total
        result.downtime_ms = int(info.get("downtime", 0))
        result.transferred = int(ram_info.get("transferred", 0))
        result.downtime_bytes = int(ram_info.get("downtime-bytes", 0))
        result.mbps = float(ram_info.get("mbps", 0))
        result.throughput_mb_s = result.transferred / 1e3 / total if total else 0.0
        result.src_peak_rss_kib = src.peak_rss_kib() or 0
        result.dst_peak_rss_kib = dst.peak_rss_kib() or 0
        result.guest_downtime_ms = None if gap is None else gap * 1000
        est = info.get("x-downtime-estimate")
        result.estimate, result.checkpoints = est, info.get("x-downtime-checkpoints")
        if est and not sc.postcopy_after_syncs:     # a precopy prediction: not postcopy's
            result.predicted_ms = int(est["total-ms"])
            result.pending_bytes = est.get("pending-bytes")
            m = est.get("measured", {})
            parts = [v for k, v in m.items() if k.startswith("destination-") and
                     k != "destination-last-byte-to-running-ms"]
            result.dest_measured_ms = int(sum(parts)) if parts else None
        return result


METRICS = ("total_ms", "downtime_ms", "guest_downtime_ms", "predicted_ms", "dest_measured_ms",
           "postcopy_requests", "blocktime_ms", "request_median_ms", "request_p99_ms",
           "throughput_mb_s", "mbps",
           "dirty_syncs", "walk_pages_per_s", "max_throttle", "src_peak_rss_kib",
           "dst_peak_rss_kib")


def summarize(results: list[Result], engines: list[str]) -> list[dict]:
    """Per scenario and engine: medians [min..max] of the completed runs, how
    many converged within the time limit, and how often the guest-visible
    downtime exceeded the downtime limit."""
    rows = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        row: dict = {"scenario": scenario}
        for engine in engines:
            runs = [r for r in results if r.scenario == scenario and r.engine == engine]
            if not runs:
                continue
            done = [r for r in runs if r.status == "completed"]
            seen = [r for r in done if r.guest_downtime_ms is not None]
            row[f"{engine}.converged"] = f"{len(done)}/{len(runs)}"
            over = sum(1 for r in seen
                       if (r.guest_downtime_ms or 0.0) > r.downtime_limit_ms)
            row[f"{engine}.over_limit"] = f"{over}/{len(seen)}" if seen else "-"
            if seen:       # the contract: within the limit in >= 95% of converged runs
                row[f"{engine}.within_limit_pct"] = round(100 * (len(seen) - over) / len(seen),
                                                          1)
        for metric in METRICS:
            for engine in engines:
                vals = [getattr(r, metric) for r in results
                        if r.scenario == scenario and r.engine == engine
                        and r.status == "completed" and getattr(r, metric) is not None]
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
    names = {"total_ms": "total time ms", "downtime_ms": "downtime ms (engine says)",
             "guest_downtime_ms": "downtime ms (guest lives)",
             "predicted_ms": "downtime ms (predicted)",
             "dest_measured_ms": "destination part ms (measured)",
             "postcopy_requests": "postcopy page requests",
             "blocktime_ms": "postcopy-blocktime ms (destination)",
             "request_median_ms": "page request latency ms, median",
             "request_p99_ms": "page request latency ms, p99",
             "throughput_mb_s": "transferred/total MB/s", "mbps": "mbps",
             "dirty_syncs": "dirty syncs", "walk_pages_per_s": "walk pages/s before",
             "max_throttle": "max cpu throttle %",
             "src_peak_rss_kib": "src peak RSS MiB", "dst_peak_rss_kib": "dst peak RSS MiB"}
    for row in rows:
        for label, key in (("converged", "converged"), ("guest downtime > limit", "over_limit"),
                           ("guest within limit %", "within_limit_pct")):
            cells = [str(row.get(f"{e}.{key}", "-")) for e in engines]
            table.add_row(row["scenario"], label, *cells, *([""] if len(engines) == 2 else []))
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


def plot_downtime(rows: list[dict], engines: list[str], path: str) -> bool:
    """Reported against guest-visible downtime, per scenario and engine, with
    the downtime limit: the picture of what each engine does not count."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if any(f"{e}.guest_downtime_ms" in r for e in engines)]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    bars = [(e, m) for e in engines for m in ("downtime_ms", "guest_downtime_ms")]
    width = 0.8 / len(bars)
    for i, (e, m) in enumerate(bars):
        stats = [r.get(f"{e}.{m}", {}) for r in rows]
        med = [st.get("median", 0) for st in stats]
        lo = [md - st.get("min", md) for md, st in zip(med, stats, strict=True)]
        hi = [st.get("max", md) - md for md, st in zip(med, stats, strict=True)]
        xs = [j + i * width for j in range(len(rows))]
        label = f"{e}: {'engine says' if m == 'downtime_ms' else 'guest lives'}"
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=label,
               hatch="" if m == "downtime_ms" else "//")
    for j, r in enumerate(rows):
        limit = SCENARIOS[r["scenario"]].downtime_limit if r["scenario"] in SCENARIOS else 0
        ax.hlines(limit, j - width / 2, j + 0.8 - width / 2, colors="red", linestyles="dashed")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["scenario"] for r in rows], rotation=25, fontsize=8, ha="right")
    ax.set_ylabel("downtime (ms); dashed: downtime-limit")
    ax.set_title("Downtime: what the engine reports vs. the gap in the guest's ticks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


@dataclass
class Calibration:
    """The single-channel migration rate and the unpaced walk rate on this
    machine, measured at the start of a bench that paces its guests."""

    link_pages_per_s: float           # pages a single channel moves per second
    walk_pages_per_s: float           # the unpaced walk's rate (before migrating)
    tsc_hz: float
    by_engine: dict[str, dict[str, float]]

    def pace_for(self, pct: int, engine: str) -> int:
        """TSC cycles per page for a walk at ``pct`` % of the link's rate on
        ``engine``: the cycles a page may take, less what a paced page costs
        besides, measured per engine at one pace (under nested KVM a page and
        its ``rdtsc`` loop cost more than the pace, and not the same on QEMU's
        vCPU as on livemig's), so both engines' guests walk at the same rate."""
        target = self.link_pages_per_s * pct / 100
        return max(1, int(self.tsc_hz / target - self.by_engine[engine]["page_cost_cycles"]))


async def calibrate(engines: list[str], workdir: str, accel: str) -> Calibration:
    """Per engine: migrate a stopped 2G/1G walk guest (no dirtying: the link's
    own rate) and read the unpaced walk's tick rate first. The link rate is
    QEMU's where QEMU runs (the reference), the walk rate the engines' mean."""
    by_engine: dict[str, dict[str, float]] = {}
    for engine in engines:
        image = walk_image(os.path.join(workdir, f"cal-{engine}.img"), "1G", tick=TICK_PAGES)
        async with walk_pair(engine, "2G", "1G", workdir, image=image, accel=accel,
                             tick=TICK_PAGES, names=(f"cal-{engine}-src", f"cal-{engine}-dst"),
                             ) as (src, dst, uri):
            assert src.serial is not None
            t = time.monotonic()
            walk = src.serial.snapshot().rate(t - 0.5, t) * TICK_PAGES
            await src.cmd("stop")
            await src.cmd("migrate", uri=uri)
            info = await src.wait_status(timeout=120, poll=0.01)
            total_s = max(1e-3, (int(info.get("total-time", 0))
                                 - int(info.get("setup-time", 0))) / 1000)
            pages = int(info.get("ram", {}).get("transferred", 0)) / 4096
            by_engine[engine] = {"link_pages_per_s": pages / total_s, "walk_pages_per_s": walk}
        # One paced walk measures what a paced page costs besides its pace.
        probe_pace = int(tsc_hz() / 30_000)
        image = walk_image(os.path.join(workdir, f"cal-{engine}-p.img"), "1G", tick=TICK_PAGES,
                           pace=probe_pace)
        vm = await Vm.start(VmSpec(name=f"cal-{engine}-p", engine=engine, ram="2G",
                                   accel=accel, walk_end="1G", boot_image=image,
                                   walk_tick=TICK_PAGES, walk_pace=probe_pace,
                                   serial_socket=True), workdir)
        try:
            assert vm.serial is not None
            deadline = time.monotonic() + 60
            while vm.serial.snapshot().ticks < 500 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            t = time.monotonic()
            await asyncio.sleep(1.0)
            paced = vm.serial.snapshot().rate(t, time.monotonic()) * TICK_PAGES
        finally:
            await vm.close()
        by_engine[engine]["paced_pages_per_s"] = paced
        by_engine[engine]["probe_pace"] = probe_pace
        by_engine[engine]["page_cost_cycles"] = (
            max(0.0, tsc_hz() / paced - probe_pace) if paced > 0 else 0.0)
        print(f"calibrate {engine}: link {by_engine[engine]['link_pages_per_s']:.0f} pages/s, "
              f"walk {walk:.0f} pages/s, at pace {probe_pace} {paced:.0f} pages/s", flush=True)
    ref = by_engine.get("qemu") or by_engine["livemig"]
    walk = statistics.mean(v["walk_pages_per_s"] for v in by_engine.values())
    return Calibration(ref["link_pages_per_s"], walk, tsc_hz(), by_engine)


async def bench(args: argparse.Namespace) -> int:
    engines = ["livemig"]
    if args.engines != "livemig":
        if qemu_available():
            engines = ["qemu", "livemig"]
        else:
            print("bench: qemu-system-x86_64 not found (see README: Comparing with QEMU); "
                  "running livemig alone", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    results: list[Result] = []
    scenarios = args.scenario or DEFAULT_SCENARIOS
    cal: Calibration | None = None
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as workdir:
        if any(SCENARIOS[n].pace_pct is not None for n in scenarios):
            cal = await calibrate(engines, workdir, args.accel)
        for scenario in scenarios:
            sc = SCENARIOS[scenario]
            runs_on = [e for e in engines if e == "livemig" or not sc.livemig_only]
            paces = {e: cal.pace_for(sc.pace_pct, e) if cal and sc.pace_pct is not None else 0
                     for e in runs_on}
            images = {e: walk_image(os.path.join(workdir, f"walk-{scenario}-{e}.img"),
                                    sc.walk_end, tick=TICK_PAGES, pace=paces[e])
                      for e in runs_on}
            for rep in range(args.reps):
                for engine in runs_on:     # alternate engines run by run
                    t0 = time.monotonic()
                    image, pace = images[engine], paces[engine]
                    try:
                        r = await one_run(engine, scenario, rep, workdir, image, args.accel,
                                          args.mem_prealloc, pace=pace,
                                          time_limit=args.time_limit)
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        r = Result(engine, scenario, rep, "error", error=str(exc))
                    results.append(r)
                    guest = ("-" if r.guest_downtime_ms is None
                             else f"{r.guest_downtime_ms:.0f}ms")
                    print(f"{scenario} {engine} #{rep}: {r.status} total={r.total_ms}ms "
                          f"downtime={r.downtime_ms}ms guest={guest} "
                          f"{r.throughput_mb_s:.0f}MB/s walk={r.walk_pages_per_s:.0f}p/s "
                          f"({time.monotonic() - t0:.1f}s)"
                          + (f" error={r.error}" if r.error else ""), flush=True)
    rows = summarize(results, engines)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump({"engines": engines, "mem_prealloc": args.mem_prealloc,
                   "tick_pages": TICK_PAGES, "time_limit_s": args.time_limit,
                   "calibration": asdict(cal) if cal else None,
                   "results": [asdict(r) for r in results],
                   "summary": rows, "machine": {"cpus": os.cpu_count(),
                                                "uname": " ".join(os.uname())}}, f, indent=1)
    print_summary(rows, engines)
    png = os.path.join(args.out, f"bench-{stamp}.png")
    dpng = os.path.join(args.out, f"downtime-{stamp}.png")
    plots = [p for p, ok in ((png, plot(rows, engines, png)),
                             (dpng, plot_downtime(rows, engines, dpng))) if ok]
    print(f"results: {json_path}" + (f", plots: {', '.join(plots)}" if plots else ""))
    # Not converging within the time limit is a finding, not a failure of the bench.
    return 0 if all(r.status in ("completed", "not-converged") for r in results) else 1


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livemig bench", description=__doc__)
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help=f"repeatable; default: {', '.join(DEFAULT_SCENARIOS)}; the "
                        f"guest-visible downtime set: {', '.join(GUEST_SCENARIOS)}; the "
                        f"downtime contract's: {', '.join(CONTRACT_SCENARIOS)}; postcopy's: "
                        f"{', '.join(POSTCOPY_SCENARIOS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--engines", choices=("both", "livemig"), default="both")
    p.add_argument("--accel", choices=("auto", "kvm", "soft"), default="auto")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                   help="seconds a migration may take before it counts as not converged "
                        "(it is cancelled)")
    p.add_argument("--mem-prealloc", action="store_true",
                   help="start every VM of both engines with -mem-prealloc (guest RAM "
                        "faulted in at start: no first-touch cost inside the migration)")
    return asyncio.run(bench(p.parse_args(argv)))
