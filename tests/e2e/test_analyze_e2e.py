"""``livemig analyze`` and QEMU's own analyzer on real streams: livemig's ``file:``
migrations, and one QEMU 10.0 writes here (skipped without qemu-system-x86_64)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ACCEL_FAST, ram_size, run_with, wait_completed, wait_walking

from livemig.cli.analyze import analyze_stream
from livemig.machine.kvm import bootsector_image

QEMU = shutil.which("qemu-system-x86_64")


def _analyze_cli(path: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "livemig", "analyze", "--json", path],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_livemig_file_stream_analyzes_and_page_counts_match_query_migrate(vms, tmp_path):
    path = str(tmp_path / "stream.mig")

    async def body():
        src = await vms.start("src", devices=[ACCEL_FAST])
        await wait_walking(src)
        await src.cmd("migrate", uri=f"file:{path}")          # a running guest
        info = await wait_completed(src)
        assert info["status"] == "completed", info
        return info
    info = run_with(vms, body)
    rep = _analyze_cli(path)
    assert rep["configuration"]["machine_type"].startswith("livemig")
    assert rep["ram"]["normal"] == info["ram"]["normal"]
    assert rep["ram"]["zero"] == info["ram"]["duplicate"]
    assert list(rep["ram"]["blocks"]) == ["pc.ram"]
    names = [s["name"] for s in rep["sections"]]
    assert names == ["ram", "acc0/accel", "cpu", "globalstate"]
    acc = rep["sections"][1]
    assert acc["records"]["start"] == 1 and acc["records"]["end"] == 1
    assert acc["data_bytes"] >= 1 << 20                       # the initial data at least
    assert [c["command"] for c in rep["commands"]] == ["SWITCHOVER_START"]
    assert [d["name"] for d in rep["vmdesc"]["devices"]] == ["acc0/accel", "cpu", "globalstate"]
    assert rep["sections"][3]["bytes"] == 104


async def _qemu_file_migration(tmp_path) -> tuple[str, dict]:
    from qemu.qmp import QMPClient
    img, sock, path = (str(tmp_path / n) for n in ("walk.img", "qmp.sock", "q.mig"))
    with open(img, "wb") as f:
        f.write(bootsector_image(1 << 20, 16 << 20))
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    proc = subprocess.Popen([QEMU, "-M", f"q35,accel={accel}", "-m", "64M", "-display", "none",
                             "-nodefaults", "-drive", f"file={img},format=raw",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = QMPClient("analyze-test")
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.05)
        await client.connect(sock)
        await asyncio.sleep(0.5)
        await client.execute("migrate", {"uri": f"file:{path}"})
        for _ in range(600):
            info = await client.execute("query-migrate")
            if info.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
    finally:
        try:
            await client.execute("quit")
        except Exception:  # noqa: BLE001 - QEMU may hang up before it answers
            pass
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return path, info


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_stream_analyzes(tmp_path):
    path, info = asyncio.run(_qemu_file_migration(tmp_path))
    rep = _analyze_cli(path)
    assert rep["configuration"]["machine_type"].startswith("pc-q35-")
    assert rep["ram"]["normal"] == info["ram"]["normal"]
    assert rep["ram"]["zero"] == info["ram"]["duplicate"]
    assert "pc.ram" in rep["ram"]["blocks"]
    names = {s["name"] for s in rep["sections"]}
    assert {"ram", "cpu", "apic", "globalstate"} <= names
    gs = next(s for s in rep["sections"] if s["name"] == "globalstate")
    assert gs["bytes"] == 104                           # the layout livemig now writes
    assert any(c["command"] == "SWITCHOVER_START" for c in rep["commands"])
    assert len(rep["vmdesc"]["devices"]) == len(rep["sections"]) - 1      # all but ram
    with open(path, "rb") as f:
        assert analyze_stream(f.read())["ram"] == rep["ram"]


ANALYZER = os.environ.get("LIVEMIG_QEMU_ANALYZER")


@pytest.mark.skipif(not ANALYZER, reason="LIVEMIG_QEMU_ANALYZER does not point to a copy of "
                                         "QEMU's scripts/analyze-migration.py")
def test_qemu_analyzer_dumps_a_livemig_stream_and_extracts_its_ram(vms, tmp_path):
    path = str(tmp_path / "stream.mig")

    async def body():
        src = await vms.start("src")
        await wait_walking(src)
        await src.cmd("stop")                              # so pmemsave and the stream agree
        await src.cmd("migrate", uri=f"file:{path}")
        assert (await wait_completed(src))["status"] == "completed"
        return await src.pmem(0, ram_size(src))
    mem = run_with(vms, body)
    dump = subprocess.run([sys.executable, ANALYZER, "-f", path], capture_output=True,
                          text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    state = json.loads(dump.stdout)
    assert list(state) == ["ram (0)", "cpu (1)", "globalstate (2)"]
    assert bytes.fromhex(state["globalstate (2)"]["runstate"].replace(" ", "")) \
        .rstrip(b"\0") == b"paused"
    out = tmp_path / "x"
    out.mkdir()
    ext = subprocess.run([sys.executable, ANALYZER, "-f", path, "-x"], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert ext.returncode == 0, ext.stderr[-2000:]
    assert (out / "pc.ram").read_bytes() == mem
