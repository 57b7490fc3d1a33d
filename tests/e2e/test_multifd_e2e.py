"""multifd between two ``livemig run`` processes, driven over QMP: pages on
parallel channels, device state on the main one, integrity byte for byte."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from e2e_helpers import wait_migration_status

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.walk_check import check_walk_pattern

MIB = 1 << 20
ACCEL = "accel,id=acc0,size=8M,init-size=1M,prepare-ms=100"


async def pair(tmp_path, channels: int):
    src = await Vm.start(VmSpec(name="src", ram="128M", accel="soft", walk_end="32M",
                                devices=[ACCEL]), str(tmp_path))
    dst = await Vm.start(VmSpec(name="dst", ram="128M", accel="soft", walk_end="32M",
                                devices=[ACCEL], incoming="defer", paused=True), str(tmp_path))
    for vm in (src, dst):
        await vm.set_caps(events=True, multifd=True, **{"return-path": True,
                                                        "switchover-ack": True})
        await vm.set_params(multifd_channels=channels)
    # The free-running walk re-dirties its 31 MiB every pass: with the measured
    # bandwidth, completion would need the channels to move 31 MiB within the
    # 300 ms downtime limit, a race the load can lose. The switchover decision
    # assumes 1 GiB/s (avail-switchover-bandwidth; the link is unlimited anyway),
    # so it completes after the first pass, the guest running until then.
    await src.set_params(max_bandwidth=0, avail_switchover_bandwidth=1 << 30)
    return src, dst


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_migration_is_byte_exact(tmp_path, channels):
    async def main():
        src, dst = await pair(tmp_path, channels)
        try:
            await dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await src.wait_serial(lambda d: d.startswith(b"A"))
            # the channels form of migrate, with one main channel
            await src.cmd("migrate", channels=[{"channel-type": "main", "addr": {
                "transport": "socket", "type": "inet", "host": "127.0.0.1", "port": port}}])
            info = await wait_migration_status(src, timeout=45)   # woken by MIGRATION events
            assert info["status"] == "completed", info.get("error-desc")
            assert info["ram"]["multifd-bytes"] > 0
            assert info["x-switchover-ack"]["acked"] is True
            assert (await wait_migration_status(dst, timeout=15))["status"] == "completed"
            src_mem, dst_mem = await src.pmem(0, 128 * MIB), await dst.pmem(0, 128 * MIB)
            assert src_mem == dst_mem
            walk = np.frombuffer(dst_mem, np.uint8).reshape(-1, 4096)[256:32 * 256, 0]
            assert check_walk_pattern(walk) == []
            digests = [(await vm.cmd("x-accel-digest", id="acc0"))["sha256"] for vm in (src, dst)]
            assert digests[0] == digests[1]
        finally:
            await src.close()
            await dst.close()
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_multifd_needs_a_socket_transport(tmp_path):
    async def main():
        src, dst = await pair(tmp_path, 2)
        try:
            with pytest.raises(Exception, match="Migration requires multi-channel URIs"):
                await src.cmd("migrate", uri=f"file:{tmp_path}/stream")
            assert (await src.cmd("query-status"))["status"] == "running"
        finally:
            await src.close()
            await dst.close()
    asyncio.run(main())
