"""The throttle's duty cycle mechanics against a fake vCPU: it alternates pause
and resume, stops cleanly, and never resumes a guest that should not run."""

from __future__ import annotations

import threading
import time

import pytest

from livemig.machine.throttle import CpuThrottle


class FakeCpu:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.paused = False

    def pause(self) -> None:
        self.calls.append("pause")
        self.paused = True

    def resume(self) -> None:
        self.calls.append("resume")
        self.paused = False


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.timeout(20)
def test_throttle_alternates_and_stops_resumed():
    cpu, lock = FakeCpu(), threading.RLock()
    t = CpuThrottle(cpu, lock, lambda: True)
    t.set(50)
    assert t.percentage == 50
    wait_for(lambda: cpu.calls.count("resume") >= 3)
    t.set(0)
    assert t.percentage == 0 and not cpu.paused
    assert cpu.calls[0] == "pause"
    assert all(a != b for a, b in zip(cpu.calls, cpu.calls[1:], strict=False))   # alternates


@pytest.mark.timeout(20)
def test_a_stopped_guest_is_never_resumed():
    cpu, lock = FakeCpu(), threading.RLock()
    running = threading.Event()
    running.set()
    t = CpuThrottle(cpu, lock, running.is_set)
    t.set(90)
    wait_for(lambda: cpu.paused)
    with lock:                       # vm_stop: under the machine's lock
        running.clear()
        cpu.pause()
    t.set(0)
    assert cpu.paused and cpu.calls[-1] == "pause"


def test_percentage_is_clamped_to_qemus_range():
    t = CpuThrottle(FakeCpu(), threading.RLock(), lambda: False)
    t.set(150)
    assert t.percentage == 99
    t.set(0)
    assert t.percentage == 0
