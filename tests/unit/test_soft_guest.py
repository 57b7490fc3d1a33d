"""The walk guest on the software accelerator: pattern, dirty log, prompt stop."""

import time

import numpy as np
import pytest

from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.ram import RamBlock
from livemig.machine.serial import Serial
from livemig.machine.soft import SoftAccelerator
from livemig.machine.walk_check import check_walk_pattern


def make(rate=0, end=8 * MIB, path=None):
    ram = RamBlock("pc.ram", 16 * MIB)
    log = DirtyLog(ram.npages)
    cpu = SoftAccelerator(ram, log, Serial(path), GuestConfig(start=MIB, end=end,
                                                              rate_pages_per_s=rate))
    cpu.reset()
    return ram, log, cpu


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


FUTEX = 202      # x86_64


def thread_parked(tid: int) -> bool:
    """The thread sleeps (state S) inside futex(2): a lock or condition wait."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/self/task/{tid}/syscall") as f:
            nr = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return state == "S" and nr == str(FUTEX)


@pytest.mark.timeout(30)
def test_walk_writes_a_then_b_and_keeps_pattern(tmp_path):
    ram, log, cpu = make(path=str(tmp_path / "serial"))
    cpu.resume()
    wait_until(lambda: cpu.passes >= 130)
    cpu.pause()
    out = (tmp_path / "serial").read_bytes()
    assert out.startswith(b"A") and out.count(b"B") >= 2
    first = ram.pages[MIB // 4096: 8 * MIB // 4096, 0]
    assert check_walk_pattern(first) == []
    cpu.close()


@pytest.mark.timeout(30)
def test_pause_is_prompt_and_memory_is_quiet():
    ram, log, cpu = make(rate=280_000)
    cpu.resume()
    wait_until(lambda: cpu.phase == 2)
    t0 = time.monotonic()
    cpu.pause()
    assert time.monotonic() - t0 < 0.01
    snap = ram.pages[:, 0].copy()
    # Not a window of time: wait until the vCPU thread is parked (asleep in a
    # futex: its condition wait, which only resume() ends), then compare. Any
    # write after pause() returned would have come before the thread parked.
    wait_until(lambda: thread_parked(cpu._thread.native_id))
    assert np.array_equal(snap, ram.pages[:, 0])
    cpu.close()


@pytest.mark.timeout(30)
def test_dirty_log_marks_only_the_walk_range():
    ram, log, cpu = make()
    cpu.log_dirty_start()
    cpu.resume()
    wait_until(lambda: cpu.passes >= 2)
    cpu.pause()
    bitmap = np.zeros(ram.npages, dtype=bool)
    log.sync(bitmap)
    assert bitmap[256:2048].all() and not bitmap[:256].any() and not bitmap[2048:].any()
    cpu.close()


def test_cpu_state_round_trip_and_rejects_garbage():
    ram, log, cpu = make()
    cpu.page, cpu.phase, cpu.passes = 300, 2, 7
    blob = cpu.save_cpu_state()
    _, _, other = make()
    other.load_cpu_state(blob)
    assert (other.page, other.phase, other.passes) == (300, 2, 7)
    with pytest.raises(ValueError):
        other.load_cpu_state(b"garbage")
