"""QEMU's command line on real ``livemig run`` processes: QMP on ``-chardev``/``-mon``
(server, client mode, an inherited ``fd=N``), the serial port on a socket, ``-M help``,
and the exact argv QEMU's Python machine class (``python/qemu/machine/machine.py``,
``_base_args`` and ``_pre_launch``/``_post_launch``) starts its binary with.

No fixed sleeps: every wait is on output, a socket or an event, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

LIVEMIG = [sys.executable, "-m", "livemig", "run"]
GUEST = ["-m", "32M", "-accel", "soft", "-guest", "walk,start=1M,end=2M"]
DEADLINE_S = 20.0


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every livemig process a test starts; killed (by PID) if still alive at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def launch(procs: list, tmp_path: Path, *args: str, pass_fds: tuple[int, ...] = ()
           ) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"livemig-{len(procs)}.log", "wb")  # noqa: SIM115 - closed by the OS
    proc = subprocess.Popen([*LIVEMIG, *args], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, pass_fds=pass_fds)
    procs.append(proc)
    return proc


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = DEADLINE_S) -> int:
    return proc.wait(timeout=timeout)


async def wait_path(path: Path, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert proc.poll() is None, "livemig exited"
        assert time.monotonic() < end, f"{path} never appeared"
        await asyncio.sleep(0.01)


async def check_and_quit(qmp: QMPClient, proc: subprocess.Popen[bytes]) -> None:
    status = await qmp.execute("query-status")
    assert status["status"] in ("running", "prelaunch", "paused")
    assert (await qmp.execute("query-version"))["qemu"]["major"] == 10
    await qmp.execute("quit")
    with contextlib.suppress(EOFError):   # the server hangs up after quit, as QEMU's does
        await qmp.disconnect()
    assert await asyncio.to_thread(wait_exit, proc) == 0


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.timeout(60)
def test_qmp_on_a_chardev_server(procs, tmp_path: Path) -> None:
    path = tmp_path / "mon.sock"
    proc = launch(procs, tmp_path, *GUEST, "-display", "none", "-vga", "none",
                  "-chardev", f"socket,id=mon,path={path},server=on,wait=off",
                  "-mon", "chardev=mon,mode=control")

    async def main() -> None:
        await wait_path(path, proc)
        qmp = QMPClient("server")
        await asyncio.wait_for(qmp.connect(str(path)), DEADLINE_S)
        await check_and_quit(qmp, proc)
    run(main())
    assert not path.exists()          # our socket file is removed at exit


@pytest.mark.timeout(60)
def test_qmp_client_mode_unix(procs, tmp_path: Path) -> None:
    """QEMU's default server=off: livemig connects out; the test's QMPClient accepts."""
    path = tmp_path / "listen.sock"

    async def main() -> None:
        qmp = QMPClient("client-mode")
        await qmp.start_server(str(path))
        proc = launch(procs, tmp_path, *GUEST, "-chardev", f"socket,id=mon,path={path}",
                      "-mon", "chardev=mon,mode=control")
        await asyncio.wait_for(qmp.accept(), DEADLINE_S)
        await check_and_quit(qmp, proc)
    run(main())


@pytest.mark.timeout(60)
def test_qmp_client_mode_tcp_and_the_qmp_shorthand(procs, tmp_path: Path) -> None:
    """host=,port= as a client; ``-qmp tcp:H:P`` (no server=on) is the same chardev."""
    for form in ("chardev", "qmp"):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()                 # QMPClient binds it again (SO_REUSEADDR)

        async def main(form: str = form, port: int = port) -> None:
            qmp = QMPClient("tcp-client")
            await qmp.start_server(("127.0.0.1", port))
            args = (["-chardev", f"socket,id=mon,host=127.0.0.1,port={port}",
                     "-mon", "chardev=mon,mode=control"] if form == "chardev"
                    else ["-qmp", f"tcp:127.0.0.1:{port}"])
            proc = launch(procs, tmp_path, *GUEST, *args)
            await asyncio.wait_for(qmp.accept(), DEADLINE_S)
            await check_and_quit(qmp, proc)
        run(main())


@pytest.mark.timeout(60)
def test_client_mode_connect_failure_is_qemus_text(procs, tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    spec = f"socket,id=mon,path={path}"
    proc = launch(procs, tmp_path, *GUEST, "-chardev", spec, "-mon", "chardev=mon,mode=control")
    assert wait_exit(proc) == 1
    log = (tmp_path / "livemig-0.log").read_text()
    assert f"livemig: -chardev {spec}: Failed to connect to '{path}': No such file or directory" \
        in log


@pytest.mark.timeout(60)
def test_fd_listening_socket_inherited(procs, tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(path))
    lsock.listen(4)
    fd = lsock.fileno()
    proc = launch(procs, tmp_path, *GUEST, "-chardev", f"socket,id=mon,fd={fd}",
                  "-mon", "chardev=mon,mode=control", pass_fds=(fd,))
    lsock.close()

    async def main() -> None:
        qmp = QMPClient("fd-listening")
        await asyncio.wait_for(qmp.connect(str(path)), DEADLINE_S)
        await check_and_quit(qmp, proc)
    run(main())


@pytest.mark.timeout(60)
def test_qemu_machine_class_argv(procs, tmp_path: Path) -> None:
    """QEMUMachine's launch, reproduced: a socketpair, one end passed as
    ``-chardev socket,id=mon,fd=N``, the legacy ``QEMUMonitorProtocol`` on the other end
    (QEMU's tree passes ``sock=..., server=True`` then ``accept()``; qemu.qmp 0.0.6, the
    release installed here, spells the same socketpair as ``QEMUMonitorProtocol(sock)``
    and ``connect()``), a console on ``-serial chardev:console``; then ``quit`` as its
    shutdown does."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    os.set_inheritable(fd, True)
    console = tmp_path / "vm.con"
    base_args = ["-display", "none", "-vga", "none",
                 "-chardev", f"socket,id=mon,fd={fd}", "-mon", "chardev=mon,mode=control",
                 "-chardev", f"socket,id=console,path={console},server=on,wait=off",
                 "-serial", "chardev:console"]
    proc = launch(procs, tmp_path, *base_args, *GUEST, pass_fds=(fd,))
    theirs.close()                                    # _post_launch closes its copy
    qmp = QEMUMonitorProtocol(ours, nickname="vm")
    try:
        qmp.settimeout(DEADLINE_S)
        qmp.connect()
        assert qmp.cmd("query-status")["status"] == "running"
        # console_socket.ConsoleSocket connects to the console path after launch.
        con = socket.socket(socket.AF_UNIX)
        end = time.monotonic() + DEADLINE_S
        while True:
            try:
                con.connect(str(console))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < end
                time.sleep(0.01)
        con.settimeout(DEADLINE_S)
        assert con.recv(1) in (b"B", b".")            # the walk's marks, as they are written
        con.close()
        assert qmp.cmd("quit") == {}
    finally:
        with contextlib.suppress(EOFError):   # as QEMUMachine._close_qmp_connection
            qmp.close()
    assert wait_exit(proc) == 0


@pytest.mark.timeout(60)
def test_serial_unix_server_streams_the_walk(procs, tmp_path: Path) -> None:
    """-serial unix:PATH,server=on,wait=off: a client reads 'A' (the boot; the VM waits
    in -S until the client is in) then 'B' marks as the guest writes them."""
    path = tmp_path / "serial.sock"
    mon = tmp_path / "mon.sock"
    proc = launch(procs, tmp_path, *GUEST, "-S",
                  "-serial", f"unix:{path},server=on,wait=off",
                  "-qmp", f"unix:{mon},server=on,wait=off")

    async def main() -> None:
        await wait_path(mon, proc)
        await wait_path(path, proc)
        reader, writer = await asyncio.open_unix_connection(str(path))
        qmp = QMPClient("serial")
        await asyncio.wait_for(qmp.connect(str(mon)), DEADLINE_S)
        await qmp.execute("cont")
        data = b""
        while b"B" not in data:
            chunk = await asyncio.wait_for(reader.read(64), DEADLINE_S)
            assert chunk, "serial EOF"
            data += chunk
        assert set(data) <= set(b"AB.")
        writer.close()
        await check_and_quit(qmp, proc)
    run(main())
    assert not path.exists()


@pytest.mark.timeout(60)
def test_serial_wait_on_holds_the_vm_until_the_client(procs, tmp_path: Path) -> None:
    """server=on alone (wait=on): livemig prints QEMU's info line and waits; the client
    then sees the boot's 'A' first."""
    path = tmp_path / "serial.sock"
    proc = launch(procs, tmp_path, *GUEST, "-serial", f"unix:{path},server=on")
    log = tmp_path / "livemig-0.log"
    end = time.monotonic() + DEADLINE_S
    while "QEMU waiting for connection on" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < end
        time.sleep(0.01)
    assert (f"livemig: -serial unix:{path},server=on: info: QEMU waiting for connection on: "
            f"disconnected:unix:{path},server=on") in log.read_text()
    con = socket.socket(socket.AF_UNIX)
    con.connect(str(path))
    con.settimeout(DEADLINE_S)
    assert con.recv(1) == b"A"
    con.close()
    proc.terminate()
    assert wait_exit(proc) == 0


@pytest.mark.timeout(60)
def test_help_version_and_refusals(procs, tmp_path: Path) -> None:
    def out(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LIVEMIG, *args], capture_output=True, text=True,
                              timeout=DEADLINE_S)
    for option in ("-M", "-machine"):
        r = out(option, "help")
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "Supported machines are:"
        assert "livemig-pc-10.0      livemig PC" in r.stdout and "(default)" in r.stdout
    r = out("-M", "bogus")
    assert r.returncode == 1 and r.stderr == (
        'livemig: unsupported machine type: "bogus"\n'
        "Use -machine help to list supported machines\n")
    r = out("-version")
    assert r.returncode == 0 and r.stdout.startswith("QEMU emulator version 10.0.2 (livemig ")
    r = out("-accel", "help")
    assert r.returncode == 0 and r.stdout.startswith("Accelerators supported in QEMU binary:\n")
    r = out("-smp", "2")
    assert r.returncode == 1 and r.stderr == (
        "livemig: Invalid SMP CPUs 2. The max CPUs supported by machine 'livemig-pc-10.0' "
        "is 1\n")
    r = out("-serial", "chardev:nope")
    assert r.returncode == 1 and "could not connect serial device to character backend " \
        "'chardev:nope'" in r.stderr
