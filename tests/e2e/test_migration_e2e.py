"""Migration end to end: a source and a destination ``livemig run`` process,
driven over QMP like QEMU 10.0 (reference sections 1, 3, 4, 6 and 9).

The destination is started with ``-incoming defer`` and ``-S`` unless a test
says otherwise, so after the migration its RAM must equal the stopped
source's byte for byte (QEMU's check_guests_ram is the walk-pattern check).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
from conftest import (
    ACCEL,
    ACCEL_FAST,
    PACED_WALK,
    PACED_WALK_END,
    PREPARE_MS,
    assert_same_guest,
    event_time,
    event_trace,
    find_event,
    pass_numbers,
    qmp_error,
    run_with,
    runstate,
    socket_fds,
    start_incoming,
    start_pair,
    vm_walk_problems,
    wait_blocked_in_send,
    wait_completed,
    wait_event,
    wait_guest_runs,
    wait_runstate,
    wait_until,
    wait_walking,
)

RP = {"return-path": True}
ACK = {"return-path": True, "switchover-ack": True}
EVENTS = {**ACK, "events": True}
PAUSE = {**EVENTS, "pause-before-switchover": True}
SLOW = 32 << 20      # bytes/s: a source that cannot outrun the destination
CAP_SETS = {"none": {}, "return-path": RP, "switchover-ack": ACK, "events": EVENTS,
            "pause-before-switchover": PAUSE}

SRC_TRACE = ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:device",
             "MIGRATION:completed"]
SRC_TRACE_PAUSED = ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:pre-switchover",
                    "MIGRATION:device", "MIGRATION:completed"]


def free_tcp_port() -> int:
    """A port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the capability matrix --------------------------------------------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
def test_migration_completes_byte_exact(vms, caps):
    async def body():
        src, dst = await start_pair(vms, src_caps=caps)
        uri = await start_incoming(dst)
        await src.cmd("migrate", uri=uri)
        if caps.get("pause-before-switchover"):
            await wait_event(src, "MIGRATION", "pre-switchover")
            assert (await src.cmd("query-migrate"))["status"] == "pre-switchover"
            assert await runstate(src) == "finish-migrate"
            err = await qmp_error(src, "migrate-continue", state="active")
            assert str(err) == "Migration not in expected state: pre-switchover"
            await src.cmd("migrate-continue", state="pre-switchover")
        info = await wait_completed(src)
        assert info["status"] == "completed", info
        assert (await wait_completed(dst))["status"] == "completed"
        assert await runstate(dst) == "paused"            # -S: loaded, not started
        await assert_same_guest(src, dst)

        if caps.get("events"):
            expected = SRC_TRACE_PAUSED if caps.get("pause-before-switchover") else SRC_TRACE
            assert event_trace(src) == expected
            passes = pass_numbers(src)
            assert passes == list(range(1, len(passes) + 1))
            assert passes[-1] == info["ram"]["dirty-sync-count"] >= 2
            first_pass = src.events.index(find_event(src, "MIGRATION_PASS"))
            assert first_pass < src.events.index(find_event(src, "MIGRATION", "active"))
            assert event_trace(dst) == ["MIGRATION:setup", "MIGRATION:active",
                                        "MIGRATION:completed"]
        else:
            assert event_trace(src) == ["STOP"]
            assert event_trace(dst) == []
        if caps.get("switchover-ack"):
            ack = info["x-switchover-ack"]
            assert ack["acked"] is True and ack["ack-time"] <= info["total-time"]

        # Let the destination run: the guest goes on from where it stopped.
        await dst.cmd("cont")
        await wait_event(dst, "RESUME")
        await wait_guest_runs(dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("caps,paused", [({"events": True}, False), (EVENTS, False),
                                         (EVENTS, True)],
                         ids=["events", "switchover-ack", "S-then-cont-while-inmigrate"])
def test_destination_runs_the_guest(vms, caps, paused):
    """Without -S (or with -S and a ``cont`` while inmigrate, which only sets
    autostart) the destination starts the guest once loaded."""
    async def body():
        src, dst = await start_pair(vms, src_caps=caps, dst_paused=paused)
        if paused:
            await dst.cmd("cont")
            assert await runstate(dst) == "inmigrate"
        await src.cmd("migrate", uri=await start_incoming(dst))
        assert (await wait_completed(src))["status"] == "completed"
        assert (await wait_completed(dst))["status"] == "completed"
        assert event_trace(dst) == ["MIGRATION:setup", "MIGRATION:active", "RESUME",
                                    "MIGRATION:completed"]
        assert await dst.cmd("query-status") == {"running": True, "status": "running"}
        await wait_runstate(src, "postmigrate")     # entered just after completed
        assert await runstate(src) == "postmigrate"
        await wait_guest_runs(dst)
        await dst.cmd("stop")
        assert await vm_walk_problems(dst) == []
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_non_live_migration_keeps_the_guest_paused(vms):
    """QEMU's non-live precopy: the source is stopped first; its run state is
    carried over, so the destination (without -S) ends paused, no RESUME."""
    async def body():
        # Stopped before the migration: it completes in one pass, paced or not.
        src, dst = await start_pair(vms, src_caps={**RP, "events": True}, dst_paused=False,
                                    paced=False)
        await src.cmd("stop")
        await src.cmd("migrate", uri=await start_incoming(dst))
        assert (await wait_completed(src))["status"] == "completed"
        assert (await wait_completed(dst))["status"] == "completed"
        assert event_trace(src) == ["STOP", "MIGRATION:setup", "MIGRATION:active",
                                    "MIGRATION:device", "MIGRATION:completed"]
        assert event_trace(dst) == ["MIGRATION:setup", "MIGRATION:active",
                                    "MIGRATION:completed"]
        assert await runstate(dst) == "paused"
        await assert_same_guest(src, dst)
        await dst.cmd("cont")
        await wait_guest_runs(dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_non_live_migration_counts_ram_as_downtime_bytes(vms):
    async def body():
        src, dst = await start_pair(vms, devices=(), paced=False)   # 15 MiB walked, stopped
        await src.cmd("stop")
        await src.cmd("migrate", uri=await start_incoming(dst))
        info = await wait_completed(src)
        assert info["status"] == "completed"
        ram = info["ram"]
        assert ram["normal-bytes"] >= 15 << 20
        assert (ram["precopy-bytes"], ram["downtime-bytes"]) == (0, ram["normal-bytes"])
    run_with(vms, body)


# -- transports -------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_unix_socket_migration_with_switchover_ack(vms, tmp_path):
    async def body():
        src, dst = await start_pair(vms, src_caps=ACK)
        uri = await start_incoming(dst, f"unix:{tmp_path}/mig.sock")
        info = await dst.cmd("query-migrate")
        assert info["socket-address"] == [{"type": "unix", "path": f"{tmp_path}/mig.sock"}]
        await src.cmd("migrate", uri=uri)
        info = await wait_completed(src)
        assert info["status"] == "completed" and info["x-switchover-ack"]["acked"]
        assert (await wait_completed(dst))["status"] == "completed"
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_exec_migration_through_gzip(vms, tmp_path):
    """QEMU's documented exec: example: ``exec:gzip -c > FILE`` on the source,
    ``exec:gzip -dc FILE`` on the destination."""
    async def body():
        path = tmp_path / "vm.mig.gz"
        # gzip under load can be slower than a free-running walk dirties its
        # 15 MiB: completion would depend on winning that race. The guest is
        # paced (conftest.PACED_WALK, far below gzip's throughput), so the
        # migration converges whatever the load; the guest still runs during it.
        src = await vms.start("src", devices=[ACCEL_FAST], walk_end=PACED_WALK_END,
                              walk_rate=PACED_WALK)
        await src.set_params(max_bandwidth=0)
        await wait_walking(src)
        await src.cmd("migrate", uri=f"exec:gzip -c > {path}")
        assert (await wait_completed(src))["status"] == "completed"

        dst = await vms.start("dst", devices=[ACCEL_FAST], incoming="defer", paused=True)
        await start_incoming(dst, f"exec:gzip -dc {path}")
        dinfo = await wait_completed(dst)
        assert dinfo["status"] == "completed", dinfo.get("error-desc")
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_file_migration_then_incoming_from_the_file(vms, tmp_path):
    async def body():
        path = tmp_path / "vm.mig"
        # Paced (so it converges whatever the disk does), over the whole 15 MiB
        # walk (the file must hold more than 16 MiB of data).
        src = await vms.start("src", devices=[ACCEL_FAST], walk_rate=PACED_WALK)
        await src.set_params(max_bandwidth=0)
        await wait_walking(src)
        await src.cmd("migrate", uri=f"file:{path}")
        assert (await wait_completed(src))["status"] == "completed"
        await wait_runstate(src, "postmigrate")     # entered just after completed
        assert await runstate(src) == "postmigrate"
        assert path.stat().st_size > 16 << 20

        dst = await vms.start("dst", devices=[ACCEL_FAST], incoming=f"file:{path}",
                              paused=True)
        assert (await wait_completed(dst))["status"] == "completed"
        assert await runstate(dst) == "paused"
        await assert_same_guest(src, dst)
        await dst.cmd("cont")
        await wait_guest_runs(dst)
    run_with(vms, body)


# -- switchover-ack and the destination's preparation -----------------------------------------

@pytest.mark.timeout(40)
def test_source_switches_over_only_after_the_ack(vms):
    async def body():
        src, dst = await start_pair(vms, src_caps=EVENTS, devices=(ACCEL,))
        uri = await start_incoming(dst)
        t_migrate = time.time()
        await src.cmd("migrate", uri=uri)
        info = await wait_completed(src)
        assert info["status"] == "completed", info
        stop = await wait_event(src, "STOP")
        device = find_event(src, "MIGRATION", "device")
        # The guest kept running while the destination prepared the device.
        assert event_time(stop) - t_migrate >= PREPARE_MS / 1000
        assert event_time(device) >= event_time(stop)
        ack = info["x-switchover-ack"]
        assert ack["acked"] is True and "waiting" not in ack
        assert PREPARE_MS <= ack["ack-time"] <= info["total-time"]
        # STOP (downtime start) came after the ACK: total - downtime = stop time.
        assert info["total-time"] - info["downtime"] >= ack["ack-time"] - 1
        # ... so the preparation is not in the downtime.
        assert info["downtime"] < PREPARE_MS
        # While waiting for the ACK the source did not spin.
        assert info["ram"]["dirty-sync-count"] < 2000
        dinfo = await wait_completed(dst)
        assert dinfo["x-switchover-ack"]["pending"] == 0
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_without_switchover_ack_the_preparation_lands_in_the_downtime(vms):
    async def body():
        src, dst = await start_pair(vms, src_caps=RP, devices=(ACCEL,))
        # The destination reports the preparation (PREPARE_MS) over the return path:
        # at the default 300 ms limit the source would not switch over into it.
        await src.set_params(downtime_limit=PREPARE_MS * 3)
        await src.cmd("migrate", uri=await start_incoming(dst))
        info = await wait_completed(src)
        assert info["status"] == "completed", info
        assert "x-switchover-ack" not in info
        # With a return path the source waits for the destination's SHUT.
        assert info["downtime"] >= PREPARE_MS
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_without_ack_users_the_source_does_not_wait_for_the_destination(vms):
    """livemig's rule (issue 3; a deliberate difference from QEMU 10.0, reference
    1.4): the source may switch over when no device uses switchover-ack, even if
    the destination lacks the capability and never ACKs. QEMU would wait (busy)
    until the guest stops. With a device that needs the ACK, see the next test."""
    async def body():
        src, dst = await start_pair(vms, src_caps={**ACK, "events": True},
                                    dst_caps={**RP, "events": True}, devices=(),
                                    dst_paused=False)
        await src.cmd("migrate", uri=await start_incoming(dst))
        info = await wait_completed(src)
        assert info["status"] == "completed", info
        assert info["x-switchover-ack"] == {"users": 0, "acked": False, "waiting": False}
        assert (await wait_completed(dst))["status"] == "completed"
        assert await runstate(dst) == "running"
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_ack_device_with_destination_lacking_the_capability_fails_cleanly(vms):
    """With a device that needs the ACK, a destination without switchover-ack
    refuses INIT_DATA_SENT (as VFIO does): both sides fail, the source runs on."""
    async def body():
        src, dst = await start_pair(vms, src_caps=ACK, dst_caps=RP)
        await src.set_params(max_bandwidth=SLOW)     # see test_destination_failure_...
        await src.cmd("migrate", uri=await start_incoming(dst))
        info = await wait_completed(src)
        assert info["status"] == "failed"
        assert "Received INIT_DATA_SENT but switchover ack is not used" in info["error-desc"]
        dinfo = await wait_completed(dst)
        assert dinfo["status"] == "failed"
        assert "Received INIT_DATA_SENT" in dinfo["error-desc"]
        assert await runstate(src) == "running"
        assert await runstate(dst) == "inmigrate"
    run_with(vms, body)


# -- cancel and failures ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_cancel_during_active_then_migrate_again(vms):
    async def body():
        src, dst = await start_pair(vms, src_caps={**RP, "events": True})
        await src.set_params(max_bandwidth=1 << 20)       # 1 MiB/s: stays active
        await src.cmd("migrate", uri=await start_incoming(dst))
        await wait_event(src, "MIGRATION", "active")
        await src.cmd("migrate_cancel")
        info = await wait_completed(src)
        assert info["status"] == "cancelled"
        assert event_trace(src) == ["MIGRATION:setup", "MIGRATION:active",
                                    "MIGRATION:cancelling", "MIGRATION:cancelled"]
        assert await src.cmd("query-status") == {"running": True, "status": "running"}
        await wait_guest_runs(src)
        assert (await wait_completed(dst))["status"] == "failed"
        assert await runstate(dst) == "inmigrate"

        await src.cmd("stop")
        assert await vm_walk_problems(src) == []
        await src.cmd("cont")

        dst2 = await vms.start("dst2", devices=[ACCEL_FAST], incoming="defer", paused=True)
        await dst2.set_caps(**RP)
        await src.set_params(max_bandwidth=0)
        await src.cmd("migrate", uri=await start_incoming(dst2))
        assert (await wait_completed(src))["status"] == "completed"
        assert (await wait_completed(dst2))["status"] == "completed"
        await assert_same_guest(src, dst2)
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_destination_failure_is_reported_to_the_source(vms):
    async def body():
        # Different -m: the destination refuses the RAM block list.
        src, dst = await start_pair(vms, src_caps={**RP, "events": True}, dst_ram="128M")
        # Rate-limited: the source is never blocked in a write when the destination
        # fails, so the destination's reason (return path) reliably wins over a
        # write error. The unthrottled case is test_..._while_the_source_is_blocked.
        await src.set_params(max_bandwidth=SLOW)
        await src.cmd("migrate", uri=await start_incoming(dst))
        dinfo = await wait_completed(dst)
        assert dinfo["status"] == "failed"
        assert dinfo["error-desc"].startswith("load of migration failed: ")
        reason = dinfo["error-desc"].removeprefix("load of migration failed: ")
        assert "Size mismatch" in reason
        info = await wait_completed(src)
        assert info["status"] == "failed"
        assert reason in info["error-desc"]
        # The source guest runs on; the destination never ran its guest.
        assert await runstate(src) == "running"
        await wait_guest_runs(src)
        assert await runstate(dst) == "inmigrate"
        assert find_event(dst, "RESUME") is None
        assert dst.serial_bytes() == b""
        assert event_trace(dst) == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"]
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_destination_failure_while_the_source_is_blocked(vms):
    """The destination is held (SIGSTOP) until the source has filled the socket
    and blocks in a write; then it fails. The source must fail too, not wait
    forever on a full TCP window (it did while the destination leaked its
    return-path descriptor), and the guest runs on."""
    async def body():
        # The free-running 15 MiB walk: more data than the socket buffers hold.
        src, dst = await start_pair(vms, src_caps=RP, dst_ram="128M", devices=(), paced=False)
        uri = await start_incoming(dst)
        os.kill(dst.proc.pid, signal.SIGSTOP)
        try:
            await src.cmd("migrate", uri=uri)

            async def blocked() -> bool:          # several MiB out, then no progress
                ram = (await src.cmd("query-migrate")).get("ram", {})
                return ram.get("transferred", 0) > 4 << 20
            await wait_until(blocked, 10, "the source to fill the socket")
            await wait_blocked_in_send(src, 10)   # ... and now it waits in a write
        finally:
            os.kill(dst.proc.pid, signal.SIGCONT)
        assert (await wait_completed(dst))["status"] == "failed"
        info = await wait_completed(src, timeout=10)
        assert info["status"] == "failed"
        assert await runstate(src) == "running"
        await wait_guest_runs(src)
    run_with(vms, body)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_destination_releases_the_migration_connection(vms, outcome):
    """Once the load is over (either way) the destination holds no socket of the
    migration connection any more, as QEMU, whose close then resets the peer."""
    async def body():
        src, dst = await start_pair(vms, src_caps=RP, devices=(),
                                    dst_ram="64M" if outcome == "completed" else "128M")
        await src.set_params(max_bandwidth=0 if outcome == "completed" else SLOW)
        before = socket_fds(dst)
        await src.cmd("migrate", uri=await start_incoming(dst))
        assert (await wait_completed(src))["status"] == outcome
        assert (await wait_completed(dst))["status"] == outcome

        async def released() -> bool:
            return socket_fds(dst) <= before
        await wait_until(released, 5, "the destination to close the migration socket")
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_destination_exit_on_error_ends_the_process(vms):
    """``exit-on-error`` defaults to true: a failed load ends the destination
    process with status 1 after printing the error."""
    async def body():
        src, dst = await start_pair(vms, src_caps=RP, dst_ram="128M")
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
        await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        assert (await wait_completed(src))["status"] == "failed"
        assert await asyncio.to_thread(dst.proc.wait, 10) == 1
        assert "livemig: load of migration failed: Size mismatch" in dst.stderr_text()
        assert await runstate(src) == "running"
    run_with(vms, body)


@pytest.mark.timeout(40)
def test_destination_exit_on_error_prints_one_line(vms):
    async def body():
        src, dst = await start_pair(vms, src_caps=RP, dst_ram="128M", devices=())
        await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
        await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        assert await asyncio.to_thread(dst.proc.wait, 20) == 1
        lines = dst.stderr_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("livemig: load of migration failed: Size mismatch")
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_migrate_to_a_closed_port_fails(vms):
    async def body():
        src = await vms.start("src")
        await src.set_caps(events=True)
        await wait_walking(src)
        port = free_tcp_port()
        await src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = await wait_completed(src)
        assert info["status"] == "failed"
        assert info["error-desc"].startswith(f"Failed to connect to '127.0.0.1:{port}'")
        # query-migrate may answer 'failed' before the event reaches this client.
        await wait_event(src, "MIGRATION", "failed")
        assert event_trace(src) == ["MIGRATION:setup", "MIGRATION:failed"]
        assert await src.cmd("query-status") == {"running": True, "status": "running"}
        await wait_guest_runs(src)
    run_with(vms, body)
