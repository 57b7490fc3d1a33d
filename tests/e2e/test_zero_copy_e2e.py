"""QEMU's ``zero-copy-send`` between ``livemig run`` processes: multifd pages
sent with MSG_ZEROCOPY, the round's sends flushed at each sync, and
``dirty-sync-missed-zero-copy`` counted; a UNIX socket (no SO_ZEROCOPY) fails
at connect with QEMU 10.0's text, seen side by side with QEMU."""

from __future__ import annotations

import socket

import pytest
from conftest import (
    assert_same_guest,
    run_with,
    start_incoming,
    start_pair,
    wait_booted,
    wait_completed,
)
from e2e_helpers import wait_migration_status

from livemig.cli.bench import walk_image
from livemig.cli.driver import QEMU_BINARY, Vm, VmSpec, qemu_available
from livemig.transport.channel import tcp_zero_copy_available
from livemig.transport.zerocopy import FEATURE_NOT_DETECTED

CAPS = {"events": True, "multifd": True}


@pytest.mark.timeout(90)
@pytest.mark.skipif(not tcp_zero_copy_available(),
                    reason="this kernel offers no SO_ZEROCOPY on TCP")
def test_zero_copy_send_migrates_byte_exact(vms):
    async def body():
        src, dst = await start_pair(vms, src_caps=CAPS, paced=False)
        await src.set_caps(**{"zero-copy-send": True})
        for vm in (src, dst):
            await vm.set_params(multifd_channels=2)
        # The free-running walk: completion on the first pass's assumed bandwidth
        # (see test_multifd_e2e), several syncs on the way (setup, pass, final).
        await src.set_params(avail_switchover_bandwidth=1 << 30)
        caps = {c["capability"]: c["state"] for c in await src.cmd("query-migrate-capabilities")}
        assert caps["zero-copy-send"] is True
        uri = await start_incoming(dst)
        await src.cmd("migrate", uri=uri)
        info = await wait_completed(src, timeout=60)
        assert info["status"] == "completed", info.get("error-desc")
        assert (await wait_completed(dst, timeout=20))["status"] == "completed"
        ram = info["ram"]
        assert ram["multifd-bytes"] > 0
        # On loopback the kernel copies every MSG_ZEROCOPY send (the receiving
        # socket cannot hold pinned sender pages), and says so: each flush that
        # found its round copied counts once, as QEMU's does (QEMU 10.0.2 here:
        # 3 on a 128M guest with 2 channels).
        assert ram["dirty-sync-missed-zero-copy"] >= 1
        assert ram["dirty-sync-missed-zero-copy"] <= 2 * ram["dirty-sync-count"] + 2
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_zero_copy_send_is_off_by_default(vms):
    async def body():
        vm = await vms.start("src")
        caps = {c["capability"]: c["state"] for c in await vm.cmd("query-migrate-capabilities")}
        assert caps["zero-copy-send"] is False
        info = await vm.cmd("query-migrate")
        assert "ram" not in info or info["ram"]["dirty-sync-missed-zero-copy"] == 0
    run_with(vms, body)


async def _fail_on_unix(src: Vm, path: str) -> dict:
    """migrate to a UNIX listener with zero-copy-send: the failed status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        await src.cmd("migrate", uri=f"unix:{path}")
        return await wait_migration_status(src, timeout=30)


@pytest.mark.timeout(60)
def test_unix_socket_has_no_zero_copy_in_qemus_words(vms, tmp_path):
    async def body():
        src = await vms.start("src")
        await src.set_caps(**CAPS, **{"zero-copy-send": True})
        await wait_booted(src)
        info = await _fail_on_unix(src, str(tmp_path / "lm.sock"))
        assert info["status"] == "failed"
        assert info["error-desc"] == FEATURE_NOT_DETECTED
        assert (await src.cmd("query-status"))["status"] == "running"
    run_with(vms, body)


@pytest.mark.timeout(60)
@pytest.mark.skipif(qemu_available() is None, reason=f"{QEMU_BINARY} is not installed")
def test_qemu_says_the_same_on_a_unix_socket(vms, tmp_path):
    async def body():
        image = walk_image(str(tmp_path / "q.img"), "4M")
        src = await Vm.start(VmSpec(engine="qemu", name="qsrc", ram="64M", accel="auto",
                                    boot_image=image), vms.workdir, timeout=30)
        vms.vms.append(src)
        await src.set_caps(**CAPS, **{"zero-copy-send": True})
        info = await _fail_on_unix(src, str(tmp_path / "q.sock"))
        assert info["status"] == "failed"
        assert info["error-desc"] == FEATURE_NOT_DETECTED
        assert (await src.cmd("query-status"))["status"] == "running"
    run_with(vms, body)
