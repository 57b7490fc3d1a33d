"""Thread names reach the kernel (what top -H, perf and /proc show)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from livemig.threadname import name_native_thread

pytestmark = [pytest.mark.timeout(10),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")]


def _comm_of_thread(body_name: str, explicit: str | None = None) -> str:
    seen: dict[str, str] = {}

    def body() -> None:
        name_native_thread(explicit)
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()
    t = threading.Thread(target=body, name=body_name)
    t.start()
    t.join(5)
    return seen["comm"]


def test_the_python_name_becomes_the_kernel_name() -> None:
    assert _comm_of_thread("live_migration") == "live_migration"


def test_long_names_are_cut_to_15_bytes_and_explicit_names_win() -> None:
    assert _comm_of_thread("a-very-long-thread-name") == "a-very-long-thr"
    assert _comm_of_thread("ignored", "vcpu0") == "vcpu0"
    assert os.getpid()      # the main thread is left alone
