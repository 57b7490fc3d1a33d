"""Two hosts: source and destination in two network namespaces joined by a veth pair.

Namespace ``A`` (10.200.0.1/24) runs the source, ``B`` (10.200.0.2/24) the
destination; the link is shaped with tc (netem ``rate 1gbit delay 10ms`` where
the kernel has netem, else tbf ``rate 1gbit`` with no added delay). Only the
namespaces and links made here are touched, and they are deleted afterwards.
Skipped, with the reason, where namespaces cannot be made.

Cutting the link (``ip link set ... down`` on B's end) loses packets silently:
no FIN, no RST, as when a cable or a host dies.
"""

from __future__ import annotations

import pytest
from fault_helpers import (
    ACCEL,
    ACK,
    PACED_WALK,
    RP,
    TwoHosts,
    accel_digest,
    assert_same_guest,
    assert_source_survived,
    fleet_for,
    migration_trace,
    run_with,
    runstate,
    start_incoming,
    wait_blocked_in_send,
    wait_status,
    wait_terminal,
    wait_transferred,
)

pytestmark = [pytest.mark.timeout(90)]

WHY_NOT = TwoHosts.unavailable()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")
# Preparation the destination's device needs: with switchover-ack it happens
# before the switchover, so it must not show in the downtime.
ACCEL_PREPARE = "accel,id=acc0,size=4M,init-size=512K,prepare-ms=300"
CUT_BW = 4 << 20          # bytes/s: ~16 MiB of walk data keep the source active for seconds


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_for(tmp_path)


@pytest.fixture
def hosts(fleet):
    """Two namespaces; the fleet's VMs are killed before the namespaces go."""
    net = TwoHosts()
    net.create()
    try:
        yield net
    finally:
        fleet.kill_all()
        net.destroy()


async def pair_across(fleet, net: TwoHosts, *, caps: dict, devices=(ACCEL,), name="dst",
                      **kw):
    src = await fleet.source(devices=devices, caps=caps, netns=net.ns_a, **kw)
    dst = await fleet.destination(name, devices=devices, caps=caps, netns=net.ns_b, **kw)
    uri = await start_incoming(dst, f"tcp:{net.B_ADDR}:0")
    assert uri.startswith(f"tcp:{net.B_ADDR}:")
    return src, dst, uri


@needs_netns
def test_switchover_ack_migration_across_a_shaped_link(fleet, hosts):
    """Downtime within downtime-limit plus the round trip; the device's preparation
    (300 ms) happens before the switchover, not inside the downtime."""
    hosts.shape(rate="1gbit", delay_ms=10)
    rtt_ms = 2 * hosts.delay_ms

    async def body():
        # an 8 MiB walk: its dirty set crosses 1 Gbit/s in ~70 ms, well inside the limit;
        # paced (PACED_WALK) far below the link, so the migration converges whatever
        # the load (a free-running walk re-dirties all 7 MiB every pass, so completion
        # would need the sender to keep up the link's rate: a race)
        src, dst, uri = await pair_across(fleet, hosts, caps=ACK, devices=(ACCEL_PREPARE,),
                                          walk_end="8M", walk_rate=PACED_WALK)
        limit = (await src.cmd("query-migrate-parameters"))["downtime-limit"]
        await src.cmd("migrate", uri=uri)
        info = await wait_terminal(src, timeout=60)
        assert info["status"] == "completed", info
        assert (await wait_terminal(dst))["status"] == "completed"
        assert info["downtime"] <= limit + rtt_ms, (info["downtime"], hosts.shaping, info)
        ack = info["x-switchover-ack"]
        assert ack["acked"] is True
        assert ack["ack-time"] <= info["total-time"] - info["downtime"]   # ACK, then stop
        await assert_same_guest(src, dst, devices=True)
    run_with(fleet, body)


async def cut_mid_migration(fleet, net: TwoHosts):
    src, dst, uri = await pair_across(fleet, net, caps=RP)
    digest = await accel_digest(src)
    await src.set_params(max_bandwidth=CUT_BW)
    await src.cmd("migrate", uri=uri)
    await wait_status(src, "active")
    await wait_transferred(src, 2 << 20)
    net.cut()
    return src, dst, digest


@needs_netns
def test_link_cut_mid_migration_then_cancel(fleet, hosts):
    """After the cut nothing more leaves the source; cancel ends it at once, the guest
    runs on intact, and once the link is back a new migration across it succeeds."""
    async def body():
        src, _, digest = await cut_mid_migration(fleet, hosts)

        # The stream stalls: no ACK crosses the dead link, the socket buffer fills
        # and the migration thread waits in send() for room that never comes.
        await wait_blocked_in_send(src, 20)
        assert await runstate(src) == "running"
        await src.cmd("migrate_cancel")
        await wait_status(src, "cancelled", timeout=5)
        assert migration_trace(src)[:4] == ["setup", "active", "cancelling", "cancelled"]
        hosts.restore()
        await assert_source_survived(fleet, src, status="cancelled", cause=None, digest=digest,
                                     caps=RP, name="dst-again", netns=hosts.ns_b,
                                     host=hosts.B_ADDR)
    run_with(fleet, body)


@needs_netns
@pytest.mark.timeout(60)
def test_link_cut_mid_migration_source_gives_up_by_itself(fleet, hosts):
    """Nobody cancels: the dead link (no FIN, no RST) must still end the migration
    within the TCP timeouts, not after the kernel's ~15 min of retransmissions."""
    async def body():
        src, _, digest = await cut_mid_migration(fleet, hosts)
        info = await wait_terminal(src, timeout=20)
        assert info["status"] == "failed", info
        await assert_source_survived(fleet, src, status="failed", cause=None, digest=digest,
                                     again=False)
    run_with(fleet, body)


@needs_netns
def test_migrate_to_a_host_that_does_not_exist(fleet, hosts):
    """10.200.0.3 is on the link but nobody answers ARP: connect fails (EHOSTUNREACH)."""
    async def body():
        src = await fleet.source(netns=hosts.ns_a)
        digest = await accel_digest(src)
        await src.cmd("migrate", uri="tcp:10.200.0.3:4444")
        await assert_source_survived(
            fleet, src, status="failed", digest=digest, timeout=30,
            cause=r"^Failed to connect to '10\.200\.0\.3:4444': No route to host$",
            name="dst-again", netns=hosts.ns_b, host=hosts.B_ADDR)
    run_with(fleet, body)
