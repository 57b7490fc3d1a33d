"""``livemig migrate``: drive one migration between two running VMs over QMP.

Works with livemig and QEMU alike (it only speaks QMP): sets the same
capabilities on both sides, starts the destination listening when asked,
migrates, shows progress, and prints the figures QEMU reports.

    livemig migrate --src /tmp/src.qmp --dst /tmp/dst.qmp \\
        --caps return-path,switchover-ack --uri tcp:127.0.0.1:4444
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from qemu.qmp import QMPClient, QMPError

TERMINAL = ("completed", "failed", "cancelled")


class UnexpectedReply(QMPError):
    """A command answered with something other than the JSON object it documents."""


async def query(qmp: QMPClient, cmd: str) -> dict[str, Any]:
    """Run a QMP command whose reply is a JSON object (``query-migrate``)."""
    reply = await qmp.execute(cmd)
    if not isinstance(reply, dict):
        raise UnexpectedReply(f"{cmd} returned {reply!r}, not a JSON object")
    return reply


async def migrate(args: argparse.Namespace) -> int:
    src, dst = QMPClient("src"), QMPClient("dst")
    await src.connect(args.src)
    if args.dst:
        await dst.connect(args.dst)
    try:
        caps = [c for c in args.caps.split(",") if c]
        cap_list = [{"capability": c, "state": True} for c in caps]
        for qmp in (src, dst) if args.dst else (src,):
            if cap_list:
                await qmp.execute("migrate-set-capabilities", {"capabilities": cap_list})
        params: dict[str, Any] = {"downtime-limit": args.downtime_limit}
        if args.max_bandwidth is not None:
            params["max-bandwidth"] = args.max_bandwidth
        await src.execute("migrate-set-parameters", params)
        uri = args.uri
        if args.dst and args.incoming:
            await dst.execute("migrate-incoming", {"uri": args.incoming})
            if uri is None:
                addr = (await query(dst, "query-migrate"))["socket-address"][0]
                uri = (f"tcp:{addr['host']}:{addr['port']}" if addr["type"] == "inet"
                       else f"unix:{addr['path']}")
        if uri is None:
            print("livemig migrate: need --uri (or --dst with --incoming)", file=sys.stderr)
            return 2
        await src.execute("migrate", {"uri": uri})
        info = await watch(src, args.quiet)
        print(json.dumps(info, indent=2))
        return 0 if info.get("status") == "completed" else 1
    except QMPError as exc:
        print(f"livemig migrate: {exc}", file=sys.stderr)
        return 1
    finally:
        await src.disconnect()
        if args.dst:
            await dst.disconnect()


async def watch(src: QMPClient, quiet: bool) -> dict[str, Any]:
    """Poll query-migrate until a terminal status, with a rich progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn

    deadline = time.monotonic() + 3600
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[detail]}"), disable=quiet) as progress:
        task = progress.add_task("migrating", total=1.0, detail="")
        while True:
            info = await query(src, "query-migrate")
            status = info.get("status", "none")
            ram = info.get("ram", {})
            if ram:
                total = max(1, ram["total"])
                progress.update(task, completed=1 - ram["remaining"] / total,
                                description=status,
                                detail=f"{ram['transferred'] >> 20} MiB sent, "
                                       f"{ram['mbps']:.0f} Mbit/s, "
                                       f"pass {ram['dirty-sync-count']}")
            if status in TERMINAL or time.monotonic() > deadline:
                return info
            await asyncio.sleep(0.05)


def migrate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livemig migrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="source QMP socket path")
    p.add_argument("--dst", help="destination QMP socket path (sets its caps too)")
    p.add_argument("--uri", help="migration URI (default: from the destination)")
    p.add_argument("--incoming", help="URI for migrate-incoming on the destination")
    p.add_argument("--caps", default="", help="comma-separated capabilities to enable")
    p.add_argument("--downtime-limit", type=int, default=300, help="ms")
    p.add_argument("--max-bandwidth", type=int, help="bytes/s (0 = unlimited)")
    p.add_argument("--quiet", action="store_true")
    return asyncio.run(migrate(p.parse_args(argv)))
