"""The walk's ticks and pace on a real vCPU: livemig's KVM accelerator in this
process (serial to a file), and QEMU booting the same patched image from a raw
drive with ``-serial file:``. Every wait is on serial output with a deadline."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from kvm_harness import KVM_OK, KVM_WHY

from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.kvm import bootsector_image
from livemig.machine.tsc import tsc_hz

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable here: {KVM_WHY}")]
QEMU = "/usr/bin/qemu-system-x86_64"
START, END = 1 * MIB, 5 * MIB                     # 1024 pages a pass
PAGES = (END - START) // 4096
TICK = 256                                        # 4 ticks a pass, 256 between two 'B's


def expected_prefix(out: bytes) -> None:
    """'A', then 256 '.' before every 'B' (the tick after a pass's last page comes
    first): what walk.S writes with tick_pages=256 over 1024 pages."""
    assert out.startswith(b"A"), out[:20]
    body = out[1:]
    cycle = b"." * (64 * PAGES // TICK) + b"B"
    full = len(body) // len(cycle)
    assert body[:full * len(cycle)] == cycle * full, body[:300]
    assert set(body[full * len(cycle):]) <= {ord(".")}


def wait_serial(read, cond, timeout: float, what: str) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        out = read()
        if cond(out):
            return out
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}: {out[:40]!r}"
                        f" ({len(out)} bytes)")
        time.sleep(0.005)


def tick_rate(read, ticks: int, timeout: float) -> float:
    """Pages/s from the ticks: after a first tick, the time ``ticks`` more take."""
    wait_serial(read, lambda o: o.count(b".") >= 1, timeout, "a first tick")
    c0, t0 = read().count(b"."), time.monotonic()
    out = wait_serial(read, lambda o: o.count(b".") >= c0 + ticks, timeout, f"{ticks} ticks")
    return (out.count(b".") - c0) * TICK / (time.monotonic() - t0)


@pytest.mark.timeout(60)
def test_kvm_walk_ticks_on_com1(make_vm):
    vm = make_vm(GuestConfig(start=START, end=END, rate_pages_per_s=0, tick_pages=TICK))
    vm.accel.reset()
    vm.accel.resume()
    out = wait_serial(vm.output, lambda o: o.count(b"B") >= 2, 30, "two 'B's")
    vm.accel.pause()
    expected_prefix(vm.output())
    assert out.count(b".") >= 2 * 64 * PAGES // TICK


@pytest.mark.timeout(90)
def test_kvm_pace_slows_the_walk(make_vm):
    pace = 100_000                                  # at most tsc_hz / pace pages/s
    fast_vm = make_vm(GuestConfig(start=START, end=END, rate_pages_per_s=0, tick_pages=TICK))
    fast_vm.accel.reset()
    fast_vm.accel.resume()
    fast = tick_rate(fast_vm.output, 200, 30)
    fast_vm.accel.pause()
    slow_vm = make_vm(GuestConfig(start=START, end=END, rate_pages_per_s=0, tick_pages=TICK,
                                  pace_cycles=pace))
    slow_vm.accel.reset()
    slow_vm.accel.resume()
    slow = tick_rate(slow_vm.output, 20, 30)
    slow_vm.accel.pause()
    ceiling = tsc_hz() / pace                       # the busy-wait alone
    assert slow < fast / 2, (fast, slow)
    assert ceiling / 4 < slow < ceiling * 1.2, (slow, ceiling)
    expected_prefix(slow_vm.output())


@pytest.mark.skipif(not Path(QEMU).exists(), reason=f"QEMU not installed ({QEMU})")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pace", [0, 100_000])
def test_qemu_boots_the_ticking_image(tmp_path, pace):
    """SeaBIOS boots the patched image from a raw drive (padded to 1 MiB, see
    test_bootsector.test_boots_in_qemu); the ticks appear on -serial file:."""
    disk = tmp_path / "walk.img"
    disk.write_bytes(bootsector_image(START, END, tick_pages=TICK, pace=pace)
                     .ljust(1 * MIB, b"\0"))
    serial = tmp_path / "serial.txt"
    proc = subprocess.Popen(
        [QEMU, "-M", "q35,accel=kvm", "-m", "150M", "-display", "none", "-nodefaults",
         "-serial", f"file:{serial}", "-drive", f"file={disk},format=raw"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def read() -> bytes:
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited ({proc.returncode}): "
                        f"{proc.stderr.read().decode(errors='replace')}")
        return serial.read_bytes() if serial.exists() else b""
    try:
        rate = tick_rate(read, 20, 60)
        out = read()
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    expected_prefix(out)
    if pace:
        assert tsc_hz() / pace / 4 < rate < tsc_hz() / pace * 1.2, rate
