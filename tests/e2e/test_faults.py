"""Fault matrix, end to end: a failed migration costs nothing.

Real ``livemig run`` processes driven by ``qemu.qmp``. For every fault the
source must end ``failed`` or ``cancelled`` with an ``error-desc`` naming the
cause, its guest must run again with its RAM walk pattern and device memory
intact, and a new migration to a fresh destination must then complete byte
for byte; a real destination must report the error, stay ``inmigrate`` and
never run its guest (see ``fault_helpers``).

Phases are held deterministically with what the engine offers: a small
``max-bandwidth`` keeps the source ``active``; ``pause-before-switchover``
holds ``pre-switchover``; an accel device with a long ``prepare-ms`` and no
switchover-ack holds ``device`` (the source waits for the destination's SHUT
while it prepares); a listener with a full accept queue holds ``setup``.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from fault_helpers import (
    ACCEL,
    ACK,
    RP,
    CutProxy,
    FakeDestination,
    SynBlackhole,
    accel_digest,
    answer_pings,
    assert_destination_failed,
    assert_same_guest,
    assert_source_survived,
    assert_stays,
    fleet_for,
    free_tcp_port,
    incoming_port,
    let_it_complete,
    migration_trace,
    qmp_error,
    run_with,
    runstate,
    start_incoming,
    wait_blocked_in_send,
    wait_exited,
    wait_runstate,
    wait_status,
    wait_terminal,
    wait_transferred,
)

from livemig.wire import MigCmd, encode_shut, encode_x_error

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_for(tmp_path)


SLOW_BW = 2 << 20           # bytes/s: 16 MiB of walk data keep the source active for ~8 s
# Same device (size, initial data) as ACCEL, but 3 s of preparation on the destination:
# without switchover-ack the source waits in `device` for the SHUT while it prepares.
ACCEL_SLOW_PREPARE = "accel,id=acc0,size=4M,init-size=512K,prepare-ms=3000"
ACCEL_NEVER_READY = "accel,id=acc0,size=4M,init-size=512K,prepare-ms=120000"
LINK_ERROR = (r"Channel error: Input/output error|Unable to write to socket: "
              r"(Connection reset by peer|Broken pipe)")


async def pair(fleet, *, caps: dict | None = None, dst_caps: dict | None = None,
               devices=(ACCEL,), dst_devices=None, dst_ram: str | None = None,
               bandwidth: int = 0):
    """Source (guest walking) and ``-incoming defer -S`` destination; returns
    (src, dst, uri, device digest before the migration)."""
    src = await fleet.source(devices=devices, caps=caps)
    kw = {"ram": dst_ram} if dst_ram else {}
    dst = await fleet.destination(devices=devices if dst_devices is None else dst_devices,
                                  caps=caps if dst_caps is None else dst_caps, **kw)
    if bandwidth:
        await src.set_params(max_bandwidth=bandwidth)
    digest = await accel_digest(src) if devices else None
    return src, dst, await start_incoming(dst), digest


# -- the destination dies --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_destination_killed_in_setup(fleet):
    """The listener the source connects to never accepts (full accept queue), so the
    source sits in ``setup``; its process is SIGKILLed: connection refused."""
    async def body():
        src = await fleet.source(caps=RP)
        digest = await accel_digest(src)
        hole = SynBlackhole()
        try:
            await src.cmd("migrate", uri=hole.uri)
            await wait_status(src, "setup")
            await assert_stays(src, "setup", 0.5)
            hole.kill()
        finally:
            hole.kill()
        await assert_source_survived(
            fleet, src, status="failed", digest=digest, caps=RP,
            cause=rf"^Failed to connect to '127\.0\.0\.1:{hole.port}': Connection refused$")
        assert migration_trace(src)[:2] == ["setup", "failed"]
        assert "STOP" not in migration_trace(src)[:2]
    run_with(fleet, body)


@pytest.mark.parametrize("caps", [{}, RP, ACK], ids=["plain", "return-path", "switchover-ack"])
def test_destination_killed_while_active(fleet, caps):
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=caps, bandwidth=SLOW_BW)
        await src.cmd("migrate", uri=uri)
        await wait_status(src, "active")
        await wait_transferred(src, 1 << 20)
        dst.kill()
        await assert_source_survived(fleet, src, status="failed", cause=LINK_ERROR,
                                     digest=digest, caps=caps)
        assert "STOP" not in migration_trace(src)[:3]
    run_with(fleet, body)


def test_destination_killed_in_pre_switchover(fleet):
    """The source is stopped, paused before switchover; the destination dies: the
    return path notices at once and the guest is resumed (no migrate-continue needed)."""
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP)
        await src.set_caps(**{"pause-before-switchover": True})
        await src.cmd("migrate", uri=uri)
        await wait_status(src, "pre-switchover")
        assert await runstate(src) == "finish-migrate"
        dst.kill()
        await assert_source_survived(fleet, src, status="failed",
                                     cause=r"^Channel error: Input/output error$",
                                     digest=digest, caps={**RP, "pause-before-switchover": False})
        trace = migration_trace(src)
        assert trace[:6] == ["setup", "active", "STOP", "pre-switchover", "failed", "RESUME"]
    run_with(fleet, body)


def test_destination_killed_in_device_phase(fleet):
    """The source sent everything and waits for SHUT while the destination prepares
    its device (3 s); the destination dies: failed, the guest is resumed. (The kill
    may land while the final sections are still being written: a write error then.)"""
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP, devices=(ACCEL_SLOW_PREPARE,))
        # The destination reports the 3 s preparation: a limit above it lets the
        # source switch over into it (at 300 ms the downtime contract forbids it).
        await src.set_params(downtime_limit=5000)
        await src.cmd("migrate", uri=uri)
        await wait_status(src, "device", timeout=30)
        dst.kill()
        await assert_source_survived(fleet, src, status="failed",
                                     cause=LINK_ERROR,
                                     digest=digest, caps=RP)
        assert migration_trace(src)[:6] == ["setup", "active", "STOP", "device", "failed",
                                            "RESUME"]
    run_with(fleet, body)


# -- the destination cannot load ---------------------------------------------------------------

LOAD_FAILURES = {
    "ram-size": ({"dst_ram": "128M"},
                 r"Size mismatch: pc\.ram: 0x4000000 != 0x8000000: Invalid argument"),
    "unknown-device": ({"dst_devices": ()},
                       r"Unknown savevm section or instance 'acc0/accel' 0\. Make sure that "
                       r"your current VM setup matches your saved VM setup"),
    "device-size": ({"dst_devices": ("accel,id=acc0,size=2M,init-size=512K,prepare-ms=50",)},
                    r"acc0/accel: data record out of range \(kind 1, offset \d+"),
}


@pytest.mark.parametrize("case", LOAD_FAILURES, ids=list(LOAD_FAILURES))
def test_destination_fails_to_load(fleet, case):
    """With a return path the destination's own words reach the source."""
    kw, reason = LOAD_FAILURES[case]

    async def body():
        src = await fleet.source(caps=RP)
        dkw = {"ram": kw["dst_ram"]} if "dst_ram" in kw else {}
        dst = await fleet.destination(devices=kw.get("dst_devices", (ACCEL,)), caps=RP, **dkw)
        digest = await accel_digest(src)
        await src.cmd("migrate", uri=await start_incoming(dst))
        dinfo = await assert_destination_failed(dst, reason)
        info = await assert_source_survived(fleet, src, status="failed", digest=digest,
                                            caps=RP, cause=rf"^destination: .*{reason}")
        # the source quotes the destination's reason, not a generic channel error
        assert dinfo["error-desc"].removeprefix("load of migration failed: ")[:60] in \
            info["error-desc"]
    run_with(fleet, body)


def test_destination_fails_to_load_without_return_path(fleet):
    """Without a return path the source only sees the connection go; it still fails
    cleanly and keeps its guest."""
    async def body():
        src, dst, uri, digest = await pair(fleet, dst_ram="128M")
        await src.cmd("migrate", uri=uri)
        await assert_destination_failed(dst, r"Size mismatch")
        await assert_source_survived(fleet, src, status="failed", cause=LINK_ERROR,
                                     digest=digest)
    run_with(fleet, body)


def test_destination_exit_on_error_default(fleet):
    """QEMU's default ``exit-on-error``: the destination prints the reason and exits 1."""
    async def body():
        src = await fleet.source(caps=RP)
        digest = await accel_digest(src)
        dst = await fleet.destination(caps=RP, ram="128M")
        await src.cmd("migrate", uri=await start_incoming(dst, exit_on_error=None))
        assert await wait_exited(dst, 15) == 1
        err = dst.stderr_text()
        assert re.search(r"^livemig: load of migration failed: Size mismatch: pc\.ram: "
                         r"0x4000000 != 0x8000000", err, re.M), err
        assert "Traceback" not in err
        await assert_source_survived(fleet, src, status="failed", cause="Size mismatch",
                                     digest=digest, caps=RP)
    run_with(fleet, body)


# -- the link breaks ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["fin", "rst"])
def test_connection_cut_mid_stream(fleet, how):
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP, bandwidth=SLOW_BW)
        proxy = CutProxy(incoming_port(uri))
        try:
            await src.cmd("migrate", uri=proxy.uri)
            await wait_transferred(src, 1 << 20)
            proxy.cut(how)
            await assert_destination_failed(
                dst, r"Truncated migration stream: data ended|Unable to read from socket: "
                     r"Connection reset by peer")
            await assert_source_survived(fleet, src, status="failed", cause=LINK_ERROR,
                                         digest=digest, caps=RP)
        finally:
            proxy.close()
    run_with(fleet, body)


def test_return_path_closed_early(fleet):
    """The link carries the stream on but the return path ends (EOF) mid-migration."""
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=ACK, bandwidth=SLOW_BW)
        proxy = CutProxy(incoming_port(uri))
        try:
            await src.cmd("migrate", uri=proxy.uri)
            await wait_transferred(src, 1 << 20)
            proxy.close_return_path()
            await assert_source_survived(fleet, src, status="failed",
                                         cause=r"^Channel error: Input/output error$",
                                         digest=digest, caps=ACK)
            await assert_destination_failed(dst, r"Truncated migration stream|Unable to read")
        finally:
            proxy.close()
    run_with(fleet, body)


def test_frozen_destination_cancel(fleet):
    """A destination that stops reading (SIGSTOP): the source blocks in send;
    migrate_cancel must still end it at once."""
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP)
        await src.set_params(max_bandwidth=64 << 20)
        os.kill(dst.proc.pid, signal.SIGSTOP)
        try:
            await src.cmd("migrate", uri=uri)
            await wait_status(src, "active")
            # the stream stalls: socket buffers full, the migration thread waits
            # in send() for room that a frozen peer never makes
            await wait_blocked_in_send(src, 15)
            await src.cmd("migrate_cancel")
            await wait_status(src, "cancelled", timeout=5)
        finally:
            os.kill(dst.proc.pid, signal.SIGCONT)
        await assert_source_survived(fleet, src, status="cancelled", cause=None,
                                     digest=digest, caps=RP)
        await assert_destination_failed(dst, r"Truncated migration stream|Unable to read")
    run_with(fleet, body)


# -- hostile and silent return paths (a destination written in Python) --------------------------

def _after_ping(reply):
    def script(fake, ev):
        if answer_pings(fake, ev):
            reply(fake)
    return script


HOSTILE_RP = {
    "closed-after-ping": (lambda f: f.close_return_path(),
                          r"^Channel error: Input/output error$"),
    "invalid-type": (lambda f: f.send(b"\x00\x63\x00\x00"),
                     r"^Received invalid message 0x0063 length 0x0000$"),
    "shut-1": (lambda f: f.send(encode_shut(1)), r"^Sibling indicated error 1$"),
    "x-error": (lambda f: f.send(encode_x_error("disk on fire") + encode_shut(1)),
                r"^destination: disk on fire$"),
    "ack-with-length-4": (lambda f: f.send(b"\x00\x07\x00\x04\x00\x00\x00\x00"),
                          r"^Received 'SWITCHOVER_ACK' message \(0x0007\) withincorrect "
                          r"length 4 expecting 0$"),
    "oversized": (lambda f: f.send(b"\x00\x05\x02\x58" + bytes(600)),
                  r"^Received 'RECV_BITMAP' message \(0x0005\) withincorrect length 600"),
    "truncated-then-eof": (lambda f: (f.send(b"\x00\x02\x00\x04\x00"), f.close_return_path()),
                           r"^Failed reading data for message 0x0002 read 1 expected 4$"),
}


@pytest.mark.parametrize("case", list(HOSTILE_RP))
def test_hostile_return_path(fleet, case):
    """Each malformed or hostile return path ends the migration with QEMU's text
    (no stream-offset suffix in the error-desc); the guest runs on."""
    reply, cause = HOSTILE_RP[case]

    async def body():
        src = await fleet.source(caps=ACK)
        digest = await accel_digest(src)
        fake = FakeDestination(_after_ping(reply))
        try:
            await src.cmd("migrate", uri=fake.uri)
            await assert_source_survived(fleet, src, status="failed", cause=cause,
                                         digest=digest, caps=ACK)
            assert fake.commands[:2] == [MigCmd.OPEN_RETURN_PATH, MigCmd.PING]
        finally:
            fake.close()
    run_with(fleet, body)


def test_destination_that_never_acks_can_be_cancelled(fleet):
    """A destination that answers PING but never sends SWITCHOVER_ACK: the source keeps
    its guest running and waits (no switchover without the ACK); cancel ends it."""
    async def body():
        src = await fleet.source(caps=ACK)
        digest = await accel_digest(src)
        fake = FakeDestination(lambda f, ev: answer_pings(f, ev))
        try:
            await src.cmd("migrate", uri=fake.uri)
            await wait_transferred(src, 24 << 20)       # RAM and device are out at least once
            await assert_stays(src, "active", 1.0)
            info = await src.cmd("query-migrate")
            assert info["x-switchover-ack"]["acked"] is False
            assert await runstate(src) == "running"
            await src.cmd("migrate_cancel")
            await wait_status(src, "cancelled", timeout=5)
            await assert_source_survived(fleet, src, status="cancelled", cause=None,
                                         digest=digest, caps=ACK)
            assert "STOP" not in migration_trace(src)[:4]
        finally:
            fake.close()
    run_with(fleet, body)


async def _waiting_for_ready_destination(fleet):
    """A real destination whose device needs 120 s of preparation: no ACK comes."""
    src, dst, uri, digest = await pair(fleet, caps=ACK, devices=(ACCEL_NEVER_READY,))
    await src.cmd("migrate", uri=uri)
    await wait_transferred(src, 16 << 20)      # initial data (and INIT_DATA_SENT) are out
    await assert_stays(src, "active", 1.0)
    assert await runstate(src) == "running"
    return src, dst, digest


def test_destination_that_never_gets_ready_can_be_cancelled(fleet):
    """The source waits for the ACK with its guest running; cancel ends it cleanly."""
    async def body():
        src, dst, digest = await _waiting_for_ready_destination(fleet)
        await src.cmd("migrate_cancel")
        await wait_status(src, "cancelled", timeout=5)
        await assert_source_survived(fleet, src, status="cancelled", cause=None, digest=digest,
                                     caps=ACK, devices=(ACCEL,))
    run_with(fleet, body)


@pytest.mark.timeout(45)
def test_preparing_destination_sees_the_cancel(fleet):
    """The destination's device preparation must not stop its load thread: it sees
    the source's cancel (EOF) and fails at once, not after 120 s."""
    async def body():
        src, dst, _ = await _waiting_for_ready_destination(fleet)
        await src.cmd("migrate_cancel")
        await wait_status(src, "cancelled", timeout=5)
        await assert_destination_failed(dst, r"Truncated migration stream|Unable to read",
                                        timeout=5)
    run_with(fleet, body)


@pytest.mark.timeout(45)
def test_stream_keeps_flowing_while_the_destination_prepares(fleet):
    """While the ACK is pending the source still sends dirtied RAM, and the preparing
    destination still reads it (preparation overlaps the transfer)."""
    async def body():
        src, dst, _ = await _waiting_for_ready_destination(fleet)
        sent = (await src.cmd("query-migrate"))["ram"]["transferred"]
        # the walk re-dirties its 16 MiB range continuously: 2 s carry megabytes
        await wait_transferred(src, sent + (4 << 20), timeout=2)
    run_with(fleet, body)


# -- migrate_cancel ------------------------------------------------------------------------------

@pytest.mark.timeout(45)
def test_cancel_in_setup(fleet):
    """Cancel while connect() hangs (SYN retries): ``cancelled`` at once, not after the
    connect gives up; a second migrate meanwhile is refused; guest intact."""
    async def body():
        src = await fleet.source(caps=RP)
        digest = await accel_digest(src)
        hole = SynBlackhole()
        try:
            await src.cmd("migrate", uri=hole.uri)
            await wait_status(src, "setup")
            await assert_stays(src, "setup", 0.3)
            desc = await qmp_error(src, "migrate", uri="tcp:127.0.0.1:1")
            assert desc == "There's a migration process in progress"
            await src.cmd("migrate_cancel")
            await wait_status(src, "cancelled", timeout=3)
            assert await runstate(src) == "running"
            await assert_source_survived(fleet, src, status="cancelled", cause=None,
                                         digest=digest, caps=RP)
        finally:
            hole.kill()
        assert migration_trace(src)[:3] == ["setup", "cancelling", "cancelled"]
    run_with(fleet, body)


def test_cancel_while_active(fleet):
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP, bandwidth=SLOW_BW)
        await src.cmd("migrate", uri=uri)
        await wait_transferred(src, 1 << 20)
        await src.cmd("migrate_cancel")
        await wait_status(src, "cancelled", timeout=5)
        assert migration_trace(src)[:4] == ["setup", "active", "cancelling", "cancelled"]
        await assert_destination_failed(dst, r"Truncated migration stream|Unable to read")
        await assert_source_survived(fleet, src, status="cancelled", cause=None,
                                     digest=digest, caps=RP)
    run_with(fleet, body)


def test_cancel_in_pre_switchover(fleet):
    """Cancel kicks the paused switchover: the stopped guest is resumed."""
    async def body():
        src, dst, uri, digest = await pair(fleet, caps=RP)
        await src.set_caps(**{"pause-before-switchover": True})
        await src.cmd("migrate", uri=uri)
        await wait_status(src, "pre-switchover")
        await src.cmd("migrate_cancel")
        await wait_status(src, "cancelled", timeout=5)
        assert migration_trace(src)[:7] == ["setup", "active", "STOP", "pre-switchover",
                                            "cancelling", "RESUME", "cancelled"]
        await assert_destination_failed(dst, r"Truncated migration stream|Unable to read")
        await src.set_caps(**{"pause-before-switchover": False})
        await assert_source_survived(fleet, src, status="cancelled", cause=None,
                                     digest=digest, caps=RP)
    run_with(fleet, body)


# -- wrong requests ----------------------------------------------------------------------------

UNREACHABLE = {
    "closed-port": (None, r"^Failed to connect to '127\.0\.0\.1:{port}': Connection refused$"),
    "dead-destination": (None, r"^Failed to connect to '127\.0\.0\.1:{port}': "
                               r"Connection refused$"),
    "unix-missing": ("unix:{tmp}/nobody.sock",
                     r"^Failed to connect to '{tmp}/nobody\.sock': No such file or directory$"),
    "unresolvable": ("tcp:no-such-host.invalid:4444",
                     r"^address resolution failed for no-such-host\.invalid:4444: "),
    "file-dir-missing": ("file:{tmp}/no/such/dir/stream",
                         r"^Unable to open {tmp}/no/such/dir/stream: No such file or directory$"),
    "exec-exits": ("exec:exit 0", r"Unable to write to command: Broken pipe|Command exited"),
}


@pytest.mark.parametrize("case", UNREACHABLE, ids=list(UNREACHABLE))
def test_migrate_to_an_unreachable_address(fleet, tmp_path, case):
    uri_t, cause_t = UNREACHABLE[case]

    async def body():
        src = await fleet.source()
        digest = await accel_digest(src)
        port = free_tcp_port()
        if case == "dead-destination":
            dead = await fleet.destination("dead")
            uri = await start_incoming(dead)
            port = incoming_port(uri)[1]
            dead.kill()                 # SIGKILL while it waits for the source
        uri = uri_t.format(tmp=tmp_path) if uri_t else f"tcp:127.0.0.1:{port}"
        await src.cmd("migrate", uri=uri)
        cause = cause_t.format(port=port, tmp=re.escape(str(tmp_path)))
        await assert_source_survived(fleet, src, status="failed", cause=cause, digest=digest)
        assert "STOP" not in migration_trace(src)[:2]
    run_with(fleet, body)


def test_second_migrate_while_one_runs(fleet):
    """Refused with QEMU's text; the running migration goes on and completes."""
    async def body():
        src, dst, uri, _ = await pair(fleet, caps=RP, bandwidth=SLOW_BW)
        other = await fleet.destination("other", caps=RP)
        other_uri = await start_incoming(other)
        await src.cmd("migrate", uri=uri)
        await wait_status(src, "active")
        assert await qmp_error(src, "migrate", uri=other_uri) == \
            "There's a migration process in progress"
        assert await qmp_error(src, "migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": False}]) == \
            "There's a migration process in progress"
        sent = (await src.cmd("query-migrate"))["ram"]["transferred"]
        await wait_transferred(src, sent + (1 << 20))      # the first one still flows
        await let_it_complete(src)
        assert (await wait_terminal(src))["status"] == "completed"
        assert (await wait_terminal(dst))["status"] == "completed"
        assert (await other.cmd("query-migrate"))["status"] == "setup"   # never touched
        await wait_runstate(src, "postmigrate")     # entered just after completed
        assert await runstate(src) == "postmigrate"
        await assert_same_guest(src, dst, devices=True)
    run_with(fleet, body)
