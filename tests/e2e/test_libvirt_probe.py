"""What libvirt's capability probe and domain start need, with real processes:
``-daemonize`` (the first process exits 0 only once the daemon's pidfile is
written and its monitor listens; 1 when the daemon fails), ``-pidfile``
(locked, removed at exit), ``-machine none`` (no vCPU, answers QMP), the
management queries (qmp/manager.py) side by side with QEMU 10.0.2 where it is
installed, a memory backend as the guest RAM, and system_reset."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

QEMU = shutil.which("qemu-system-x86_64")
LIVEMIG = [sys.executable, "-m", "livemig", "run"]


async def _qmp(sock: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    client = QMPClient("probe")
    await client.connect(sock)
    out: list[Any] = []
    try:
        for name, args in commands:
            try:
                out.append(await client.execute(name, args))
            except ExecuteError as exc:
                out.append((exc.error_class, str(exc)))
            except EOFError:            # quit: the VM may close before its reply
                if name != "quit":
                    raise
                out.append(None)
    finally:
        try:
            await client.disconnect()
        except EOFError:            # after quit
            pass
    return out


def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: the daemon's parent is init, which reaps it later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def qmp(sock: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    return asyncio.run(_qmp(sock, *commands))


def probe(tmp_path, argv0: list[str], name: str) -> tuple[subprocess.CompletedProcess, str, str]:  # type: ignore[no-untyped-def]
    sock, pid = str(tmp_path / f"{name}.sock"), str(tmp_path / f"{name}.pid")
    done = subprocess.run([*argv0, "-S", "-no-user-config", "-nodefaults", "-nographic",
                           "-machine", "none,accel=kvm:tcg",
                           "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", pid,
                           "-daemonize"], capture_output=True, text=True, timeout=60)
    return done, sock, pid


def _quit(sock: str, pidfile: str) -> None:
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        qmp(sock, ("quit", None))
    except Exception:
        os.kill(pid, 9)
    wait_until(lambda: gone(pid), timeout=20, what="the daemon's exit")


@pytest.mark.timeout(120)
def test_daemonize_pidfile_and_machine_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done, sock, pidfile = probe(tmp_path, LIVEMIG, "lm")
    # The first process has exited: the pidfile is there and the monitor answers.
    assert done.returncode == 0, done.stderr
    with open(pidfile) as f:
        pid = int(f.read())
    assert pid != os.getpid() and os.path.exists(f"/proc/{pid}")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) == 1 or int(fields[1]) != done.returncode   # reparented
    assert int(fields[3]) != pid            # a session member, not its leader
    status, cpus, hotplug, kvm = qmp(sock, ("query-status", None), ("query-cpus-fast", None),
                                     ("query-hotpluggable-cpus", None), ("query-kvm", None))
    assert status == {"status": "prelaunch", "running": False}
    assert cpus == [] and hotplug == []     # the empty machine has no vCPU
    # A second VM on the same pidfile fails: the first holds its lock.
    second = subprocess.run([*LIVEMIG, "-machine", "none", "-pidfile", pidfile],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "cannot create PID file: Cannot lock pid file" in second.stderr
    _quit(sock, pidfile)
    assert not os.path.exists(pidfile) and not os.path.exists(sock)


@pytest.mark.timeout(60)
def test_daemon_failure_is_the_first_process_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([*LIVEMIG, "-daemonize", "-m", "1", "-qmp",
                           f"unix:{tmp_path}/x.sock,server=on,wait=off"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "beyond guest RAM" in done.stderr
    bad = subprocess.run([*LIVEMIG, "-machine", "none", "-pidfile", "/nonexistent/x.pid"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("livemig: cannot create PID file: Could not create "
                                  "'/nonexistent/x.pid': No such file or directory")


PROBE = [("qom-list-properties", {"typename": "none-machine"}),
         ("qom-list-properties", {"typename": "memory-backend-ram"}),
         ("qom-list-properties", {"typename": "memory-backend-file"}),
         ("qom-list-properties", {"typename": "memory-backend-memfd"}),
         ("qom-list-properties", {"typename": "max-x86_64-cpu"}),
         ("qom-list-properties", {"typename": "nope"}),
         ("device-list-properties", {"typename": "nope"}),
         ("device-list-properties", {"typename": "none-machine"}),
         ("qom-list", {"path": "/nope"}), ("qom-get", {"path": "/machine", "property": "nope"}),
         ("qom-list-types", {"implements": "nope"}), ("query-cpus-fast", None),
         ("query-iothreads", None), ("query-block", None),
         ("query-named-block-nodes", {"flat": True})]


@pytest.mark.timeout(120)
def test_probe_answers_beside_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done, sock, pidfile = probe(tmp_path, LIVEMIG, "lm")
    assert done.returncode == 0, done.stderr
    try:
        ours = qmp(sock, *PROBE, ("qom-list-types", None))
    finally:
        _quit(sock, pidfile)
    types = {t["name"] for t in ours[-1]}
    for listed in ("none-machine", "livemig-pc-10.0-machine", "max-x86_64-cpu", "accel",
                   "memory-backend-ram", "memory-backend-file", "memory-backend-memfd",
                   "secret", "authz-simple"):
        assert listed in types, listed
    # Every type libvirt 9.0 asks qom-list-properties about is one livemig lists.
    for answer in ours[:5]:
        assert isinstance(answer, list) and {"name": "type", "type": "string"} in answer
    size = [p for p in ours[1] if p["name"] == "size"]
    assert size and size[0]["type"] == "int"
    if QEMU is None:
        return
    done, qsock, qpid = probe(tmp_path, [QEMU], "qemu")
    assert done.returncode == 0, done.stderr
    try:
        theirs = qmp(qsock, *PROBE)
    finally:
        _quit(qsock, qpid)
    # The refusals, the empty machine's answers: QEMU's, class and text.
    assert ours[5:len(PROBE) - 4] == theirs[5:len(PROBE) - 4]
    assert ours[len(PROBE) - 4:len(PROBE)] == theirs[len(PROBE) - 4:len(PROBE)]


@pytest.mark.timeout(120)
def test_memory_backend_is_the_guest_ram_and_reset_restarts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock, serial = str(tmp_path / "vm.sock"), str(tmp_path / "serial")
    proc = subprocess.Popen([*LIVEMIG, "-accel", "tcg", "-machine",
                             "livemig-pc,memory-backend=mem0", "-object",
                             '{"qom-type":"memory-backend-memfd","id":"mem0","size":67108864}',
                             "-guest", "walk,start=1M,end=4M,rate=2000",
                             "-qmp", f"unix:{sock},server=on,wait=off",
                             "-serial", f"file:{serial}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(sock), timeout=30, what="the monitor")
        wait_until(lambda: b"A" in open(serial, "rb").read(), timeout=30, what="the guest's A")
        maps = open(f"/proc/{proc.pid}/maps").read()
        assert "memfd:mem0" in maps           # the guest RAM is the backend's memfd
        in_use, reset, status = qmp(sock, ("object-del", {"id": "mem0"}),
                                    ("system_reset", None), ("query-status", None))
        assert in_use == ("GenericError", "object 'mem0' is in use, can not be deleted")
        assert reset == {} and status == {"status": "running", "running": True}
        wait_until(lambda: open(serial, "rb").read().count(b"A") == 2, timeout=30,
                   what="the restarted guest's A")
        qmp(sock, ("quit", None))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
