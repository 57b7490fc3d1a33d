"""File descriptors passed over the UNIX monitor (SCM_RIGHTS), as libvirt does:
``getfd`` + ``migrate fd:NAME`` / ``migrate-incoming fd:NAME``, and ``add-fd`` +
``file:/dev/fdset/N``, between real ``livemig run`` processes driven by
``qemu.qmp`` (``QMPClient.send_fd_scm``); plus ``qmp-shell`` against livemig."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from qemu.qmp import ExecuteError
from conftest import (
    assert_same_guest,
    run_with,
    start_pair,
    wait_completed,
)


async def pass_fd(vm, fd: int, **getfd_or_addfd) -> dict:
    """Send ``fd`` with the next command: ``getfd`` (fdname=) or ``add-fd``."""
    vm.qmp.send_fd_scm(fd)
    if "fdname" in getfd_or_addfd:
        return await vm.cmd("getfd", **getfd_or_addfd)
    return await vm.cmd("add-fd", **getfd_or_addfd)


@pytest.mark.timeout(90)
def test_migrate_over_a_socketpair_passed_to_both_vms(vms):
    """One end of a socketpair to each VM: a socket channel, return path and
    switchover-ack included."""
    async def body():
        caps = {"return-path": True, "switchover-ack": True, "events": True}
        src, dst = await start_pair(vms, src_caps=caps)
        a, b = socket.socketpair()
        try:
            assert await pass_fd(dst, b.fileno(), fdname="migin") == {}
            assert await pass_fd(src, a.fileno(), fdname="migout") == {}
        finally:
            a.close()   # the VMs hold their own copies now
            b.close()
        assert await dst.cmd("migrate-incoming", uri="fd:migin") == {}
        assert await src.cmd("migrate", uri="fd:migout") == {}
        info = await wait_completed(src, timeout=60)
        assert info["status"] == "completed", info
        assert info["x-switchover-ack"]["acked"] is True
        dinfo = await wait_completed(dst, timeout=30)
        assert dinfo["status"] == "completed", dinfo
        await assert_same_guest(src, dst)
        # The name was taken by the migration (QEMU's monitor_get_fd).
        with pytest.raises(ExecuteError, match="File descriptor named 'migout' not found"):
            await src.cmd("closefd", fdname="migout")
    run_with(vms, body)


@pytest.mark.timeout(90)
def test_migrate_to_an_fdset_file_and_back_from_a_file_fd(vms, tmp_path):
    """Source: ``add-fd`` of a write-only file, ``migrate file:/dev/fdset/N``
    (libvirt's save path). Destination: ``getfd`` of the file opened read-only,
    ``migrate-incoming fd:NAME`` (an fd channel)."""
    async def body():
        src, dst = await start_pair(vms, paced=True)
        await src.cmd("stop")
        path = tmp_path / "saved.mig"
        wfd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            info = await pass_fd(src, wfd, **{"fdset-id": 7, "opaque": "save"})
        finally:
            os.close(wfd)
        assert info["fdset-id"] == 7
        assert await src.cmd("query-fdsets") == [
            {"fdset-id": 7, "fds": [{"fd": info["fd"], "opaque": "save"}]}]
        assert await src.cmd("migrate", uri="file:/dev/fdset/7") == {}
        done = await wait_completed(src, timeout=60)
        assert done["status"] == "completed", done
        assert path.stat().st_size > 0
        rfd = os.open(path, os.O_RDONLY)
        try:
            await pass_fd(dst, rfd, fdname="saved")
        finally:
            os.close(rfd)
        assert await dst.cmd("migrate-incoming", uri="fd:saved") == {}
        dinfo = await wait_completed(dst, timeout=60)
        assert dinfo["status"] == "completed", dinfo
        await assert_same_guest(src, dst)
    run_with(vms, body)


@pytest.mark.timeout(60)
def test_qmp_shell_drives_livemig(vms):
    """qemu.qmp's qmp-shell, as a QEMU user runs it, against a livemig monitor."""
    shell = shutil.which("qmp-shell")
    if shell is None:
        pytest.skip("qmp-shell (qemu.qmp) is not installed")

    async def body():
        vm = await vms.start("shell", paused=True)
        script = "query-status\nquery-uuid\nquery-target\ngetfd fdname=x\n"
        proc = subprocess.run([shell, vm.qmp_path], input=script, capture_output=True,
                              text=True, timeout=30)
        out = proc.stdout
        assert '"status": "prelaunch"' in out, out
        assert '"UUID": "00000000-0000-0000-0000-000000000000"' in out, out
        assert '"arch": "x86_64"' in out, out
        assert "No file descriptor supplied via SCM_RIGHTS" in out, out
    run_with(vms, body)
