"""Soak, short variants for the suite.

* ``bench/soak.py --count 4``: the guest migrated back and forth four times
  with the integrity check each time (the bench runs 50).
* repeated faults on one source: destinations killed mid-stream and
  migrations cancelled, round after round; the source must not leak
  threads or file descriptors, and must still migrate at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from fault_helpers import (
    RP,
    accel_digest,
    assert_source_survived,
    fleet_for,
    run_with,
    start_incoming,
    wait_status,
    wait_terminal,
    wait_transferred,
    walk_problems,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOAK = os.path.join(ROOT, "bench", "soak.py")


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_for(tmp_path)


@pytest.mark.timeout(120)
def test_soak_script_four_migrations(tmp_path):
    proc = subprocess.run([sys.executable, SOAK, "--count", "4", "--accel", "soft",
                           "--workdir", str(tmp_path), "--hop-timeout", "30", "--timeout", "100"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hops = [line for line in proc.stdout.splitlines() if line.startswith("hop=")]
    assert len(hops) == 4 and all(line.endswith(" ok") for line in hops), proc.stdout
    assert all("acked=True" in line for line in hops)
    assert re.search(r"^soak ok: 4 migrations in [\d.]+ s", proc.stdout, re.M), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(30)
def test_soak_script_rejects_a_bad_count():
    proc = subprocess.run([sys.executable, SOAK, "--count", "0"], capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2
    assert "--count must be at least 1" in proc.stderr


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.timeout(120)
def test_repeated_faults_leak_nothing(fleet):
    """Three rounds of (destination SIGKILLed mid-stream, cancel mid-stream) on one
    source; then a migration that completes byte exact."""
    async def body():
        src = await fleet.source(caps=RP)
        digest = await accel_digest(src)
        pid = src.proc.pid
        base_fds, base_threads = _fds(pid), _threads(pid)
        for rnd in range(3):
            for fault in ("kill", "cancel"):
                dst = await fleet.destination(f"dst-{rnd}-{fault}", caps=RP)
                await src.set_params(max_bandwidth=2 << 20)
                await src.cmd("migrate", uri=await start_incoming(dst))
                await wait_transferred(src, 1 << 20)
                if fault == "kill":
                    dst.kill()
                    expect = "failed"
                else:
                    await src.cmd("migrate_cancel")
                    expect = "cancelled"
                info = await wait_terminal(src)
                assert info["status"] == expect, info
                await wait_status(src, expect)
                assert await walk_problems(src) == []
                await dst.close()
                # threads of the finished migration are gone; no socket is left open
                assert _fds(pid) <= base_fds + 2, (rnd, fault, _fds(pid), base_fds)
                assert _threads(pid) <= base_threads + 1, (rnd, fault, _threads(pid))
        await assert_source_survived(fleet, src, status="cancelled", cause=None, digest=digest,
                                     caps=RP)
    run_with(fleet, body)
