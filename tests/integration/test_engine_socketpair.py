"""Source and destination engines in one process, back to back over a socketpair.

STYLE.md's "fake network link": no processes, no QMP; the two state
machines talk through real sockets, and we assert what the peer ends up with.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from livemig.machine.accel_device import AccelDeviceConfig
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.machine import Machine, MachineConfig
from livemig.machine.runstate import RunState
from livemig.machine.walk_check import check_walk_pattern
from livemig.migration.destination import IncomingState
from livemig.migration.source import MigrationState
from livemig.migration.status import MigrationStatus as S
from livemig.qapi.capabilities import Capabilities
from livemig.qapi.parameters import Parameters
from livemig.transport import Channel

WALK = GuestConfig(start=MIB, end=16 * MIB)


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[float, str, dict | None]] = []

    def __call__(self, name: str, data: dict | None) -> None:
        self.log.append((time.monotonic(), name, data))

    def names(self) -> list[str]:
        return [n if d is None or "status" not in d else f"{n}:{d['status']}"
                for _, n, d in self.log]


def make_pair(caps: dict[str, bool], devices=(), *, src_ram=64 * MIB, dst_ram=64 * MIB,
              downtime_limit: int = 300):
    def caps_obj():
        c = Capabilities()
        c.set_from_qmp([{"capability": k, "state": v} for k, v in caps.items()],
                       migration_running=False, incoming_started=False)
        return c
    params = Parameters()
    params.set_from_qmp({"max-bandwidth": 0, "downtime-limit": downtime_limit})
    src_ev, dst_ev = Events(), Events()
    src = Machine(MachineConfig(ram_size=src_ram, accel="soft", guest=WALK,
                                devices=list(devices)), on_event=src_ev)
    dst = Machine(MachineConfig(ram_size=dst_ram, accel="soft", guest=WALK,
                                devices=list(devices), incoming=True, start_paused=True),
                  on_event=dst_ev)
    out = MigrationState(src, caps_obj(), params, src_ev)
    inc = IncomingState(dst, caps_obj(), Parameters(), dst_ev)
    return src, dst, out, inc, src_ev, dst_ev


def wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def run_migration(src, out, inc):
    a, b = Channel.socketpair()
    src.vm_start()
    wait(lambda: src.cpu.phase == 2)   # the walk has zeroed its range and walks
    inc.start(None, channel=b, exit_on_error=False)
    out.migrate(a)
    wait(lambda: out.sm.is_done() and inc.sm.is_done())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("caps", [
    {},
    {"return-path": True},
    {"return-path": True, "switchover-ack": True},
    {"events": True, "return-path": True, "switchover-ack": True},
])
def test_migration_is_byte_exact(caps):
    dev = AccelDeviceConfig(id="acc0", size=4 * MIB, init_size=1 * MIB, prepare_ms=50)
    src, dst, out, inc, src_ev, dst_ev = make_pair(caps, [dev])
    try:
        run_migration(src, out, inc)
        assert out.status is S.COMPLETED, out.error_desc
        assert inc.status is S.COMPLETED, inc.error_desc
        assert src.runstate is RunState.POSTMIGRATE
        assert dst.runstate is RunState.PAUSED        # -S: loaded, not started
        assert np.array_equal(src.ram.bytes, dst.ram.bytes)
        assert src.devices["acc0"].digest() == dst.devices["acc0"].digest()
        assert check_walk_pattern(dst.ram.pages[256:4096, 0]) == []
        # the vCPU continues where it stopped
        assert (dst.cpu.page, dst.cpu.passes) == (src.cpu.page, src.cpu.passes)
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
def test_events_in_qemu_order():
    src, dst, out, inc, src_ev, dst_ev = make_pair({"events": True})
    try:
        run_migration(src, out, inc)
        names = [n for n in src_ev.names() if n != "MIGRATION_PASS"]
        assert names == ["RESUME", "MIGRATION:setup", "MIGRATION:active", "STOP",
                         "MIGRATION:device", "MIGRATION:completed"]
        assert "MIGRATION_PASS" in src_ev.names()
        assert dst_ev.names() == ["MIGRATION:setup", "MIGRATION:active",
                                  "MIGRATION:completed"]
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
def test_source_waits_for_the_ack_before_stopping():
    # A long preparation, so "not inside the downtime" holds even on a loaded machine.
    dev = AccelDeviceConfig(id="acc0", size=4 * MIB, init_size=1 * MIB, prepare_ms=1000)
    src, dst, out, inc, src_ev, dst_ev = make_pair(
        {"return-path": True, "switchover-ack": True}, [dev])
    try:
        t0 = time.monotonic()
        run_migration(src, out, inc)
        assert out.status is S.COMPLETED, out.error_desc
        stop_t = next(t for t, n, _ in src_ev.log if n == "STOP")
        assert out.times.ack is not None and out.times.ack <= stop_t
        assert stop_t - t0 >= 1.0                 # the preparation happened before switchover
        assert out.stats.downtime_ms < 1000             # ...and not inside the downtime
        assert out.query()["x-switchover-ack"]["acked"] is True
        assert inc.approvals.keys() == {"acc0/accel"}
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
def test_without_ack_the_preparation_lands_in_the_downtime():
    dev = AccelDeviceConfig(id="acc0", size=4 * MIB, init_size=1 * MIB, prepare_ms=300)
    # A limit above the reported preparation: the contract lets it switch over.
    src, dst, out, inc, *_ = make_pair({"return-path": True}, [dev], downtime_limit=1000)
    try:
        run_migration(src, out, inc)
        assert out.status is S.COMPLETED, out.error_desc
        assert out.stats.downtime_ms >= 300
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
def test_destination_failure_reason_reaches_the_source():
    src, dst, out, inc, *_ = make_pair({"return-path": True}, dst_ram=32 * MIB)
    try:
        run_migration(src, out, inc)
        assert out.status is S.FAILED
        assert "Size mismatch" in out.error_desc
        assert inc.status is S.FAILED and "Size mismatch" in inc.error_desc
        assert src.runstate is RunState.RUNNING          # the source guest lives on
        assert dst.runstate is RunState.INMIGRATE        # never ran a half-loaded guest
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
def test_cancel_keeps_the_source_running():
    src, dst, out, inc, *_ = make_pair({"return-path": True, "switchover-ack": True},
                                       [AccelDeviceConfig(id="a", size=4 * MIB,
                                                          init_size=MIB, prepare_ms=5000)])
    try:
        a, b = Channel.socketpair()
        src.vm_start()
        inc.start(None, channel=b, exit_on_error=False)
        out.migrate(a)
        wait(lambda: out.status is S.ACTIVE)
        out.cancel()
        wait(lambda: out.sm.is_done())
        assert out.status is S.CANCELLED
        assert src.is_running()
        wait(lambda: inc.sm.is_done())
        assert inc.status is S.FAILED
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_is_byte_exact(tmp_path, channels):
    from livemig.transport import UnixAddress
    src, dst, out, inc, *_ = make_pair({"multifd": True, "events": True})
    for side in (out, inc):
        side.params.set_from_qmp({"multifd-channels": channels})
    try:
        addr = UnixAddress(str(tmp_path / "mig.sock"))
        src.vm_start()
        wait(lambda: src.cpu.phase == 2)
        inc.start(addr, exit_on_error=False)
        out.migrate(addr)
        wait(lambda: out.sm.is_done() and inc.sm.is_done())
        assert out.status is S.COMPLETED, out.error_desc
        assert inc.status is S.COMPLETED, inc.error_desc
        info = out.query()
        assert info["ram"]["multifd-bytes"] > 0
        assert np.array_equal(src.ram.bytes, dst.ram.bytes)
        assert check_walk_pattern(dst.ram.pages[256:4096, 0]) == []
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("caps", [{}, {"return-path": True}], ids=["plain", "return-path"])
def test_cancel_while_blocked_in_a_write_reports_no_cause(caps):
    """migrate_cancel shuts the channels down under a send blocked on a peer
    that stopped reading: the failed send is the cancel itself, so the source
    ends 'cancelled' with no error-desc (seen in a bench run as a cancelled
    migration showing "Channel error: Input/output error")."""
    import os
    import select
    src, _dst, out, _inc, src_ev, _ = make_pair(caps)
    a, b = Channel.socketpair()
    probe = os.dup(a.fileno())      # the same socket, never closed by the engine
    try:
        # 16 MiB the walk never touches, not zero: far more than the socket buffers
        # hold, however few pages a slow soft vCPU has walked.
        src.ram.bytes[32 * MIB:48 * MIB] = 0x5A
        src.vm_start()
        wait(lambda: src.cpu.phase == 2)
        out.migrate(a)
        # Nobody reads b: once a is not writable the sender is blocked in a send.
        wait(lambda: out.sm.is_done() or not select.select([], [probe], [], 0)[1])
        assert not out.sm.is_done(), (out.sm.status, out.snapshot().error_desc)
        out.cancel()
        wait(out.sm.is_done)
        assert out.sm.status is S.CANCELLED
        assert out.snapshot().error_desc is None
        assert src.runstate is RunState.RUNNING
    finally:
        os.close(probe)
        b.close()
