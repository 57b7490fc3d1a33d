"""Monitor descriptors: getfd/closefd, add-fd/remove-fd/query-fdsets, fd: and
/dev/fdset/N resolution, over the real UNIX monitor (SCM_RIGHTS) in process.

Expected texts are QEMU 10.0.2's answers to the same calls."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from livemig.qmp.errors import QMPError
from livemig.qmp.fds import FdSets, MonitorFds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for qmp_inprocess
from qmp_inprocess import InProcessFleet, inprocess_fleet, run_in_fleet  # noqa: E402


@pytest.fixture
def inproc(tmp_path):
    yield from inprocess_fleet(tmp_path)


def run(fleet: InProcessFleet, body) -> Any:
    return run_in_fleet(fleet, body)


async def error(vm, command: str, **args: Any) -> str:
    try:
        result = await vm.cmd(command, **args)
    except ExecuteError as exc:
        return str(exc)
    raise AssertionError(f"{command} succeeded: {result!r}")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ pure tables

def test_monitor_fds_keep_the_last_batch_and_names() -> None:
    mon = MonitorFds()
    a, b, c = (os.open(os.devnull, os.O_RDONLY) for _ in range(3))
    mon.receive([a])
    mon.receive([b, c])            # replaces (closes) the earlier one
    assert not is_open(a)
    mon.getfd("x")                 # takes b, closes the extra c
    assert not is_open(c)
    with pytest.raises(QMPError, match="No file descriptor supplied via SCM_RIGHTS"):
        mon.getfd("y")
    assert mon.take("x") == b
    with pytest.raises(QMPError, match="File descriptor named 'x' has not been found"):
        mon.take("x")
    os.close(b)


def test_fdsets_ids_order_and_removal() -> None:
    sets = FdSets()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
    assert sets.add(fds[0]) == {"fdset-id": 0, "fd": fds[0]}
    assert sets.add(fds[1], 5, "hi") == {"fdset-id": 5, "fd": fds[1]}
    assert sets.add(fds[2]) == {"fdset-id": 1, "fd": fds[2]}     # the lowest free id
    sets.add(fds[3], 5)
    assert sets.query() == [
        {"fdset-id": 5, "fds": [{"fd": fds[1], "opaque": "hi"}, {"fd": fds[3]}]},
        {"fdset-id": 1, "fds": [{"fd": fds[2]}]},
        {"fdset-id": 0, "fds": [{"fd": fds[0]}]}]
    with pytest.raises(QMPError, match="expects a non-negative value"):
        sets.add(fds[0], -1)
    with pytest.raises(QMPError, match="'fdset-id:9' not found"):
        sets.remove(9)
    with pytest.raises(QMPError, match="'fdset-id:5, fd:999' not found"):
        sets.remove(5, 999)
    sets.remove(5, fds[1])
    assert not is_open(fds[1])
    sets.remove(0)
    assert [s["fdset-id"] for s in sets.query()] == [5, 1]
    with pytest.raises(QMPError, match="Could not parse fdset /dev/fdset/x"):
        sets.dup_fd("/dev/fdset/x", os.O_RDONLY)
    with pytest.raises(QMPError, match="Failed to find fdset /dev/fdset/7"):
        sets.dup_fd("/dev/fdset/7", os.O_RDONLY)
    with pytest.raises(QMPError, match="matching flags=0x41"):
        sets.dup_fd("/dev/fdset/1", os.O_CREAT | os.O_WRONLY)
    dup = sets.dup_fd("/dev/fdset/1", os.O_RDONLY)
    assert dup != fds[2] and os.path.samestat(os.fstat(dup), os.fstat(fds[2]))
    os.close(dup)
    sets.close()


# ------------------------------------------------------------------ over QMP

@pytest.mark.timeout(60)
def test_fd_commands_over_the_unix_monitor(inproc):
    async def body():
        vm = await inproc.start("fds")
        assert await error(vm, "getfd", fdname="x") == \
            "No file descriptor supplied via SCM_RIGHTS"
        r, w = os.pipe()
        vm.qmp.send_fd_scm(r)
        assert await vm.cmd("getfd", fdname="x") == {}
        vm.qmp.send_fd_scm(w)
        assert await error(vm, "getfd", fdname="1x") == \
            "Parameter 'fdname' expects a name not starting with a digit"
        assert await error(vm, "closefd", fdname="nosuch") == \
            "File descriptor named 'nosuch' not found"
        assert await vm.cmd("closefd", fdname="x") == {}
        assert await error(vm, "add-fd") == "No file descriptor supplied via SCM_RIGHTS"
        r, w = os.pipe()
        vm.qmp.send_fd_scm(w)
        info = await vm.cmd("add-fd", **{"fdset-id": 2, "opaque": "out"})
        assert info["fdset-id"] == 2
        assert await vm.cmd("query-fdsets") == [
            {"fdset-id": 2, "fds": [{"fd": info["fd"], "opaque": "out"}]}]
        assert await error(vm, "remove-fd", **{"fdset-id": 9}) == \
            "File descriptor named 'fdset-id:9' not found"
        assert await vm.cmd("remove-fd", **{"fdset-id": 2}) == {}
        assert await vm.cmd("query-fdsets") == []
        os.close(r)
        os.close(w)
        # migrate fd:NAME fails at once with QEMU's text (it used to answer {}).
        assert await error(vm, "migrate", uri="fd:nosuch") == \
            "File descriptor named 'nosuch' has not been found"
        assert await error(vm, "migrate", channels=[{"channel-type": "main", "addr": {
            "transport": "socket", "type": "fd", "str": "nosuch"}}]) == \
            "File descriptor named 'nosuch' has not been found"
        assert await error(vm, "migrate", uri="file:/dev/fdset/3") == \
            "Failed to find fdset /dev/fdset/3"
        assert await error(vm, "migrate", uri="file:/dev/fdset/x") == \
            "Could not parse fdset /dev/fdset/x"
        assert await vm.cmd("query-migrate") == {}
    run(inproc, body)


@pytest.mark.timeout(60)
def test_migrate_incoming_resolves_descriptors_at_once(inproc):
    async def body():
        vm = await inproc.start("fdin", incoming="defer")
        assert await error(vm, "migrate-incoming", uri="fd:nosuch") == \
            "File descriptor named 'nosuch' has not been found"
        assert await error(vm, "migrate-incoming", uri="fd:1x") == \
            "Invalid file descriptor number '1x'"
        a, b = socket.socketpair()
        vm.qmp.send_fd_scm(a.fileno())
        await vm.cmd("add-fd", **{"fdset-id": 0})
        assert await error(vm, "migrate-incoming", uri="file:/dev/fdset/0") == \
            "Failed to find file descriptor with matching flags=0x0"
        assert (await vm.cmd("query-migrate")) == {}   # nothing started
        a.close()
        b.close()
    run(inproc, body)


@pytest.mark.timeout(60)
def test_descriptors_are_per_monitor(inproc, tmp_path):
    async def body():
        from qemu.qmp import QMPClient
        vm = await inproc.start("permon")
        r, w = os.pipe()
        vm.qmp.send_fd_scm(r)
        await vm.cmd("getfd", fdname="mine")
        other = QMPClient("other")
        await other.connect(vm.qmp_path)
        try:
            with pytest.raises(ExecuteError, match="'mine' not found"):
                await other.execute("closefd", {"fdname": "mine"})
        finally:
            await other.disconnect()
        assert await vm.cmd("closefd", fdname="mine") == {}
        os.close(r)
        os.close(w)
    run(inproc, body)
