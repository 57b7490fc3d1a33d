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
from conftest import (
    assert_same_guest,
    run_with,
    start_pair,
    wait_completed,
)
from qemu.qmp import ExecuteError


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


@pytest.mark.timeout(60)
def test_add_fd_on_the_command_line_feeds_a_file_migration(tmp_path):
    """``-add-fd fd=N,set=M,opaque=S`` (an inherited descriptor, as libvirt passes
    it): the set is there from the start and ``file:/dev/fdset/M`` writes to it."""
    import asyncio
    import sys
    import time

    from qemu.qmp import QMPClient

    out = tmp_path / "out.mig"
    wfd = os.open(out, os.O_CREAT | os.O_WRONLY, 0o600)   # inheritable: CLOEXEC clear
    os.set_inheritable(wfd, True)
    qmp_path = str(tmp_path / "addfd.qmp")
    argv = [sys.executable, "-m", "livemig", "run", "-accel", "soft", "-m", "32M",
            "-guest", "walk,start=1M,end=4M", "-S", "-qmp",
            f"unix:{qmp_path},server=on,wait=off", "-add-fd", f"fd={wfd},set=4,opaque=save"]
    proc = subprocess.Popen(argv, pass_fds=(wfd,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(wfd)

    async def body():
        qmp = QMPClient("addfd")
        deadline = time.monotonic() + 20
        while True:
            try:
                await qmp.connect(qmp_path)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert proc.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.02)
        try:
            sets = await qmp.execute("query-fdsets")
            assert len(sets) == 1 and sets[0]["fdset-id"] == 4
            assert sets[0]["fds"][0]["opaque"] == "save"
            await qmp.execute("migrate", {"uri": "file:/dev/fdset/4"})
            while (await qmp.execute("query-migrate"))["status"] not in (
                    "completed", "failed"):
                assert time.monotonic() < deadline + 20
            assert (await qmp.execute("query-migrate"))["status"] == "completed"
            await qmp.execute("quit")
        finally:
            try:
                await qmp.disconnect()
            except EOFError:   # quit closed the monitor first
                pass
    try:
        asyncio.run(body())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert out.stat().st_size > 32 * 1024   # a stream, not nothing


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("spec", "text"), [
    ("fd=1,set=0", "-add-fd fd=1,set=0: fd cannot be a standard I/O stream"),
    ("set=0", "-add-fd set=0: fd option is required and must be non-negative"),
    ("fd=77,set=0", "-add-fd fd=77,set=0: fd is not valid or already in use"),
    ("fd=x,set=0", "-add-fd fd=x,set=0: Parameter 'fd' expects a number"),
    ("fd=5,set=0,bogus=1", "-add-fd fd=5,set=0,bogus=1: Invalid parameter 'bogus'"),
])
def test_add_fd_refusals_are_qemus(tmp_path, spec, text):
    import sys
    proc = subprocess.run([sys.executable, "-m", "livemig", "run", "-accel", "soft",
                           "-m", "32M", "-guest", "walk,start=1M,end=4M", "-S",
                           "-add-fd", spec], capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"livemig: {text}"
