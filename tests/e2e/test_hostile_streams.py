"""Hostile streams into ``migrate-incoming``: a clear, typed error, never a traceback,
a hang or a memory blow-up; the destination's guest never runs.

Two layers:

* end to end: a real ``livemig run -incoming defer`` destination; the test
  connects to its migration socket itself and writes bytes made with
  ``livemig.wire``'s encoders, or surgery on a real captured stream (a
  ``file:`` migration of a stopped source). Unless the case is about the
  stream ending, the connection stays open: the error must come without EOF.
* in process, under hypothesis: the destination engine (``IncomingState``,
  handlers included, not only the decoder that tests/unit fuzzes) fed
  mutations of a real stream, and the source's return-path reader fed random
  bytes; only the engine's own clean failure paths may be taken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import (
    MACHINE_TYPE,
    TRACEBACK,
    Fleet,
    assert_destination_failed,
    fleet_for,
    free_tcp_port,
    incoming_port,
    proc_rss_kib,
    run_with,
    runstate,
    start_incoming,
    stream_records,
    wait_terminal,
    wait_until,
    wait_walking,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.machine import Machine, MachineConfig
from livemig.machine.runstate import RunState
from livemig.migration.destination import IncomingState
from livemig.migration.return_path import SourceReturnPath
from livemig.migration.source import MigrationState
from livemig.migration.status import MigrationStatus as S
from livemig.qapi.capabilities import Capabilities
from livemig.qapi.parameters import Parameters
from livemig.transport import Channel
from livemig.wire import (
    MigCmd,
    PayloadKind,
    SectionType,
    encode_blob,
    encode_command,
    encode_eof,
    encode_footer,
    encode_global_state,
    encode_ping,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_vmdesc,
)
from livemig.wire.constants import BE32, BE64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: streams.py
from streams import preamble, ram_stream_start, section  # noqa: E402

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
RAM = 64 * MIB
DST_KINDS = {"ram": PayloadKind.RAM, "cpu": PayloadKind.BLOB,
             "globalstate": PayloadKind.GLOBALSTATE}
# Peak memory a destination may add while refusing a hostile stream: its 4 MiB
# receive buffer and some slack, far below what the hostile lengths announce.
RSS_SLACK_KIB = 48 * 1024


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_for(tmp_path)


# -- building streams --------------------------------------------------------------------------

PRE = preamble(MACHINE_TYPE)


def ram_start(blocks=(("pc.ram", RAM),)) -> bytes:
    return ram_stream_start(blocks, sid=0, machine_type=MACHINE_TYPE)


RAM_SETUP = ram_start() + encode_ram_eos() + encode_footer(0)
PART = section(SectionType.SECTION_PART, 0)


def zero_pages(offsets, block="pc.ram") -> bytes:
    return bytes(encode_ram_zero_pages(block, offsets, first_has_block_name=True))


def full(sid: int, idstr: str, payload: bytes) -> bytes:
    return section(SectionType.SECTION_FULL, sid, idstr) + encode_blob(payload) + encode_footer(sid)


ONE_PAGE = bytes(encode_ram_pages("pc.ram", [0], np.full((1, PAGE), 7, np.uint8),
                                  first_has_block_name=True))

# name -> (bytes, close the connection after them?, error-desc regex)
HOSTILE = {
    "bad-magic": (b"QEVX\0\0\0\3", False, r"Not a migration stream \(at stream offset 0\)"),
    "version-2": (b"QEVM\0\0\0\2", False, r"SaveVM v2 format is obsolete and don't work anymore"),
    "version-4": (b"QEVM\0\0\0\4", False, r"Unsupported migration stream version"),
    "no-configuration": (preamble(None) + encode_eof(), False,
                         r"Configuration section missing"),
    # (a configuration is only complete once the next byte shows no subsection follows)
    "machine-type": (preamble("pc-q35-10.0") + encode_eof(), False,
                     r"Machine type received is 'pc-q35-10\.0' and local is 'livemig-pc-10\.0'"),
    "unknown-section": (PRE + section(SectionType.SECTION_FULL, 3, "floppy"), False,
                        r"Unknown savevm section or instance 'floppy' 0\. Make sure that your "
                        r"current VM setup matches your saved VM setup"),
    "unknown-section-id": (PRE + section(SectionType.SECTION_PART, 7), False,
                           r"Unknown savevm section 7\b"),
    "unknown-record-type": (PRE + b"\x42", False, r"Unknown savevm section type 66\b"),
    "unknown-command": (PRE + b"\x08\x00\x63\x00\x00", False, r"MIG_CMD 0x63 unknown \(len 0x0\)"),
    "command-bad-length": (PRE + b"\x08\x00\x02\x00\x03", False,
                           r"PING received with bad length - expecting 4, got 3"),
    "ping-without-return-path": (PRE + encode_ping(1), False,
                                 r"CMD_PING \(0x1\) received with no return path"),
    "wrong-footer-id": (ram_start() + encode_ram_eos() + encode_footer(9), False,
                        r"Mismatched section id in footer for ram - read 0x9 expected 0x0"),
    "missing-footer": (ram_start() + encode_ram_eos() + encode_eof(), False,
                       r"Missing section footer for ram"),
    "truncated-page": (RAM_SETUP + PART + ONE_PAGE[:8 + 1 + 6 + 100], True,
                       r"Truncated migration stream: data ended inside a section payload"),
    "empty-connection": (b"", True,
                         r"Truncated migration stream: data ended in the file header "
                         r"\(0 undecoded bytes\)"),
    "cut-in-header": (b"QEV", True, r"Truncated migration stream: data ended in the file header"),
    "ram-size-mismatch": (ram_start((("pc.ram", 2 * RAM),)), False,
                          r"Size mismatch: pc\.ram: 0x8000000 != 0x4000000: Invalid argument"),
    "unknown-ramblock": (ram_start((("pc.ram", RAM), ("pc.bios", 256 * 1024))), False,
                         r'Unknown ramblock "pc\.bios", cannot accept migration'),
    "page-outside-block": (RAM_SETUP + PART + zero_pages([RAM]), False,
                           r"Illegal RAM offset 4000000"),
    "page-in-unknown-block": (RAM_SETUP + PART + zero_pages([0], "pc.rom"), False,
                              r"Can't find block pc\.rom"),
    "zero-page-with-a-value": (RAM_SETUP + PART + zero_pages([0])[:-1] + b"\x07", False,
                               r"Found a zero page with value 7"),
    "continue-without-block": (RAM_SETUP + PART + BE64.pack(0x22) + b"\0", False,
                               r"Ack, bad migration stream!"),
    "unknown-ram-flags": (RAM_SETUP + PART + BE64.pack(0x100), False,
                          r"Unknown combination of migration flags: 0x100"),
    "section-version-too-new": (PRE + section(SectionType.SECTION_START, 0, "ram", 5), False,
                                r"savevm: unsupported version 5 for 'ram' v4"),
    # lengths far beyond anything real: refused before a byte of the payload arrives
    "oversize-machine-type": (preamble(None) + b"\x07" + BE32.pack(0xFFFFFFFF), False,
                              r"Machine type name of 4294967295 bytes exceeds the limit"),
    "oversize-blob": (PRE + section(SectionType.SECTION_FULL, 1, "cpu")
                      + BE32.pack(0xFFFFFFFF), False,
                      r"Blob of 4294967295 bytes exceeds the limit"),
    "oversize-ram-total": (PRE + section(SectionType.SECTION_START, 0, "ram", 4)
                           + BE64.pack((1 << 63) | 4), False, r"RAM size 0x8000000000000000 is "
                                                              r"too large"),
    "oversize-ram-block": (PRE + section(SectionType.SECTION_START, 0, "ram", 4)
                           + BE64.pack(RAM | 4) + b"\x06pc.ram" + BE64.pack(1 << 40), False,
                           r"RAM block pc\.ram of 0x10000000000 bytes overruns the announced "
                           r"total"),
    "oversize-vmdesc": (PRE + encode_eof() + b"\x06" + BE32.pack(0xFFFFFFF0), False,
                        r"VM description of 4294967280 bytes exceeds the limit"),
    "cpu-state-garbage": (RAM_SETUP + full(1, "cpu", b"\x04softxyz"), False,
                          r"soft vCPU state is 3 bytes, expected \d+"),
    "cpu-from-kvm": (RAM_SETUP + full(1, "cpu", b"\x03kvm" + bytes(64)), False,
                     r"vCPU state is from accelerator 'kvm', this VM runs 'soft'"),
    "globalstate-garbage": (RAM_SETUP + section(SectionType.SECTION_FULL, 2, "globalstate")
                            + BE32.pack(1000) + bytes(100), False,
                            r"globalstate: bad run state size 1000"),
    "garbage-instead-of-vmdesc": (RAM_SETUP + encode_eof() + b"\x42junk", False,
                                  r"Expected vmdescription section, but got 66\b"),
    "stream-ends-before-vmdesc": (RAM_SETUP + encode_eof(), True,
                                  r"Truncated migration stream: data ended inside the VM "
                                  r"description|stream ended before the VM description"),
}


async def send_hostile(fleet: Fleet, data: bytes, *, close: bool, name: str = "dst"):
    """A fresh destination, ``data`` written into its migration socket. Returns
    (destination, connected socket, baseline RSS in KiB)."""
    dst = await fleet.destination(name, devices=(), caps={})
    uri = await start_incoming(dst)
    base = proc_rss_kib(dst.proc.pid) or 0
    sock = socket.create_connection(incoming_port(uri), timeout=10)
    try:
        if data:
            sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        # The destination refused the stream and hung up before the last byte
        # (a loaded machine lets it read that far first): what the caller checks.
        pass
    return dst, sock, base


async def assert_hung_up(sock: socket.socket, timeout: float = 5.0) -> None:
    """The destination closed the connection (EOF or reset), i.e. it did not hang.

    Reads with the event loop (woken when the socket is readable, no polling)
    until EOF or a reset, within ``timeout``."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536),
                                          max(0.0, deadline - time.monotonic()))
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError("the destination kept the connection open") from None
        if data == b"":
            return


async def check_refused(fleet: Fleet, data: bytes, close: bool, cause: str) -> None:
    dst, sock, base = await send_hostile(fleet, data, close=close)
    try:
        await assert_destination_failed(dst, cause, timeout=10)
        await assert_hung_up(sock)
        assert await runstate(dst) == "inmigrate"                 # QMP still serves
        peak = dst.peak_rss_kib() or 0
        assert peak - base < RSS_SLACK_KIB, f"peak RSS grew {peak - base} KiB"
        assert dst.proc.poll() is None                               # exit-on-error off
    finally:
        sock.close()


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_stream_is_refused(fleet, case):
    data, close, cause = HOSTILE[case]
    run_with(fleet, lambda: check_refused(fleet, data, close, cause))


# -- surgery on a real stream ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A real stream (``file:`` migration of a stopped walking source, no device) and the
    source's RAM."""
    workdir = str(tmp_path_factory.mktemp("capture"))
    fleet = Fleet(workdir)
    path = os.path.join(workdir, "stream.bin")

    async def body():
        src = await fleet.start("capsrc")
        await wait_walking(src)
        await src.cmd("stop")
        await src.cmd("migrate", uri=f"file:{path}")
        info = await wait_terminal(src)
        assert info["status"] == "completed", info
        return await src.pmem(0, RAM)
    try:
        mem = run_with(fleet, body)
    finally:
        fleet.kill_all()
    with open(path, "rb") as f:
        raw = f.read()
    return raw, mem, stream_records(raw, DST_KINDS)


def _record(records, kind: str, idstr: str | None = None, nth: int = 0):
    hits = [r for r in records if r.kind == kind
            and (idstr is None or getattr(r.event, "idstr", None) == idstr)]
    return hits[nth]


def test_captured_stream_replayed_by_hand_completes(fleet, captured):
    """Control: the bytes this module cuts up are a stream the destination accepts."""
    raw, mem, _ = captured

    async def body():
        dst, sock, _ = await send_hostile(fleet, raw, close=True)
        info = await wait_terminal(dst)
        assert info["status"] == "completed", info
        assert await runstate(dst) == "paused"                  # -S, source was stopped
        assert await dst.pmem(0, RAM) == mem
        sock.close()
    run_with(fleet, body)


def test_garbage_after_the_vm_description_is_never_read(fleet, captured):
    """QEMU reads nothing after the VM description; neither does livemig."""
    raw, mem, _ = captured

    async def body():
        dst, sock, _ = await send_hostile(fleet, raw + os.urandom(4096), close=False)
        info = await wait_terminal(dst)
        assert info["status"] == "completed", info
        assert await dst.pmem(0, RAM) == mem
        sock.close()
    run_with(fleet, body)


def test_garbage_right_after_eof(fleet, captured):
    raw, _, records = captured
    eof = _record(records, "Eof")
    run_with(fleet, lambda: check_refused(fleet, raw[:eof.end] + b"\x99garbage", False,
                                          r"Expected vmdescription section, but got 153\b"))


def test_real_stream_cut_inside_a_page(fleet, captured):
    raw, _, records = captured
    pages = _record(records, "RamPages")
    cut = pages.start + 8 + 7 + 2000            # address word, block name, part of the data
    run_with(fleet, lambda: check_refused(
        fleet, raw[:cut], True, r"Truncated migration stream: data ended inside a section "
                                r"payload"))


def test_real_stream_with_a_wrong_footer(fleet, captured):
    raw, _, records = captured
    footer = _record(records, "SectionFooter", nth=1)
    bad = raw[:footer.start] + encode_footer(0x77) + raw[footer.end:]
    run_with(fleet, lambda: check_refused(
        fleet, bad, False, r"Mismatched section id in footer for \w+ - read 0x77 expected"))


def _with_globalstate(raw: bytes, records, state: bytes) -> bytes:
    head = _record(records, "SectionFull", "globalstate")
    record = _record(records, "GlobalStateRecord", nth=-1)
    assert record.start == head.end
    return raw[:record.start] + encode_global_state(state.decode()) + raw[record.end:]


def test_globalstate_naming_a_state_never_sent(fleet, captured):
    """The source's run state at switchover may only be one a source sends."""
    raw, _, records = captured
    bad = _with_globalstate(raw, records, b"postmigrate")
    run_with(fleet, lambda: check_refused(
        fleet, bad, False, r"globalstate: run state 'postmigrate' cannot follow an incoming "
                           r"migration"))


# -- memory ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_record_far_larger_than_its_section_is_not_buffered(fleet):
    """A ``cpu`` record (a few KiB of vCPU state) announced at 200 MiB: the
    destination must refuse it, not buffer what the peer sends."""
    async def body():
        dst, sock, base = await send_hostile(
            fleet, PRE + section(SectionType.SECTION_FULL, 1, "cpu")
            + BE32.pack(200 * MIB), close=False)
        try:
            chunk = bytes(MIB)
            sent = 0
            sock.settimeout(5)
            try:
                while sent < 96 * MIB:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass                                  # refused and hung up: fine
            info = await wait_terminal(dst, timeout=10) if sent < 96 * MIB else \
                await dst.cmd("query-migrate")
            peak = dst.peak_rss_kib() or 0
            assert peak - base < RSS_SLACK_KIB, \
                f"{sent >> 20} MiB sent into a cpu record: peak RSS grew " \
                f"{(peak - base) >> 10} MiB ({info.get('status')})"
            assert info["status"] == "failed", info
            assert re.search(r"Blob of 209715200 bytes exceeds the limit", info["error-desc"])
        finally:
            sock.close()
    run_with(fleet, body)


# -- exit-on-error (QEMU's default) -----------------------------------------------------------

def test_hostile_stream_with_default_exit_on_error(fleet):
    """The process prints the reason on one line and exits with status 1."""
    async def body():
        dst = await fleet.destination(devices=(), caps={})
        uri = await start_incoming(dst, exit_on_error=None)
        with socket.create_connection(incoming_port(uri), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")

            async def exited() -> bool:
                return dst.proc.poll() is not None
            await wait_until(exited, 10, "destination exit")
        assert dst.proc.returncode == 1
        err = dst.stderr_text()
        assert re.search(r"^livemig: load of migration failed: Not a migration stream", err,
                         re.M), err
        assert TRACEBACK not in err
    run_with(fleet, body)


@pytest.mark.timeout(30)
def test_hostile_stream_into_incoming_on_the_command_line(tmp_path):
    """``-incoming tcp:...`` (exit-on-error on): bad magic, exit status 1, one line."""
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "livemig", "run", "-m", "64M", "-accel", "soft",
           "-guest", "walk,start=1M,end=16M", "-qmp", f"unix:{tmp_path}/q.sock,server=on,wait=off",
           "-incoming", f"tcp:127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no listener"
                time.sleep(0.02)
        with sock:
            sock.sendall(b"\xde\xad\xbe\xef" * 4)
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 1
        assert err.strip().splitlines()[-1].startswith(
            "livemig: load of migration failed: Not a migration stream"), err
        assert TRACEBACK not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- in process, under hypothesis -----------------------------------------------------------------

SMALL_WALK = GuestConfig(start=MIB, end=2 * MIB)
SMALL_RAM = 4 * MIB


def _caps() -> Capabilities:
    return Capabilities()


def _machine(**kw) -> Machine:
    return Machine(MachineConfig(ram_size=SMALL_RAM, accel="soft", guest=SMALL_WALK, **kw))


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


_STREAM: list[bytes] = []


def small_stream() -> bytes:
    """A real stream of a small walking machine, made in process (no return path)."""
    if _STREAM:
        return _STREAM[0]
    params = Parameters()
    params.set_from_qmp({"max-bandwidth": 0})
    src = _machine()
    out = MigrationState(src, _caps(), params, lambda *a: None)
    a, b = Channel.socketpair()
    chunks: list[bytes] = []

    def drain() -> None:
        buf = bytearray(1 << 20)
        while n := b.recv_into(buf):
            chunks.append(bytes(buf[:n]))
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        src.vm_start()
        assert _wait(lambda: src.cpu.phase == 2)
        out.migrate(a)
        assert _wait(lambda: out.sm.is_done())
        assert out.status is S.COMPLETED, out.error_desc
        reader.join(10)
    finally:
        src.close()
        b.close()
    _STREAM.append(b"".join(chunks))
    return _STREAM[0]


class _Tracebacks(logging.Handler):
    """Records log records that carry a traceback (the engine's 'load failed' path)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def load_into_engine(data: bytes) -> tuple[IncomingState, Machine, list[logging.LogRecord]]:
    """Feed ``data`` (then EOF) to a destination engine; wait until it is done."""
    dst = _machine(incoming=True, start_paused=True)
    inc = IncomingState(dst, _caps(), Parameters(), lambda *a: None)
    handler = _Tracebacks()
    logger = logging.getLogger("livemig")
    logger.addHandler(handler)
    a, b = Channel.socketpair()

    def feed() -> None:
        try:
            a.sendall(data)
            a.sock.shutdown(socket.SHUT_WR)
        except Exception:  # noqa: BLE001 - the destination hung up early
            pass
    writer = threading.Thread(target=feed, daemon=True)
    try:
        inc.start(None, channel=b, exit_on_error=False)
        writer.start()
        assert _wait(lambda: inc.sm.is_done()), f"destination still {inc.status}"
        writer.join(5)
    finally:
        logger.removeHandler(handler)
        a.close()
        dst.close()
    return inc, dst, handler.records


def assert_clean_outcome(inc: IncomingState, dst: Machine, tracebacks) -> None:
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    if inc.status is S.FAILED:
        assert inc.error_desc and inc.error_desc.startswith("load of migration failed: ")
        assert dst.runstate is RunState.INMIGRATE               # never ran
    else:
        assert inc.status is S.COMPLETED, inc.status


def test_engine_accepts_the_unmutated_stream():
    inc, dst, tracebacks = load_into_engine(small_stream())
    assert inc.status is S.COMPLETED, inc.error_desc
    assert not tracebacks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_engine_survives_mutated_streams(data):
    raw = bytearray(small_stream())
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]), label="op")
        # bias towards the structure-rich parts: headers and the device sections at the end
        pos = data.draw(st.one_of(st.integers(0, min(4096, len(raw) - 1)),
                                  st.integers(max(0, len(raw) - 2048), len(raw) - 1),
                                  st.integers(0, len(raw) - 1)), label="pos")
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="junk")
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 64), label="len")]
        else:
            del raw[pos:]
        if not raw:
            break
    inc, dst, tracebacks = load_into_engine(bytes(raw))
    assert_clean_outcome(inc, dst, tracebacks)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_source_return_path_reader_survives_random_bytes(raw, then_close):
    """The source's return-path thread ends with an error text (or a SHUT), whatever
    arrives; it never dies of an unexpected exception."""
    a, b = Channel.socketpair()
    crashes: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: crashes.append(args.exc_value)
    acks: list[int] = []
    rp = SourceReturnPath(b, lambda: acks.append(1))
    try:
        rp.start()
        a.sendall(raw) if raw else None
        a.sock.shutdown(socket.SHUT_WR) if then_close or not raw else None
        if then_close or not raw:
            assert rp.wait_done(5)
            assert rp.error is not None or rp.shut_value is not None
        else:
            rp.wait_done(0.05)
        if rp.error is not None:
            assert isinstance(rp.error, str) and rp.error
    finally:
        rp.shutdown()
        rp.join(2)
        a.close()
        threading.excepthook = old_hook
    assert not crashes, crashes


def test_command_with_max_length_payload_is_bounded(fleet):
    """A 64 KiB command payload (the u16 maximum) for an unknown command is refused
    by its number, before its payload is read."""
    data = PRE + b"\x08\x00\x0c\xff\xff" + bytes(10)
    run_with(fleet, lambda: check_refused(fleet, data, False, r"MIG_CMD 0xc unknown"))


def test_switchover_start_without_sections_then_eof(fleet):
    """Commands a 10.0 source sends are accepted in any order; a stream with no RAM
    section at all still has to end properly."""
    data = PRE + encode_command(MigCmd.SWITCHOVER_START) + encode_eof()
    run_with(fleet, lambda: check_refused(
        fleet, data, True, r"Truncated migration stream: data ended inside the VM description"
                           r"|stream ended before the VM description"))


def test_vmdesc_json_is_not_parsed(fleet, captured):
    """The VM description is skipped unread (QEMU only keeps it for tools)."""
    raw, mem, records = captured

    async def body():
        eof = _record(records, "Eof")
        data = raw[:eof.end] + encode_vmdesc(b"\xff{not json")
        dst, sock, _ = await send_hostile(fleet, data, close=False)
        info = await wait_terminal(dst)
        assert info["status"] == "completed", info
        assert await dst.pmem(0, RAM) == mem
        sock.close()
    run_with(fleet, body)
