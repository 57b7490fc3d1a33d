"""QMP hardening, on a real ``livemig run`` process or its QMP side in process.

Malformed, oversized and deeply nested JSON, wrong types and unknown
arguments each get an error reply and the server keeps serving (the same
connection, other connections, the guest); nothing prints a traceback. The
QMP UNIX socket is created 0600 whatever the umask. ``validate-uuid`` works
as QEMU's (``/migration/validate_uuid*`` qtests).

Tests that check only QMP (the socket, vanishing clients, fuzzed arguments)
run the real VM's QMP side in this process (``tests/qmp_inprocess.py``,
fixture ``inproc``; the guest never starts, so the VM is in ``prelaunch``).
Those that need a process (its RSS, its exit status and stderr), a running
guest or a migration start ``livemig run`` (fixture ``fleet``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fault_helpers import (
    ACCEL,
    RP,
    TRACEBACK,
    RawQmp,
    accel_digest,
    assert_destination_failed,
    assert_no_traceback,
    assert_same_guest,
    assert_source_survived,
    fleet_for,
    proc_rss_kib,
    run_with,
    runstate,
    start_incoming,
    wait_guest_runs,
    wait_terminal,
    wait_until,
    wait_walking,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.cli.driver import Vm, VmSpec
from livemig.qapi.capabilities import CAPABILITIES
from livemig.qapi.parameters import DEFAULTS as PARAMETER_DEFAULTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for qmp_inprocess
from qmp_inprocess import RAM as INPROCESS_RAM  # noqa: E402
from qmp_inprocess import VmOnThread, inprocess_fleet, run_argv  # noqa: E402

pytestmark = pytest.mark.timeout(60)

UUID_A = "11111111-2222-3333-4444-555555555555"
UUID_B = "99999999-8888-7777-6666-555555555555"


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_for(tmp_path)


@pytest.fixture
def inproc(tmp_path):
    yield from inprocess_fleet(tmp_path)


def is_error(reply: dict, desc: str | None = None, error_class: str = "GenericError") -> bool:
    err = reply.get("error")
    return (err is not None and err["class"] == error_class
            and (desc is None or re.fullmatch(desc, err["desc"]) is not None))


async def still_serving(qmp: RawQmp, status: str = "running") -> None:
    """The connection answers, and the run state is ``status`` (``prelaunch`` in process)."""
    reply = await qmp.execute("query-status")
    assert reply["return"]["status"] == status, reply


# -- the socket ------------------------------------------------------------------------------------

def test_qmp_socket_is_0600_even_with_umask_0(inproc):
    async def body():
        old = os.umask(0)
        try:
            vm = await inproc.start("perm")
        finally:
            os.umask(old)
        st_ = os.lstat(vm.qmp_path)
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600, oct(st_.st_mode)
        assert st_.st_uid == os.geteuid()
    run_with(inproc, body)


# -- malformed input ---------------------------------------------------------------------------

MALFORMED = [
    (b'{"execute": }', r"JSON parse error, expecting value"),
    (b'{"execute" "query-status"}', r"JSON parse error, missing : in object pair"),
    (b"\x01", r"JSON parse error, stray '\x01'"),
    (b"[1, 2]", r"QMP input must be a JSON object"),
    (b"null", r"QMP input must be a JSON object"),
    (b'{"execute": 42}', r"QMP input member 'execute' must be a string"),
    (b'{"execute": "query-status", "arguments": []}',
     r"QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-status", "foo": 1}', r"QMP input member 'foo' is unexpected"),
    (b'{"arguments": {}}', r"QMP input lacks member 'execute'"),
    (b'{"execute": "query-status", "execute": "x"}', r"JSON parse error, duplicate key"),
    (b'{"execute": "\xc3\x28"}', r"JSON parse error, invalid UTF-8 sequence in string"),
    (b'{"execute": "\\ud800"}', r"JSON parse error, \\ud800 is not a valid Unicode character"),
    (b'{"execute": "quer\\x"}', r"JSON parse error, invalid escape sequence in string"),
    (b"[" * 2000 + b"]" * 2000, r"JSON nesting depth limit exceeded"),
    (b'{"execute": "query-status", "id": truth}', r"JSON parse error, invalid keyword 'truth'"),
]


def test_malformed_json_gets_an_error_and_the_server_keeps_serving(fleet):
    async def body():
        vm = await fleet.source(devices=())
        qmp = await RawQmp.connect(vm.qmp_path)
        try:
            for data, desc in MALFORMED:
                await qmp.send(data + b"\n")
                reply = await qmp.recv()
                assert is_error(reply, desc), (data[:40], reply)
                await still_serving(qmp)
            await wait_guest_runs(vm)
        finally:
            await qmp.close()
        assert_no_traceback(vm)
    run_with(fleet, body)


def test_oversized_requests_are_dropped_and_memory_stays_bounded(fleet):
    """A 4 MiB request (limit 1 MiB) and an endless string: one error each, the input
    is dropped, not buffered, and the connection keeps working."""
    async def body():
        vm = await fleet.source(devices=())
        base = proc_rss_kib(vm.proc.pid) or 0
        qmp = await RawQmp.connect(vm.qmp_path)
        try:
            big = b'{"execute": "query-status", "id": "' + b"x" * (4 << 20) + b'"}\n'
            await qmp.send(big)
            assert is_error(await qmp.recv(), r"JSON token size limit exceeded")
            await still_serving(qmp)

            await qmp.send(b'{"execute": "' + b"y" * (8 << 20))     # never closed
            assert is_error(await qmp.recv(), r"JSON token size limit exceeded")
            await qmp.send(b'"}\n')
            # whatever the tail of the dropped string parses to, the next request is served
            reply = await qmp.execute("query-name")
            while "return" not in reply:
                reply = await qmp.recv()
            assert reply == {"return": {"name": "src"}}
        finally:
            await qmp.close()
        peak = vm.peak_rss_kib() or 0
        assert peak - base < 64 * 1024, f"peak RSS grew {(peak - base) >> 10} MiB"
        assert_no_traceback(vm)
    run_with(fleet, body)


def test_a_request_of_many_small_tokens_stays_bounded(fleet):
    async def body():
        vm = await fleet.source(devices=())
        base = proc_rss_kib(vm.proc.pid) or 0
        qmp = await RawQmp.connect(vm.qmp_path)
        try:
            many = b'{"execute": "query-status", "arguments": {"a": [' + b"1," * (1 << 20) \
                + b"1]}}\n"
            await qmp.send(many)
            assert is_error(await qmp.recv(), r"JSON (token size|token count) limit exceeded")
            await still_serving(qmp)
        finally:
            await qmp.close()
        peak = vm.peak_rss_kib() or 0
        assert peak - base < 64 * 1024, f"peak RSS grew {(peak - base) >> 10} MiB"
    run_with(fleet, body)


def test_a_client_that_never_reads_does_not_block_others(fleet):
    async def body():
        vm = await fleet.source(devices=())
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(vm.qmp_path)
        hog.setblocking(False)
        req = b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-status"}\n' * 1000
        sent, deadline = 0, time.monotonic() + 5
        try:
            while time.monotonic() < deadline:          # until the hog's socket is full
                try:
                    sent += hog.send(req)
                except BlockingIOError:
                    break
            qmp = await RawQmp.connect(vm.qmp_path)
            t0 = time.monotonic()
            await still_serving(qmp)
            assert time.monotonic() - t0 < 2
            await qmp.close()
        finally:
            hog.close()
        await wait_guest_runs(vm)
        assert_no_traceback(vm)
        assert sent > 0
    run_with(fleet, body)


def test_client_vanishing_mid_request(inproc):
    async def body():
        vm = await inproc.start("src")
        for chunk in (b'{"execute": "query-st', b'{"execute": "migrate", "arguments": {"uri"'):
            qmp = await RawQmp.connect(vm.qmp_path)
            await qmp.send(chunk)
            await qmp.close()
        qmp = await RawQmp.connect(vm.qmp_path)
        await still_serving(qmp, "prelaunch")
        await qmp.close()
        assert (await vm.cmd("query-migrate")) == {}
        assert_no_traceback(vm)
    run_with(inproc, body)


# -- wrong types and unknown arguments -----------------------------------------------------------

BAD_ARGUMENTS = [
    ("query-status", {"foo": 1}, r"Parameter 'foo' is unexpected"),
    ("migrate_cancel", {"x": 1}, r"Parameter 'x' is unexpected"),
    ("migrate", {"uri": 42}, r"Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "bogus": True}, r"Parameter 'bogus' is unexpected"),
    ("migrate", {"channels": "x"}, r"Invalid parameter type for 'channels', expected: array"),
    ("migrate", {"channels": [{}]}, r"Parameter 'channels\[0\]\.channel-type' is missing"),
    ("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "inet", "host": 1, "port": []}}]},
     r"Invalid parameter type for 'channels\[0\]\.addr\.host', expected: string"),
    ("migrate", {}, r"need either 'uri' or 'channels' argument"),
    ("migrate", {"uri": ""}, r"unknown migration protocol: "),
    ("migrate", {"uri": "x" * 100000}, r"unknown migration protocol: x+"),
    ("migrate", {"uri": "tcp:127.0.0.1"}, r"error parsing address '127\.0\.0\.1'"),
    ("migrate-set-parameters", {"max-bandwidth": "fast"}, r"Parameter 'max-bandwidth' expects "
                                                          r"uint64"),
    ("migrate-set-parameters", {"max-bandwidth": 1.5}, r"Parameter 'max-bandwidth' expects uint64"),
    ("migrate-set-parameters", {"downtime-limit": -1},
     r"Parameter 'downtime_limit' expects an integer in the range of 0 to \(2000 \* 1000\) ms"),
    ("migrate-set-parameters", {"downtime-limit": 2 ** 64}, r"Parameter 'downtime-limit' expects "
                                                            r"uint64"),
    ("migrate-set-parameters", {"multifd-channels": 0},
     r"Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("migrate-set-parameters", {"bogus": 1}, r"Parameter 'bogus' is unexpected"),
    ("migrate-set-parameters", {"tls-creds": 5},
     r"Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ("migrate-set-capabilities", {}, r"Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": "x"},
     r"Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [1]},
     r"Invalid parameter type for 'capabilities\[0\]', expected: object"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events"}]},
     r"Parameter 'capabilities\[0\]\.state' is missing"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": "on"}]},
     r"Invalid parameter type for 'capabilities\[0\]\.state', expected: boolean"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True,
                                                    "x": 1}]},
     r"Parameter 'capabilities\[0\]\.x' is unexpected"),
    ("migrate-incoming", {"uri": "tcp:127.0.0.1:0"},
     r"'-incoming' was not specified on the command line"),
    ("migrate-continue", {"state": 5}, r"Invalid parameter type for 'state', expected: string"),
    ("migrate-continue", {"state": "pre-switchover"}, r"Migration not in expected state: none"),
    ("pmemsave", {"val": 0, "size": 2 ** 70, "filename": "/dev/null"},
     r"Invalid parameter type for 'size', expected: integer"),
    ("x-accel-digest", {"id": 5}, r"Invalid parameter type for 'id', expected: string"),
]


def test_wrong_types_and_unknown_arguments(fleet):
    """Every bad call is refused with QEMU's text and changes nothing."""
    async def body():
        vm = await fleet.source()
        qmp = await RawQmp.connect(vm.qmp_path)
        before = [await qmp.execute(q) for q in ("query-migrate-parameters",
                                                 "query-migrate-capabilities")]
        digest = await accel_digest(vm)
        try:
            for name, args, desc in BAD_ARGUMENTS:
                reply = await qmp.execute(name, args)
                assert is_error(reply, desc), (name, args, reply)
            reply = await qmp.execute("x-accel-digest", {"id": "nope"})
            assert is_error(reply, r"Device 'nope' not found", "DeviceNotFound")
            reply = await qmp.execute("no-such-command", {"a": 1})
            assert is_error(reply, r"The command no-such-command has not been found",
                            "CommandNotFound")
            after = [await qmp.execute(q) for q in ("query-migrate-parameters",
                                                    "query-migrate-capabilities")]
            assert after == before
            assert (await qmp.execute("query-migrate")) == {"return": {}}
            await still_serving(qmp)
        finally:
            await qmp.close()
        assert await accel_digest(vm) == digest
        await wait_guest_runs(vm)
        assert_no_traceback(vm)
    run_with(fleet, body)


# -- arguments under hypothesis (synchronous client, one VM for all examples) -----------------

class QmpSync:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "QMP" in self.recv()
        assert self.execute("qmp_capabilities") == {"return": {}}

    def recv(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP server closed the connection")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, name: str, arguments=None) -> dict:
        req = {"execute": name} if arguments is None else {"execute": name,
                                                           "arguments": arguments}
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def fuzz_vm(tmp_path_factory):
    """One in-process VM for every hypothesis example (its socket listens on return)."""
    workdir = str(tmp_path_factory.mktemp("qmpfuzz"))
    paths = Vm(VmSpec(name="fuzz", ram=INPROCESS_RAM, accel="soft", walk_end="16M",
                      devices=[ACCEL]), workdir)
    vm = VmOnThread(run_argv(paths))
    try:
        client = QmpSync(paths.qmp_path)
        try:
            yield vm, client
        finally:
            client.close()
    finally:
        vm.close()


def no_transport_words(value) -> bool:
    """Keep fuzzed arguments from naming a real transport (no connects, files, commands)."""
    text = json.dumps(value)
    return not any(w in text for w in ("exec", "file", "socket", "tcp", "unix", "fd", ":"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
param_names = st.sampled_from([*PARAMETER_DEFAULTS, "block-bitmap-mapping", "bogus"])
cap_items = st.lists(st.one_of(
    st.fixed_dictionaries({"capability": st.sampled_from([*CAPABILITIES, "nope"]),
                           "state": json_values}),
    json_values), max_size=4)
requests = st.one_of(
    st.tuples(st.just("migrate-set-parameters"), st.dictionaries(param_names, json_values,
                                                                 max_size=4)),
    st.tuples(st.just("migrate-set-capabilities"),
              st.fixed_dictionaries({"capabilities": cap_items})),
    st.tuples(st.sampled_from(["migrate", "migrate-incoming"]),
              st.dictionaries(st.sampled_from(["uri", "channels", "detach", "resume",
                                               "exit-on-error", "x"]), json_values,
                              max_size=3)).filter(lambda r: no_transport_words(r[1])),
    st.tuples(st.sampled_from(["migrate-continue", "x-accel-digest", "query-status",
                               "query-migrate", "migrate_cancel", "query-name"]),
              st.one_of(st.none(), st.dictionaries(st.sampled_from(["state", "id", "x"]),
                                                   json_values, max_size=2))),
)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(requests)
def test_fuzzed_arguments_get_a_reply_never_a_crash(fuzz_vm, request_):
    vm, qmp = fuzz_vm
    name, args = request_
    reply = qmp.execute(name, args)
    if "error" in reply:
        err = reply["error"]
        assert err["class"] in ("GenericError", "DeviceNotFound"), reply
        assert isinstance(err["desc"], str) and err["desc"]
        assert not re.match(r"^[A-Z]\w+(Error|Exception): ", err["desc"]), reply
    else:
        assert "return" in reply, reply
    assert vm.alive
    assert TRACEBACK not in vm.log_text()


# -- validate-uuid --------------------------------------------------------------------------------

async def uuid_pair(fleet, src_uuid: str | None, dst_uuid: str | None, caps: dict):
    src = await fleet.start("src", devices=[ACCEL],
                            extra=["-uuid", src_uuid] if src_uuid else [])
    await src.set_caps(**{"validate-uuid": True, "events": True, **caps})
    await src.set_params(max_bandwidth=0)
    dst = await fleet.start("dst", devices=[ACCEL], incoming="defer", paused=True,
                            extra=["-uuid", dst_uuid] if dst_uuid else [])
    if caps:
        await dst.set_caps(**caps)
    await wait_walking(src)
    return src, dst


@pytest.mark.parametrize(("src_uuid", "dst_uuid"), [(UUID_A, UUID_A), (UUID_A, None),
                                                    (None, UUID_A)],
                         ids=["same", "dst-not-set", "src-not-set"])
def test_validate_uuid_completes(fleet, src_uuid, dst_uuid):
    async def body():
        src, dst = await uuid_pair(fleet, src_uuid, dst_uuid, RP)
        await src.cmd("migrate", uri=await start_incoming(dst))
        assert (await wait_terminal(src))["status"] == "completed"
        assert (await wait_terminal(dst))["status"] == "completed"
        await assert_same_guest(src, dst, devices=True)
    run_with(fleet, body)


def test_validate_uuid_mismatch_fails_both_sides(fleet):
    async def body():
        src, dst = await uuid_pair(fleet, UUID_A, UUID_B, RP)
        digest = await accel_digest(src)
        await src.cmd("migrate", uri=await start_incoming(dst))
        text = f"UUID received is {UUID_A} and local is {UUID_B}"
        info = await assert_destination_failed(dst, None)
        assert info["error-desc"] == f"load of migration failed: {text}"
        # The configuration comes before OPEN_RETURN_PATH in the stream, so the
        # destination has no return path yet to send its reason on (as in QEMU):
        # the source sees the connection go.
        await assert_source_survived(fleet, src, status="failed", digest=digest, again=False,
                                     cause=r"^Channel error: Input/output error$|^destination: "
                                           + re.escape(text))
    run_with(fleet, body)


def test_validate_uuid_mismatch_with_default_exit_on_error(fleet):
    """QEMU's /migration/validate_uuid_error: the destination exits with failure."""
    async def body():
        src, dst = await uuid_pair(fleet, UUID_A, UUID_B, {})
        await src.cmd("migrate", uri=await start_incoming(dst, exit_on_error=None))

        async def exited() -> bool:
            return dst.proc.poll() is not None
        await wait_until(exited, 15, "destination exit")
        assert dst.proc.returncode == 1
        err = dst.stderr_text()
        assert f"livemig: load of migration failed: UUID received is {UUID_A} and local is " \
               f"{UUID_B}" in err, err
        assert TRACEBACK not in err
        info = await wait_terminal(src)
        assert info["status"] == "failed", info
        assert await runstate(src) == "running"
    run_with(fleet, body)


def test_uuid_is_not_sent_without_the_capability(fleet):
    async def body():
        src, dst = await uuid_pair(fleet, UUID_A, UUID_B, RP)
        await src.set_caps(**{"validate-uuid": False})
        await src.cmd("migrate", uri=await start_incoming(dst))
        assert (await wait_terminal(src))["status"] == "completed"
        assert (await wait_terminal(dst))["status"] == "completed"
    run_with(fleet, body)


def test_bad_uuid_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [*Vm(VmSpec(name="u", ram="64M", accel="soft", walk_end="16M"), str(tmp_path)).argv(),
         "-uuid", "not-a-uuid"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "livemig: -uuid not-a-uuid: Fail to parse UUID string"
    assert uuid.UUID(UUID_A)        # the good ones above are well formed
