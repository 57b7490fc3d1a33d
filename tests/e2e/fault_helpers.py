"""Helpers for the fault, hostile-stream, QMP-hardening, two-host and soak tests.

The contract these tests check: *a failed migration costs nothing*. The source
ends ``failed`` or ``cancelled`` with an ``error-desc`` naming the cause, its
guest runs again (or stays as it was) with its memory intact, and a new
migration to a fresh destination then succeeds; the destination reports the
error and never runs a half-loaded guest.

What this module gives a test:

* :class:`Fleet` (fixture ``fleet``): starts ``livemig run`` processes (soft
  accelerator, small RAM), optionally inside a network namespace, and kills
  (by PID) whatever outlives the test.
* the contract checks: :func:`assert_source_survived`,
  :func:`assert_destination_failed`.
* scripted peers: :class:`FakeDestination` (reads the stream with
  ``livemig.wire``, answers on the return path with chosen bytes),
  :class:`CutProxy` (a TCP relay that cuts, resets, freezes or closes the
  return path), :class:`SynBlackhole` (a listener whose accept queue is full,
  so ``connect()`` hangs and the source stays in ``setup``).
* :class:`RawQmp`: a QMP client that writes raw bytes.
* :func:`stream_records`: a captured stream cut into records with offsets,
  for stream surgery.
* :class:`TwoHosts`: two network namespaces joined by a veth pair.

Nothing here sleeps "long enough": waits for events and the states they
announce block on ``qemu.qmp`` event listeners (``e2e_helpers``; every VM of
a :class:`Fleet` has ``events`` on); the rest polls a condition with a
deadline. Everything started here is ended by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from e2e_helpers import (  # noqa: F401 - re-exported for the tests
    PAGE,
    WALK_END,
    WALK_START,
    accel_digest,
    events_enabled,
    find_event,
    runstate,
    wait_blocked_in_send,
    wait_event,
    wait_exited,
    wait_guest_runs,
    wait_migration_status,
    wait_runstate,
    wait_until,
    wait_walking,
    walk_problems_of,
)

from livemig.cli.driver import TERMINAL, Vm, VmSpec
from livemig.machine.guest import parse_size
from livemig.wire import (
    NEED_DATA,
    Closed,
    Command,
    MigCmd,
    PayloadKind,
    StreamDecoder,
    StreamError,
    encode_pong,
)

RAM = "64M"
MACHINE_TYPE = "livemig-pc-10.0"
# A VFIO-like device; small so migrations stay fast. No dirty rate: its memory
# never changes on the source, so its digest before and after a failure must match.
ACCEL = "accel,id=acc0,size=4M,init-size=512K,prepare-ms=50"
# A guest paced far below any link here (2500 pages/s, 10 MB/s): a live
# migration of it converges whatever the load (see CERTAIN_SWITCHOVER_BW for
# the free-running walk).
PACED_WALK = 2500
RP = {"return-path": True}
ACK = {"return-path": True, "switchover-ack": True}
EVENTS = {"events": True}

# Payload framing of each section of a livemig source (for decoding its stream).
SOURCE_KINDS = {"ram": PayloadKind.RAM, "acc0/accel": PayloadKind.TAGGED,
                "cpu": PayloadKind.BLOB, "globalstate": PayloadKind.GLOBALSTATE}

# What a Python traceback looks like in a process's stderr.
TRACEBACK = "Traceback (most recent call last)"


# -- VM processes ----------------------------------------------------------------------------

class NsVm(Vm):
    """A :class:`Vm` whose process runs inside network namespace ``netns``.

    ``ip netns exec`` execs the command, so the PID is the VM's own. The QMP
    socket is a path in the shared file system, reachable from any namespace.
    """

    netns: str | None = None

    def argv(self) -> list[str]:
        base = super().argv()
        return ["ip", "netns", "exec", self.netns, *base] if self.netns else base


class Fleet:
    """Starts the VM processes of one test; none outlives it (killed by PID)."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.vms: list[Vm] = []

    async def start(self, name: str, *, ram: str = RAM, walk_end: str = WALK_END,
                    incoming: str | None = None, paused: bool = False,
                    devices: tuple[str, ...] | list[str] = (), extra: list[str] | None = None,
                    walk_rate: int | None = None, netns: str | None = None) -> Vm:
        spec = VmSpec(engine="livemig", name=name, ram=ram, accel="soft", walk_end=walk_end,
                      walk_rate=walk_rate, incoming=incoming, paused=paused,
                      devices=list(devices), extra=list(extra or []))
        cls: type[Vm] = Vm
        if netns is not None:
            cls = type(f"NsVm_{netns}", (NsVm,), {"netns": netns})
        vm = await cls.start(spec, self.workdir, timeout=20)
        self.vms.append(vm)
        return vm

    async def source(self, name: str = "src", *, devices=(ACCEL,), caps: dict | None = None,
                     netns: str | None = None, **kw: Any) -> Vm:
        """A running source with ``events`` on, bandwidth unlimited, guest walking."""
        src = await self.start(name, devices=devices, netns=netns, **kw)
        await src.set_caps(**{**EVENTS, **(caps or {})})
        await src.set_params(max_bandwidth=0)
        await wait_walking(src)
        return src

    async def destination(self, name: str = "dst", *, devices=(ACCEL,),
                          caps: dict | None = None, paused: bool = True,
                          netns: str | None = None, **kw: Any) -> Vm:
        """A ``-incoming defer`` destination (``-S`` unless told), ``events`` on."""
        dst = await self.start(name, devices=devices, incoming="defer", paused=paused,
                               netns=netns, **kw)
        await dst.set_caps(**{**EVENTS, **(caps or {})})
        return dst

    async def close_all(self) -> None:
        for vm in self.vms:
            try:
                await asyncio.wait_for(vm.close(timeout=5), 10)
            except Exception:  # noqa: BLE001 - killed below
                vm.kill()

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()


def fleet_for(tmp_path) -> Iterator[Fleet]:
    """Body of each test module's ``fleet`` fixture: ``yield from fleet_for(tmp_path)``."""
    launcher = Fleet(str(tmp_path))
    try:
        yield launcher
    finally:
        launcher.kill_all()


def run_with(fleet: Fleet, body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``body()`` on a fresh event loop; quit the fleet's VMs afterwards."""
    async def main() -> Any:
        try:
            return await body()
        finally:
            await fleet.close_all()
    return asyncio.run(main())


# -- waiting -----------------------------------------------------------------------------------

async def wait_terminal(vm: Vm, timeout: float = 30.0) -> dict:
    """``query-migrate`` once its status is completed, failed or cancelled."""
    return await wait_migration_status(vm, TERMINAL, timeout=timeout)


async def wait_status(vm: Vm, goal: str, timeout: float = 20.0) -> dict:
    """``query-migrate`` once ``status`` is ``goal``; fail at once on a terminal one."""
    return await wait_migration_status(vm, goal, timeout=timeout, stop_at=TERMINAL,
                                       poll=0.005)


async def wait_transferred(vm: Vm, nbytes: int, timeout: float = 20.0) -> dict:
    """Wait until the source has sent ``nbytes`` (so the stream is really flowing)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.cmd("query-migrate")
        if info.get("ram", {}).get("transferred", 0) >= nbytes:
            return info
        if info.get("status") in TERMINAL:
            raise AssertionError(f"{vm.spec.name}: migration ended early: {info}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.spec.name}: only {info.get('ram', {}).get('transferred')}"
                               f" bytes sent, waiting for {nbytes}")
        await asyncio.sleep(0.01)


async def assert_stays(vm: Vm, status: str, seconds: float, poll: float = 0.02) -> None:
    """``query-migrate`` reports ``status`` now and no ``MIGRATION`` event comes for
    ``seconds`` (a held phase: the hold *is* the assertion, so this one wait is
    on time by design). Without ``events`` it polls the status instead."""
    with vm.qmp.listener("MIGRATION") as listener:
        info = await vm.cmd("query-migrate")
        assert info.get("status") == status, f"{vm.spec.name}: not {status}: {info}"
        if await events_enabled(vm):
            try:
                ev = await asyncio.wait_for(listener.get(), seconds)
            except TimeoutError:
                ev = None
            assert ev is None, f"{vm.spec.name}: left {status}: {dict(ev)}"
            info = await vm.cmd("query-migrate")
            assert info.get("status") == status, f"{vm.spec.name}: left {status}: {info}"
            return
    deadline = time.monotonic() + seconds
    while True:
        info = await vm.cmd("query-migrate")
        assert info.get("status") == status, f"{vm.spec.name}: left {status}: {info}"
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(poll)


def migration_trace(vm: Vm) -> list[str]:
    """``MIGRATION`` statuses, ``STOP`` and ``RESUME``, in order."""
    out = []
    for ev in vm.events:
        if ev["event"] == "MIGRATION":
            out.append(ev["data"]["status"])
        elif ev["event"] in ("STOP", "RESUME"):
            out.append(ev["event"])
    return out


# -- the guest -----------------------------------------------------------------------------------

def ram_bytes(vm: Vm) -> int:
    return parse_size(vm.spec.ram, default_unit="m")


async def walk_problems(vm: Vm) -> list[str]:
    """The RAM pattern check, on a stopped guest (restarted after if it ran)."""
    was_running = await runstate(vm) == "running"
    if was_running:
        await vm.cmd("stop")
    try:
        end = parse_size(vm.spec.walk_end, default_unit="")
        return walk_problems_of(await vm.pmem(0, end), vm.spec.walk_end)
    finally:
        if was_running:
            await vm.cmd("cont")


def assert_no_traceback(vm: Vm) -> None:
    text = vm.stderr_text()
    assert TRACEBACK not in text, f"{vm.spec.name} printed a traceback:\n{text[-3000:]}"


# -- migration steps -----------------------------------------------------------------------------

async def start_incoming(dst: Vm, uri: str = "tcp:127.0.0.1:0", *,
                         exit_on_error: bool | None = False) -> str:
    """``migrate-incoming`` and the URI the source must use (the real port for ``:0``)."""
    args: dict[str, Any] = {"uri": uri}
    if exit_on_error is not None:
        args["exit-on-error"] = exit_on_error
    await dst.cmd("migrate-incoming", **args)
    if not uri.startswith("tcp:"):
        return uri
    addr = (await dst.cmd("query-migrate"))["socket-address"][0]
    return f"tcp:{addr['host']}:{addr['port']}"


def incoming_port(uri: str) -> tuple[str, int]:
    host, _, port = uri.removeprefix("tcp:").rpartition(":")
    return host, int(port)


async def assert_same_guest(src: Vm, dst: Vm, devices: bool) -> None:
    """The stopped source's RAM (and device) equals the never-run destination's."""
    # The source enters postmigrate just after its completed status (as QEMU:
    # migration_iteration_finish), with no event of its own: wait for the state.
    await wait_runstate(src, "postmigrate")
    assert await runstate(src) == "postmigrate"
    a, b = await src.pmem(0, ram_bytes(src)), await dst.pmem(0, ram_bytes(dst))
    if a != b:
        pa = np.frombuffer(a, np.uint8).reshape(-1, PAGE)
        pb = np.frombuffer(b, np.uint8).reshape(-1, PAGE)
        bad = np.flatnonzero((pa != pb).any(axis=1))
        raise AssertionError(f"{bad.size} pages differ, first {bad[:8].tolist()}")
    assert walk_problems_of(b, dst.spec.walk_end) == []
    if devices:
        assert await accel_digest(src) == await accel_digest(dst)


# For a migration that must complete whatever the machine's load: the bandwidth
# the switchover decision assumes (QEMU 8.2+'s avail-switchover-bandwidth; the
# link itself stays unlimited). The free-running walk re-dirties its 15 MiB every
# few ms, so with the *measured* bandwidth completion needs the link to move
# 15 MiB within the 300 ms downtime limit: a race the load can lose. Assuming
# 1 GiB/s, the remaining pages (at most the 64 MiB of RAM plus the device) fit
# the budget after the first pass, so the migration completes then; the guest
# runs and dirties until the switchover as usual.
CERTAIN_SWITCHOVER_BW = 1 << 30


async def let_it_complete(src: Vm) -> None:
    """Unlimited bandwidth, and a switchover decision that cannot lose the race."""
    await src.set_params(max_bandwidth=0, avail_switchover_bandwidth=CERTAIN_SWITCHOVER_BW)


async def migrate_to_fresh_destination(fleet: Fleet, src: Vm, *, devices=(ACCEL,),
                                       caps: dict | None = None, name: str = "fresh",
                                       netns: str | None = None,
                                       host: str = "127.0.0.1") -> None:
    """A new migration to a new destination completes, byte exact."""
    dst = await fleet.destination(name, devices=devices, caps=caps, netns=netns)
    await let_it_complete(src)
    if caps:
        await src.set_caps(**caps)
    uri = await start_incoming(dst, f"tcp:{host}:0")
    await src.cmd("migrate", uri=uri)
    info = await wait_terminal(src, timeout=60)
    await src.set_params(avail_switchover_bandwidth=0)
    assert info["status"] == "completed", info
    assert (await wait_terminal(dst))["status"] == "completed"
    await assert_same_guest(src, dst, devices=bool(devices))


async def assert_source_survived(fleet: Fleet, src: Vm, *, status: str, cause: str | None,
                                 digest: str | None = None, devices=(ACCEL,),
                                 caps: dict | None = None, again: bool = True,
                                 timeout: float = 30.0, **again_kw: Any) -> dict:
    """The source half of the contract; returns the final ``query-migrate``.

    ``cause``: a regular expression the ``error-desc`` must match (None: no check).
    ``digest``: the accel device's digest before the migration (memory intact).
    ``again``: then migrate to a fresh destination, which must succeed.
    """
    info = await wait_terminal(src, timeout=timeout)
    assert info["status"] == status, info
    if cause is not None:
        assert re.search(cause, info.get("error-desc", "")), info
    await wait_runstate(src, "running")
    await wait_guest_runs(src)
    assert await walk_problems(src) == []
    if digest is not None:
        assert await accel_digest(src) == digest
    assert_no_traceback(src)
    if again:
        await migrate_to_fresh_destination(fleet, src, devices=devices, caps=caps, **again_kw)
    return info


async def assert_destination_failed(dst: Vm, cause: str | None, timeout: float = 20.0) -> dict:
    """The destination half: ``failed`` with the reason, guest never run, no traceback."""
    info = await wait_terminal(dst, timeout=timeout)
    assert info["status"] == "failed", info
    desc = info.get("error-desc", "")
    assert desc.startswith("load of migration failed: "), info
    if cause is not None:
        assert re.search(cause, desc), info
    assert await runstate(dst) == "inmigrate"
    assert find_event(dst, "RESUME") is None
    assert dst.serial_bytes() == b""          # the guest never wrote its 'A'
    assert_no_traceback(dst)
    return info


async def qmp_error(vm: Vm, command: str, **args: Any) -> str:
    """Run a command that must fail; return its ``desc``."""
    from qemu.qmp import ExecuteError
    try:
        result = await vm.cmd(command, **args)
    except ExecuteError as err:
        return str(err)
    raise AssertionError(f"{command} {args} succeeded: {result!r}")


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- scripted peers --------------------------------------------------------------------------------

class FakeDestination:
    """A destination written in Python: reads the stream, writes chosen return-path bytes.

    Listens on 127.0.0.1 (ephemeral port) and accepts one connection. A reader
    thread decodes the stream with ``livemig.wire.StreamDecoder`` and calls
    ``script(self, event)`` for every event; the script answers with
    :meth:`send` (bytes made by ``livemig.wire`` encoders, or raw bytes) or
    :meth:`close_return_path`. It never sends SWITCHOVER_ACK or SHUT unless
    the script does. When the stream breaks, it keeps draining until EOF.
    """

    def __init__(self, script: Callable[[FakeDestination, Any], None],
                 kinds: dict[str, PayloadKind] | None = None) -> None:
        self.script = script
        self.kinds = kinds or SOURCE_KINDS
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.received = 0
        self.commands: list[MigCmd] = []
        self.decode_error: StreamError | None = None
        self.eof = threading.Event()
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fake-destination", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.conn = conn
        self.connected.set()
        dec = StreamDecoder(self.kinds)
        buf = bytearray(1 << 20)
        try:
            while True:
                try:
                    n = conn.recv_into(buf)
                except OSError:
                    n = 0
                self.received += n
                if self.decode_error is None:
                    try:
                        dec.receive_data(bytes(buf[:n]))
                        while (ev := dec.next_event()) is not NEED_DATA:
                            if isinstance(ev, Command):
                                self.commands.append(ev.cmd)
                            self.script(self, ev)
                            if isinstance(ev, Closed):
                                break
                    except StreamError as exc:
                        self.decode_error = exc
                if n == 0:
                    return
        finally:
            self.eof.set()

    def send(self, data: bytes) -> None:
        with self._lock:
            if self.conn is not None:
                with contextlib.suppress(OSError):
                    self.conn.sendall(data)

    def close_return_path(self) -> None:
        """Half-close: no more return-path bytes (the source reads EOF); the stream flows on."""
        with self._lock:
            if self.conn is not None:
                with contextlib.suppress(OSError):
                    self.conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
        self._thread.join(5)


def answer_pings(fake: FakeDestination, ev: Any) -> bool:
    """Reply PONG to MIG_CMD_PING, as a destination does; True if ``ev`` was a PING."""
    if isinstance(ev, Command) and ev.cmd == MigCmd.PING:
        fake.send(encode_pong(int.from_bytes(ev.payload, "big")))
        return True
    return False


class CutProxy:
    """A TCP relay, source -> proxy -> destination, that a test can break.

    ``cut("fin")`` closes both connections (each peer reads EOF), ``cut("rst")``
    resets them; ``freeze()`` stops relaying in both directions without closing
    anything (a dead link: no FIN, no RST, no data); ``close_return_path()``
    stops relaying destination -> source and half-closes toward the source
    (the source's return path ends early, the stream still flows).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up_bytes = 0            # source -> destination
        self.down_bytes = 0          # destination -> source
        self._src: socket.socket | None = None
        self._dst: socket.socket | None = None
        self._frozen = threading.Event()
        self._down_closed = threading.Event()
        self._closed = threading.Event()
        self.connected = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        try:
            src, _ = self.listener.accept()
            dst = socket.create_connection(self.target, timeout=10)
            dst.settimeout(None)
        except OSError:
            return
        self._src, self._dst = src, dst
        self.connected.set()
        for name, a, b, up in (("up", src, dst, True), ("down", dst, src, False)):
            t = threading.Thread(target=self._pump, args=(a, b, up), name=f"proxy-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, a: socket.socket, b: socket.socket, up: bool) -> None:
        buf = bytearray(256 * 1024)
        while not self._closed.is_set():
            if self._frozen.is_set() or (not up and self._down_closed.is_set()):
                self._closed.wait(0.05)
                continue
            try:
                n = a.recv_into(buf)
                if n == 0:
                    if not self._closed.is_set():      # pass the peer's EOF on
                        with contextlib.suppress(OSError):
                            b.shutdown(socket.SHUT_WR)
                    return
                if self._frozen.is_set() or (not up and self._down_closed.is_set()):
                    continue         # the link died with these bytes in flight
                b.sendall(memoryview(buf)[:n])
            except OSError:
                return
            if up:
                self.up_bytes += n
            else:
                self.down_bytes += n

    def wait_connected(self, timeout: float = 10.0) -> None:
        assert self.connected.wait(timeout), "nobody connected to the proxy"

    def freeze(self) -> None:
        self._frozen.set()

    def close_return_path(self) -> None:
        self._down_closed.set()
        if self._src is not None:
            with contextlib.suppress(OSError):
                self._src.shutdown(socket.SHUT_WR)

    def cut(self, how: str = "fin") -> None:
        """Close both connections: ``fin`` (orderly, EOF) or ``rst`` (reset)."""
        self._closed.set()
        socks = [s for s in (self._src, self._dst) if s is not None]
        for s in socks:
            with contextlib.suppress(OSError):
                if how == "rst":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
                    s.shutdown(socket.SHUT_RD)     # wakes the pumps, sends nothing
                else:
                    s.shutdown(socket.SHUT_RDWR)
        # close() only once no pump is inside recv(): a close under a blocked
        # recv() would not release the socket (and send no RST) until it returns.
        for t in self._threads[1:]:
            t.join(5)
        for s in socks:
            s.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in (self._src, self._dst):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self._threads:
            t.join(5)


_BLACKHOLE = r"""
import signal, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(0)
filler = socket.create_connection(l.getsockname(), timeout=5)   # the accept queue is now full
print(l.getsockname()[1], flush=True)
signal.pause()
"""


class SynBlackhole:
    """A listening process that never accepts and whose accept queue is full.

    Linux drops a SYN to a listener with a full accept queue, so a client's
    ``connect()`` hangs (SYN retransmits at 1, 3, 7... s): a source migrating
    here stays in ``setup``. Once the process is killed, the next SYN
    retransmit is refused (ECONNREFUSED).
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _BLACKHOLE], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.strip():
            self.kill()
            raise RuntimeError("blackhole listener did not start")
        self.port = int(line)

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- raw QMP -------------------------------------------------------------------------------------

class RawQmp:
    """A QMP client on the VM's UNIX socket that sends raw bytes (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict | None = None

    @classmethod
    async def connect(cls, path: str, *, negotiate: bool = True) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
        qmp = cls(reader, writer)
        qmp.greeting = await qmp.recv()
        if negotiate:
            assert await qmp.execute("qmp_capabilities") == {"return": {}}
        return qmp

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> dict:
        """The next message that is not an event."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("QMP server closed the connection")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    async def execute(self, name: str, arguments: Any = None, **extra: Any) -> dict:
        req: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            req["arguments"] = arguments
        await self.send(json.dumps(req).encode() + b"\n")
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- streams ---------------------------------------------------------------------------------------

@dataclass
class Record:
    """One decoder event of a stream and the bytes it came from: ``raw[start:end]``."""

    event: Any
    start: int
    end: int

    @property
    def kind(self) -> str:
        return type(self.event).__name__


def stream_records(raw: bytes, kinds: dict[str, PayloadKind]) -> list[Record]:
    """Cut a valid stream into records with offsets (raises StreamError if invalid)."""
    dec = StreamDecoder(kinds)
    dec.receive_data(raw)
    dec.receive_data(b"")
    out = []
    while True:
        start = dec.offset
        ev = dec.next_event()
        if isinstance(ev, Closed):
            return out
        assert ev is not NEED_DATA
        out.append(Record(ev, start, dec.offset))


def proc_rss_kib(pid: int) -> int | None:
    """Current resident set (VmRSS) of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- two hosts ---------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=10)


class TwoHosts:
    """Namespaces ``<tag>a`` (10.200.0.1/24) and ``<tag>b`` (10.200.0.2/24) joined by a veth.

    Only namespaces and links this object creates are touched; :meth:`destroy`
    deletes them (the VMs inside must have been ended first).
    """

    A_ADDR = "10.200.0.1"
    B_ADDR = "10.200.0.2"

    def __init__(self) -> None:
        tag = f"lm{os.getpid() % 100000}x{int(time.monotonic() * 1000) % 1000}"
        self.ns_a, self.ns_b = f"{tag}a", f"{tag}b"
        self.veth_a, self.veth_b = f"{tag}a"[:15], f"{tag}b"[:15]
        self.shaping = "none"
        self.delay_ms = 0.0

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "needs root to create network namespaces"
        probe = f"lmprobe{os.getpid()}"
        try:
            r = _ip("netns", "add", probe, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run ip: {exc}"
        if r.returncode:
            return f"ip netns add failed: {r.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    def create(self) -> None:
        try:
            _ip("netns", "add", self.ns_a)
            _ip("netns", "add", self.ns_b)
            _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
            _ip("link", "set", self.veth_a, "netns", self.ns_a)
            _ip("link", "set", self.veth_b, "netns", self.ns_b)
            for ns, dev, addr in ((self.ns_a, self.veth_a, self.A_ADDR),
                                  (self.ns_b, self.veth_b, self.B_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise

    def shape(self, rate: str = "1gbit", delay_ms: float = 10.0) -> str:
        """Shape both directions: netem rate+delay, else tbf rate only (netem missing)."""
        kinds = []
        for ns, dev in ((self.ns_a, self.veth_a), (self.ns_b, self.veth_b)):
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                                "root", "netem", "delay", f"{delay_ms}ms", "rate", rate],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                kinds.append("netem")
                continue
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                                "root", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms"],
                               capture_output=True, text=True, timeout=10)
            kinds.append("tbf" if r.returncode == 0 else "none")
        self.shaping = "+".join(sorted(set(kinds)))
        self.delay_ms = delay_ms if kinds == ["netem", "netem"] else 0.0
        return self.shaping

    def cut(self) -> None:
        """The link dies: B's end goes down (A's loses carrier; no FIN, no RST)."""
        _ip("-n", self.ns_b, "link", "set", self.veth_b, "down")

    def restore(self, timeout: float = 10.0) -> None:
        """The link is back: B's end up, carrier on both ends, stale ARP failures gone."""
        _ip("-n", self.ns_b, "link", "set", self.veth_b, "up")
        deadline = time.monotonic() + timeout
        for ns, dev in ((self.ns_a, self.veth_a), (self.ns_b, self.veth_b)):
            while "LOWER_UP" not in _ip("-n", ns, "link", "show", dev).stdout:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{dev} in {ns} has no carrier")
                time.sleep(0.02)
            _ip("-n", ns, "neigh", "flush", "dev", dev, check=False)

    def destroy(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.veth_a, check=False)

    def __enter__(self) -> TwoHosts:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
