"""livemig.transport: address parsing, and every transport end to end.

Real sockets over loopback and UNIX paths in tmp dirs, real files, real
``/bin/sh`` subprocesses. Cross-thread behaviour is checked by waiting for
the other thread with a deadline, never by sleeping.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.transport import (
    Channel,
    ExecAddress,
    FdAddress,
    FileAddress,
    InetAddress,
    TransportError,
    UnexpectedEOF,
    UnixAddress,
    address_from_channels,
    address_to_channel,
    format_uri,
    listen,
    open_outgoing,
    parse_size,
    parse_uri,
    resolve_migrate_args,
)
from livemig.transport.channel import IOVEC, SOCKET_BUFFER_BYTES, FdChannel, SocketChannel

DEADLINE_S = 10.0  # how long a woken thread may take to notice (generous for slow CI)


# ------------------------------------------------------------------ helpers

class InThread:
    """Run ``fn`` on a thread; ``result()`` joins with a deadline and re-raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            self._error = exc
        finally:
            self.done.set()

    def result(self, timeout: float = DEADLINE_S) -> Any:
        assert self.done.wait(timeout), "thread did not finish before the deadline"
        if self._error is not None:
            raise self._error
        return self._value

    def error(self, timeout: float = DEADLINE_S) -> BaseException:
        assert self.done.wait(timeout), "thread did not finish before the deadline"
        assert self._error is not None, f"expected an error, got {self._value!r}"
        return self._error


def connected_tcp() -> tuple[Channel, Channel]:
    """(source, destination) channels over a real loopback TCP connection."""
    with listen(InetAddress("127.0.0.1", "0")) as lst:
        port = lst.socket_address()[0]["port"]
        accepting = InThread(lambda: lst.accept(timeout=DEADLINE_S))
        src = open_outgoing(InetAddress("127.0.0.1", port))
        dst = accepting.result()
    return src, dst


def read_all(ch: Channel, chunk: int = 1 << 16) -> bytes:
    out = bytearray()
    buf = bytearray(chunk)
    while n := ch.recv_into(buf):
        out += buf[:n]
    return bytes(out)


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def refused_port() -> tuple[socket.socket, int]:
    """A bound but not listening TCP port: connecting to it is refused."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


# ------------------------------------------------------------------ parse_uri

@pytest.mark.parametrize(("uri", "expected"), [
    ("tcp:127.0.0.1:4444", InetAddress("127.0.0.1", "4444")),
    ("tcp:localhost:0", InetAddress("localhost", "0")),
    ("tcp:[::1]:4444", InetAddress("::1", "4444")),
    ("tcp:[fe80::1%eth0]:5", InetAddress("fe80::1%eth0", "5")),
    ("tcp::4444", InetAddress("", "4444")),
    ("tcp:0.0.0.0:4444,ipv4", InetAddress("0.0.0.0", "4444")),
    ("tcp:host:4444,to=4450", InetAddress("host", "4444")),
    ("tcp:host:http", InetAddress("host", "http")),
    ("unix:/tmp/mig.sock", UnixAddress("/tmp/mig.sock")),
    ("unix:relative,with,commas", UnixAddress("relative,with,commas")),
    ("file:/tmp/mig", FileAddress("/tmp/mig", 0)),
    ("file:/tmp/mig,offset=4096", FileAddress("/tmp/mig", 4096)),
    ("file:/tmp/mig,offset=1M", FileAddress("/tmp/mig", 1 << 20)),
    ("file:/tmp/mig,offset=0x1000", FileAddress("/tmp/mig", 0x1000)),
    ("file:", FileAddress("", 0)),
    ("exec:cat > /tmp/x", ExecAddress(["/bin/sh", "-c", "cat > /tmp/x"])),
    ("exec:", ExecAddress(["/bin/sh", "-c", ""])),
    ("fd:migfd", FdAddress("migfd")),
])
def test_parse_uri(uri: str, expected: object) -> None:
    assert parse_uri(uri) == expected


def test_inet_port_int_is_normalised_to_string() -> None:
    assert InetAddress("h", 4444) == InetAddress("h", "4444")  # type: ignore[arg-type]
    assert InetAddress("h", 4444).port == "4444"  # type: ignore[arg-type]


def test_exec_address_keeps_a_list_and_is_hashable() -> None:
    addr = ExecAddress(("a", "b"))  # type: ignore[arg-type]
    assert addr.args == ["a", "b"]
    assert hash(addr) == hash(ExecAddress(["a", "b"]))


@pytest.mark.parametrize(("uri", "desc"), [
    ("http://x", "unknown migration protocol: http://x"),
    ("", "unknown migration protocol: "),
    ("defer", "unknown migration protocol: defer"),
    ("TCP:1.2.3.4:5", "unknown migration protocol: TCP:1.2.3.4:5"),
    ("tcp:localhost", "error parsing address 'localhost'"),
    ("tcp:host:", "error parsing address 'host:'"),
    ("tcp:" + "h" * 65 + ":1", "error parsing address '" + "h" * 65 + ":1'"),
    ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
    ("tcp:[::1]4444", "error parsing IPv6 address '[::1]4444'"),
    ("tcp::", "error parsing port in address ':'"),
    ("tcp:h:1,to=x", "error parsing to= argument"),
    ("unix:", "invalid Unix socket address"),
    ("fd:", "invalid file descriptor address"),
    ("file:/x,offset=abc", "file URI has bad offset abc: Invalid argument"),
    ("file:/x,offset=0x20M", "file URI has bad offset 0x20M: Invalid argument"),
    ("file:/x,offset=1.5", "file URI has bad offset 1.5: Invalid argument"),
    ("file:/x,offset=-1", "file URI has bad offset -1: Numerical result out of range"),
    ("file:/x,offset=16E", "file URI has bad offset 16E: Numerical result out of range"),
    ("rdma:1.2.3.4:5", "Parameter 'uri' expects a valid migration protocol"),
    ("vsock:3:4444", "Parameter 'uri' expects a valid migration protocol"),
])
def test_parse_uri_errors(uri: str, desc: str) -> None:
    with pytest.raises(TransportError) as info:
        parse_uri(uri)
    assert info.value.desc == desc
    assert str(info.value) == desc


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("4096B", 4096), ("4k", 4096), ("1M", 1 << 20),
    ("2G", 2 << 30), ("1.5K", 1536), (".5M", 1 << 19), ("0x10", 16), ("  7", 7),
    ("15E", 15 << 60), ("18446744073709551615", (1 << 64) - 1),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "code"), [
    ("", errno.EINVAL), ("k", errno.EINVAL), ("1Q", errno.EINVAL), ("0x1K", errno.EINVAL),
    ("1.5", errno.EINVAL), ("18446744073709551616", errno.ERANGE), ("16E", errno.ERANGE),
])
def test_parse_size_errors(text: str, code: int) -> None:
    with pytest.raises(TransportError) as info:
        parse_size(text)
    assert info.value.errno == code


# --------------------------------------------------------- property: round trips

_hostname = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?(\.[a-z0-9]{1,10}){0,2}",
                          fullmatch=True)
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    _hostname,
    st.just(""),
)
_ports = st.one_of(st.integers(0, 65535).map(str), st.from_regex(r"[a-z][a-z0-9-]{0,15}",
                                                                 fullmatch=True))
_inet = st.builds(InetAddress, _hosts, _ports)
_unix = st.builds(UnixAddress, st.text(min_size=1))
_file = st.builds(
    FileAddress,
    st.text().filter(lambda s: ",offset=" not in s),
    st.integers(0, (1 << 64) - 1),
)
_exec_sh = st.builds(lambda cmd: ExecAddress(["/bin/sh", "-c", cmd]), st.text())
_fd = st.builds(FdAddress, st.text(min_size=1))


@given(st.one_of(_inet, _unix, _file, _exec_sh, _fd))
def test_parse_uri_round_trip(addr: Any) -> None:
    assert parse_uri(format_uri(addr)) == addr


@given(st.one_of(_inet, _unix, _file, _exec_sh, _fd,
                 st.builds(ExecAddress, st.lists(st.text(), min_size=1))))
def test_channels_round_trip(addr: Any) -> None:
    assert address_from_channels([address_to_channel(addr)]) == addr
    assert address_from_channels([address_to_channel(addr)], incoming=True) == addr


def test_format_uri_quotes_a_plain_argv() -> None:
    assert format_uri(ExecAddress(["cat", "a b"])) == "exec:cat 'a b'"


# ------------------------------------------------------------------ channels form

def _ch(addr: dict[str, Any], ctype: str = "main") -> dict[str, Any]:
    return {"channel-type": ctype, "addr": addr}


INET = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}


@pytest.mark.parametrize(("addr", "expected"), [
    (INET, InetAddress("127.0.0.1", "4444")),
    ({**INET, "ipv4": True, "keep-alive": False}, InetAddress("127.0.0.1", "4444")),
    ({"transport": "socket", "type": "unix", "path": "/tmp/s"}, UnixAddress("/tmp/s")),
    ({"transport": "socket", "type": "fd", "str": "fdname"}, FdAddress("fdname")),
    ({"transport": "exec", "args": ["/bin/cat", "-u"]}, ExecAddress(["/bin/cat", "-u"])),
    ({"transport": "file", "filename": "/tmp/f", "offset": 512}, FileAddress("/tmp/f", 512)),
])
def test_address_from_channels(addr: dict[str, Any], expected: object) -> None:
    assert address_from_channels([_ch(addr)]) == expected
    assert address_from_channels([_ch(addr)], incoming=True) == expected


def test_migrate_accepts_a_cpr_channel_beside_main() -> None:
    channels = [_ch({"transport": "socket", "type": "unix", "path": "/c"}, "cpr"), _ch(INET)]
    assert address_from_channels(channels) == InetAddress("127.0.0.1", "4444")


# Texts as QEMU 10.0.2's visitor gives them (enum errors name the bare member;
# a negative offset wraps, as tests/unit/test_qapi_channels.py checks).
@pytest.mark.parametrize(("channels", "incoming", "desc"), [
    ([_ch(INET), _ch(INET)], False, "Channel list has more than one main entry"),
    ([_ch(INET, "cpr"), _ch(INET, "cpr"), _ch(INET)], False,
     "Channel list has more than one cpr entry"),
    ([_ch(INET, "cpr")], False, "Channel list has no main entry"),
    ([], False, "Channel list has no main entry"),
    ([_ch(INET), _ch(INET)], True, "Channel list must have only one entry, for type 'main'"),
    ([_ch(INET), _ch(INET, "cpr")], True,
     "Channel list must have only one entry, for type 'main'"),
    ([_ch(INET, "cpr")], True, "Channel list has no main entry"),
    ("tcp:x:1", False, "Invalid parameter type for 'channels', expected: array"),
    (["main"], False, "Invalid parameter type for 'channels[0]', expected: object"),
    ([{"addr": INET}], False, "Parameter 'channels[0].channel-type' is missing"),
    ([{"channel-type": "main"}], False, "Parameter 'channels[0].addr' is missing"),
    ([_ch(INET, "other")], False,
     "Parameter 'channel-type' does not accept value 'other'"),
    ([{**_ch(INET), "extra": 1}], False, "Parameter 'channels[0].extra' is unexpected"),
    ([_ch({"type": "inet", "host": "h", "port": "1"})], False,
     "Parameter 'channels[0].addr.transport' is missing"),
    ([_ch({"transport": "carrier-pigeon"})], False,
     "Parameter 'transport' does not accept value 'carrier-pigeon'"),
    ([_ch({**INET, "port": 4444})], False,
     "Invalid parameter type for 'channels[0].addr.port', expected: string"),
    ([_ch({"transport": "socket", "type": "inet", "port": "1"})], False,
     "Parameter 'channels[0].addr.host' is missing"),
    ([_ch({**INET, "bogus": True})], False, "Parameter 'channels[0].addr.bogus' is unexpected"),
    ([_ch({"transport": "socket", "type": "pipe"})], False,
     "Parameter 'type' does not accept value 'pipe'"),
    ([_ch({"transport": "exec", "args": "cat"})], False,
     "Invalid parameter type for 'channels[0].addr.args', expected: array"),
    ([_ch({"transport": "exec", "args": ["cat", 1]})], False,
     "Invalid parameter type for 'channels[0].addr.args[1]', expected: string"),
    ([_ch({"transport": "file", "filename": "/f"})], False,
     "Parameter 'channels[0].addr.offset' is missing"),
    ([_ch({"transport": "file", "filename": "/f", "offset": "0"})], False,
     "Parameter 'channels[0].addr.offset' expects uint64"),
    ([_ch({"transport": "rdma", "host": "h", "port": "1"})], False,
     "Parameter 'uri' expects a valid migration protocol"),
    ([_ch({"transport": "socket", "type": "vsock", "cid": "3", "port": "1"})], False,
     "Parameter 'uri' expects a valid migration protocol"),
])
def test_address_from_channels_errors(channels: Any, incoming: bool, desc: str) -> None:
    with pytest.raises(TransportError) as info:
        address_from_channels(channels, incoming=incoming)
    assert info.value.desc == desc


@pytest.mark.parametrize("incoming", [False, True])
def test_resolve_migrate_args(incoming: bool) -> None:
    uri_addr = resolve_migrate_args("unix:/tmp/s", None, incoming=incoming)
    assert uri_addr == UnixAddress("/tmp/s")
    assert resolve_migrate_args("unix:/tmp/s", [], incoming=incoming) == uri_addr
    assert resolve_migrate_args(None, [_ch(INET)], incoming=incoming) == \
        InetAddress("127.0.0.1", "4444")
    for uri, channels in [(None, None), (None, []), ("unix:/s", [_ch(INET)]),
                          ("", [_ch(INET)])]:
        with pytest.raises(TransportError) as info:
            resolve_migrate_args(uri, channels, incoming=incoming)
        assert info.value.desc == "need either 'uri' or 'channels' argument"
    with pytest.raises(TransportError) as info:
        resolve_migrate_args("bogus:1", None, incoming=incoming)
    assert info.value.desc == "unknown migration protocol: bogus:1"


def test_resolve_migrate_args_incoming_rule() -> None:
    two = [_ch(INET), _ch(INET, "cpr")]
    assert resolve_migrate_args(None, two) == InetAddress("127.0.0.1", "4444")
    with pytest.raises(TransportError) as info:
        resolve_migrate_args(None, two, incoming=True)
    assert info.value.desc == "Channel list must have only one entry, for type 'main'"


# ------------------------------------------------------------------ TCP

@pytest.mark.timeout(30)
def test_tcp_port_zero_reports_the_real_port_and_carries_data() -> None:
    with listen(parse_uri("tcp:127.0.0.1:0")) as lst:
        [sa] = lst.socket_address()
        assert sa == {"type": "inet", "host": "127.0.0.1", "port": sa["port"], "ipv4": True}
        assert isinstance(sa["port"], str) and int(sa["port"]) > 0
        accepting = InThread(lambda: lst.accept(timeout=DEADLINE_S))
        src = open_outgoing(parse_uri(f"tcp:127.0.0.1:{sa['port']}"))
        dst = accepting.result()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with src, dst:
        assert src.supports_return_path and dst.supports_return_path
        assert src.kind == dst.kind == "socket"
        reader = InThread(lambda: read_all(dst))
        src.sendall(payload)
        src.sendall(bytearray(b"tail"))
        src.sendall(memoryview(b"xx"))
        assert src.bytes_sent == len(payload) + 6
        src.sock.shutdown(socket.SHUT_WR)  # EOF for the reader
        assert reader.result() == payload + b"tailxx"
        assert dst.bytes_received == len(payload) + 6


def _sysctl(name: str) -> int | None:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read())
    except OSError:
        return None


@pytest.mark.timeout(30)
def test_tcp_socket_options() -> None:
    src, dst = connected_tcp()
    with src, dst:
        for ch in (src, dst):
            sock = ch.sock
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.gettimeout() is None
            # Linux grants min(asked, [wr]mem_max) and reports it doubled.
            for opt, cap in ((socket.SO_SNDBUF, _sysctl("wmem_max")),
                             (socket.SO_RCVBUF, _sysctl("rmem_max"))):
                if cap is not None:
                    assert sock.getsockopt(socket.SOL_SOCKET, opt) == \
                        2 * min(SOCKET_BUFFER_BYTES, cap)


@pytest.mark.timeout(30)
@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")
def test_tcp_ipv6() -> None:
    with listen(parse_uri("tcp:[::1]:0")) as lst:
        [sa] = lst.socket_address()
        assert sa["type"] == "inet" and sa["host"] == "::1" and sa["ipv6"] is True
        accepting = InThread(lambda: lst.accept(timeout=DEADLINE_S))
        src = open_outgoing(parse_uri(f"tcp:[::1]:{sa['port']}"))
        dst = accepting.result()
    with src, dst:
        src.sendall(b"hello v6")
        buf = bytearray(8)
        dst.read_exact_into(buf)
        assert buf == b"hello v6"


@pytest.mark.timeout(30)
def test_tcp_return_path_is_the_same_socket_in_the_other_direction() -> None:
    src, dst = connected_tcp()
    with src, dst:
        rp_src = src.return_path()  # source reads destination's messages here
        rp_dst = dst.return_path()  # destination writes them here
        with rp_src, rp_dst:
            assert rp_src.sock.fileno() != src.sock.fileno()
            # Source streams while its RP thread reads, concurrently.
            rp_reader = InThread(lambda: read_all(rp_src))
            main_reader = InThread(lambda: read_all(dst))
            data = os.urandom(2 * 1024 * 1024)
            src.sendall(data)
            rp_dst.sendall(b"\x00\x07\x00\x00")  # a SWITCHOVER_ACK-shaped message
            src.sock.shutdown(socket.SHUT_WR)
            assert main_reader.result() == data
            rp_dst.sock.shutdown(socket.SHUT_WR)
            assert rp_reader.result() == b"\x00\x07\x00\x00"
            assert rp_dst.bytes_sent == 4 and src.bytes_sent == len(data)


@pytest.mark.timeout(30)
def test_tcp_connect_refused_text() -> None:
    holder, port = refused_port()
    with holder, pytest.raises(TransportError) as info:
        open_outgoing(parse_uri(f"tcp:127.0.0.1:{port}"))
    assert info.value.desc == f"Failed to connect to '127.0.0.1:{port}': Connection refused"
    assert info.value.errno == errno.ECONNREFUSED


def test_tcp_resolution_failure_text() -> None:
    addr = InetAddress("127.0.0.1", "no-such-service-livemig")
    for fn in (open_outgoing, listen):
        with pytest.raises(TransportError) as info:
            fn(addr)
        assert info.value.desc.startswith(
            "address resolution failed for 127.0.0.1:no-such-service-livemig: ")


def test_tcp_listen_address_in_use() -> None:
    with listen(InetAddress("127.0.0.1", "0")) as first:
        port = first.socket_address()[0]["port"]
        with pytest.raises(TransportError) as info:
            listen(InetAddress("127.0.0.1", port))
        assert info.value.desc == "Failed to find an available port: Address already in use"
        assert info.value.errno == errno.EADDRINUSE


@pytest.mark.timeout(30)
def test_listen_on_every_address_reports_each() -> None:
    with listen(parse_uri("tcp::0")) as lst:
        entries = lst.socket_address()
        assert entries and all(e["type"] == "inet" and int(e["port"]) > 0 for e in entries)
        v4 = [e for e in entries if e.get("ipv4")]
        assert v4 and v4[0]["host"] == "0.0.0.0"
        accepting = InThread(lambda: lst.accept(timeout=DEADLINE_S))
        src = open_outgoing(InetAddress("127.0.0.1", v4[0]["port"]))
        with src, accepting.result() as dst:
            src.sendall(b"any")
            buf = bytearray(3)
            dst.read_exact_into(buf)
            assert buf == b"any"


# ------------------------------------------------------------------ UNIX

@pytest.mark.timeout(30)
def test_unix_end_to_end_and_socket_file_lifetime(tmp_path: Any) -> None:
    path = str(tmp_path / "mig.sock")
    lst = listen(parse_uri(f"unix:{path}"))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert lst.socket_address() == [{"type": "unix", "path": path}]
    accepting = InThread(lambda: lst.accept(timeout=DEADLINE_S))
    src = open_outgoing(UnixAddress(path))
    dst = accepting.result()
    lst.close()
    assert not os.path.exists(path)
    lst.close()  # idempotent
    with src, dst:
        assert src.supports_return_path
        rp = dst.return_path()
        with rp:
            src.sendall(b"ram")
            rp.sendall(b"pong")
            a, b = bytearray(3), bytearray(4)
            dst.read_exact_into(a)
            src.read_exact_into(b)
            assert (a, b) == (b"ram", b"pong")


def test_unix_replaces_a_stale_socket_but_not_a_file(tmp_path: Any) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # leaves the socket file behind, like a crashed QEMU
    with listen(UnixAddress(path)):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not os.path.exists(path)

    blocker = tmp_path / "regular"
    blocker.write_text("keep me")
    with pytest.raises(TransportError) as info:
        listen(UnixAddress(str(blocker)))
    assert info.value.desc == f"Failed to bind socket to {blocker}: Address already in use"
    assert blocker.read_text() == "keep me"


def test_unix_close_leaves_a_foreign_socket_file(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    lst = listen(UnixAddress(path))
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's socket now lives at the path
    lst.close()
    assert os.path.exists(path)
    other.close()


def test_unix_errors(tmp_path: Any) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(TransportError) as info:
        open_outgoing(UnixAddress(missing))
    assert info.value.desc == f"Failed to connect to '{missing}': No such file or directory"
    long_path = "/tmp/" + "x" * 200
    for fn in (open_outgoing, listen):
        with pytest.raises(TransportError) as info:
            fn(UnixAddress(long_path))
        assert info.value.desc == f"UNIX socket path '{long_path}' is too long"
    with pytest.raises(TransportError) as info:
        listen(UnixAddress(str(tmp_path / "no" / "dir" / "s")))
    assert info.value.desc == (
        f"Failed to bind socket to {tmp_path / 'no' / 'dir' / 's'}: No such file or directory")


# ------------------------------------------------------------------ file:

def test_file_round_trip_with_offset(tmp_path: Any) -> None:
    path = tmp_path / "mig.bin"
    path.write_bytes(b"H" * 100 + b"old-data-to-be-cut" * 10)
    out = open_outgoing(parse_uri(f"file:{path},offset=100"))
    assert out.kind == "file" and not out.supports_return_path
    with pytest.raises(TransportError):
        out.return_path()
    pages = np.arange(4 * 4096, dtype=np.uint8).reshape(4, 4096)
    with out:
        out.sendall(b"QEVM")
        out.sendmsg_all([b"ab", pages[1:3], memoryview(b"cd")])
        out.finish()
        assert out.bytes_sent == 4 + 2 + 2 * 4096 + 2
    data = path.read_bytes()
    assert data[:100] == b"H" * 100  # bytes before the offset are kept
    assert data[100:] == b"QEVMab" + pages[1:3].tobytes() + b"cd"  # and the tail is cut

    lst = listen(FileAddress(str(path), 100))
    assert lst.socket_address() == []
    with lst:
        inp = lst.accept()
        with inp:
            assert read_all(inp, chunk=1000) == data[100:]
        with pytest.raises(TransportError):
            lst.accept()
    assert lst.closed


def test_file_created_with_mode_0600(tmp_path: Any) -> None:
    path = tmp_path / "new"
    with open_outgoing(FileAddress(str(path))) as ch:
        ch.sendall(b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    assert path.read_bytes() == b"x"


def test_file_dev_null_is_not_truncated() -> None:
    with open_outgoing(parse_uri("file:/dev/null")) as ch:
        ch.sendall(bytes(65536))
        assert ch.bytes_sent == 65536


def test_file_errors(tmp_path: Any) -> None:
    bad = tmp_path / "no" / "such" / "f"
    with pytest.raises(TransportError) as info:
        open_outgoing(FileAddress(str(bad)))
    assert info.value.desc == f"Unable to open {bad}: No such file or directory"
    with pytest.raises(TransportError) as info:
        listen(FileAddress(str(bad)))
    assert info.value.desc == f"Unable to open {bad}: No such file or directory"


def test_file_listener_close_without_accept(tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    lst = listen(FileAddress(str(path)))
    lst.close()
    with pytest.raises(TransportError) as info:
        lst.accept()
    assert info.value.errno == errno.ECANCELED


# ------------------------------------------------------------------ exec:

@pytest.mark.timeout(30)
def test_exec_outgoing_writes_to_the_command_stdin(tmp_path: Any) -> None:
    out_path = tmp_path / "out.bin"
    ch = open_outgoing(parse_uri(f"exec:cat > '{out_path}'"))
    assert ch.kind == "command" and not ch.supports_return_path
    payload = os.urandom(5 * 1024 * 1024 + 3)  # several pipe-fulls
    with ch:
        ch.sendall(payload)
        ch.sendmsg_all([b"x"] * 3000 + [np.ones(10, dtype=np.uint8)])
        ch.finish()
        assert ch.returncode == 0
    assert out_path.read_bytes() == payload + b"x" * 3000 + bytes([1] * 10)


@pytest.mark.timeout(30)
def test_exec_incoming_reads_the_command_stdout(tmp_path: Any) -> None:
    src = tmp_path / "in.bin"
    payload = os.urandom(3 * 1024 * 1024)
    src.write_bytes(payload)
    lst = listen(parse_uri(f"exec:cat '{src}'"))
    assert lst.socket_address() == []
    with lst:
        ch = lst.accept()
        with ch:
            assert read_all(ch) == payload
            ch.finish()


@pytest.mark.timeout(30)
def test_exec_channels_form_runs_argv_directly(tmp_path: Any) -> None:
    out_path = tmp_path / "argv.bin"
    script = "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())"
    addr = address_from_channels([_ch({"transport": "exec",
                                       "args": [sys.executable, "-c", script, str(out_path)]})])
    with open_outgoing(addr) as ch:
        ch.sendall(b"through argv")
        ch.finish()
    assert out_path.read_bytes() == b"through argv"


@pytest.mark.timeout(30)
def test_exec_non_zero_exit_is_reported_by_finish() -> None:
    ch = open_outgoing(parse_uri("exec:cat > /dev/null; exit 3"))
    with ch:
        ch.sendall(b"abc")
        with pytest.raises(TransportError) as info:
            ch.finish()
        assert info.value.desc == "Command exited with status 3"
    lst = listen(parse_uri("exec:printf hi; exit 4"))
    with lst, lst.accept() as inp:
        assert read_all(inp) == b"hi"
        with pytest.raises(TransportError) as info:
            inp.finish()
        assert info.value.desc == "Command exited with status 4"


@pytest.mark.timeout(30)
def test_exec_writing_to_a_command_that_exited() -> None:
    ch = open_outgoing(parse_uri("exec:exit 0"))
    with ch:
        assert ch.proc.wait(DEADLINE_S) == 0
        with pytest.raises(TransportError) as info:
            ch.sendall(bytes(1 << 20))
        assert info.value.desc == "Unable to write to command: Broken pipe"
        assert info.value.errno == errno.EPIPE


def test_exec_spawn_failure() -> None:
    addr = ExecAddress(["/nonexistent/livemig-helper"])
    with pytest.raises(TransportError) as info:
        open_outgoing(addr)
    assert info.value.desc == ("Failed to execute child process \u201c/nonexistent/livemig-helper"
                               "\u201d (No such file or directory)")
    with pytest.raises(TransportError):
        listen(addr)
    with pytest.raises(TransportError):
        open_outgoing(ExecAddress([]))


def test_fd_without_its_descriptor_is_not_found() -> None:
    """The commands layer resolves fd:NAME (getfd); unresolved, QEMU's text."""
    addr = parse_uri("fd:migfd")
    for fn in (open_outgoing, listen):
        with pytest.raises(TransportError) as info:
            fn(addr)
        assert info.value.desc == "File descriptor named 'migfd' has not been found"
        assert info.value.errno == errno.EBADF


# ------------------------------------------------------------------ shutdown

@pytest.mark.timeout(30)
def test_shutdown_wakes_a_blocked_recv_from_another_thread() -> None:
    src, dst = connected_tcp()
    with src, dst:
        blocked = InThread(lambda: dst.recv_into(bytearray(10)))
        assert not blocked.done.wait(0.05)  # really blocked: nothing was sent
        dst.shutdown()
        assert blocked.result() == 0
        dst.shutdown()  # idempotent
        assert dst.is_shutdown


@pytest.mark.timeout(30)
def test_shutdown_of_the_main_channel_wakes_the_return_path_reader() -> None:
    src, dst = connected_tcp()
    with src, dst, src.return_path() as rp:
        blocked = InThread(lambda: rp.read_exact_into(bytearray(4)))
        assert not blocked.done.wait(0.05)
        src.shutdown()  # migrate_cancel: shuts the one socket, both fds see it
        err = blocked.error()
        assert isinstance(err, UnexpectedEOF) and err.received == 0


@pytest.mark.timeout(30)
def test_shutdown_wakes_a_blocked_send() -> None:
    src, dst = connected_tcp()
    with src, dst:
        big = bytes(64 * 1024 * 1024)  # far more than both socket buffers hold
        blocked = InThread(lambda: src.sendall(big))
        assert not blocked.done.wait(0.2)  # the peer does not read: writer blocks
        src.shutdown()
        err = blocked.error()
        assert isinstance(err, TransportError)
        assert err.desc.startswith("Unable to write to socket: ")
        assert 0 < src.bytes_sent < len(big)


@pytest.mark.timeout(30)
def test_shutdown_wakes_a_reader_blocked_on_a_command_pipe() -> None:
    lst = listen(parse_uri("exec:sleep 60"))
    with lst:
        ch = lst.accept()
        blocked = InThread(lambda: ch.recv_into(bytearray(10)))
        assert not blocked.done.wait(0.05)
        ch.shutdown()
        assert blocked.result() == 0
        ch.close()  # kills the aborted command instead of waiting 60 s
        assert ch.proc.returncode is not None


@pytest.mark.timeout(30)
def test_shutdown_wakes_a_writer_blocked_on_a_command_pipe() -> None:
    ch = open_outgoing(parse_uri("exec:sleep 60"))  # never reads its stdin
    blocked = InThread(lambda: ch.sendall(bytes(16 * 1024 * 1024)))
    assert not blocked.done.wait(0.2)
    ch.shutdown()
    err = blocked.error()
    assert isinstance(err, TransportError)
    assert err.desc == "Unable to write to command: Broken pipe"
    ch.close()
    assert ch.proc.returncode is not None


@pytest.mark.timeout(30)
def test_listener_close_interrupts_accept(tmp_path: Any) -> None:
    for addr in (InetAddress("127.0.0.1", "0"), UnixAddress(str(tmp_path / "a.sock"))):
        lst = listen(addr)
        blocked = InThread(lambda lst=lst: lst.accept())
        assert not blocked.done.wait(0.05)
        lst.close()
        err = blocked.error()
        assert isinstance(err, TransportError) and err.errno == errno.ECANCELED
        with pytest.raises(TransportError):
            lst.accept()
    assert not os.path.exists(tmp_path / "a.sock")


@pytest.mark.timeout(30)
def test_accept_timeout() -> None:
    with listen(InetAddress("127.0.0.1", "0")) as lst:
        with pytest.raises(TransportError) as info:
            lst.accept(timeout=0.05)
        assert info.value.errno == errno.ETIMEDOUT


@pytest.mark.timeout(30)
def test_io_timeouts() -> None:
    src, dst = connected_tcp()
    with src, dst:
        dst.set_timeout(0.05)
        with pytest.raises(TransportError) as info:
            dst.recv_into(bytearray(1))
        assert info.value.desc == "Unable to read from socket: Connection timed out"
        assert info.value.errno == errno.ETIMEDOUT
        dst.set_timeout(None)
    with listen(parse_uri("exec:sleep 60")) as lst, lst.accept() as ch:
        ch.set_timeout(0.05)
        with pytest.raises(TransportError) as info:
            ch.recv_into(bytearray(1))
        assert info.value.desc == "Unable to read from command: Connection timed out"
        ch.shutdown()


@pytest.mark.timeout(30)
def test_peer_gone_errors() -> None:
    src, dst = connected_tcp()
    with src:
        dst.close()
        with pytest.raises(TransportError) as info:
            for _ in range(100):  # the first writes may still land in buffers
                src.sendall(bytes(1 << 20))
        assert info.value.desc.startswith("Unable to write to socket: ")
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)


@pytest.mark.timeout(30)
def test_read_exact_into_reports_a_torn_stream() -> None:
    src, dst = connected_tcp()
    with src, dst:
        src.sendall(b"abc")
        src.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(UnexpectedEOF) as info:
            dst.read_exact_into(bytearray(8))
        assert (info.value.received, info.value.expected) == (3, 8)
        assert isinstance(info.value, TransportError)


# ------------------------------------------------------------------ numpy buffers

@pytest.mark.timeout(60)
def test_sendmsg_all_gathers_numpy_pages_beyond_iov_max() -> None:
    pages = np.random.default_rng(1).integers(0, 256, (3000, 4096), dtype=np.uint8)
    headers = [np.full(8, i % 256, dtype=np.uint8) for i in range(3000)]
    buffers: list[Any] = []
    for i in range(3000):  # header + page, 6000 iovecs in all
        buffers += [headers[i], pages[i]]
    expected = b"".join(bytes(b) for b in buffers)
    src, dst = connected_tcp()
    with src, dst:
        recv = np.empty(len(expected), dtype=np.uint8)
        reader = InThread(lambda: dst.read_exact_into(recv))
        src.sendmsg_all(buffers)
        reader.result()
        assert recv.tobytes() == expected
        assert src.bytes_sent == len(expected)


@pytest.mark.timeout(60)
def test_sendmsg_all_resumes_after_partial_sends() -> None:
    # A send timeout makes the socket non-blocking underneath, so sendmsg
    # returns short counts whenever the socket buffer fills; a slow reader
    # guarantees that it does.
    pages = np.random.default_rng(2).integers(0, 256, (4096, 4096), dtype=np.uint8)  # 16 MiB
    src, dst = connected_tcp()
    with src, dst:
        src.set_timeout(DEADLINE_S)
        recv = np.zeros_like(pages)
        reader = InThread(lambda: dst.read_exact_into(recv))
        src.sendmsg_all([pages[:1000], pages[1000:1001], memoryview(pages[1001:])])
        reader.result()
        assert np.array_equal(recv, pages)
        assert src.bytes_sent == pages.nbytes


def _iovec(buffers: list[np.ndarray]) -> np.ndarray:
    iov = np.zeros(len(buffers), dtype=IOVEC)
    iov["base"] = [b.ctypes.data for b in buffers]
    iov["len"] = [b.nbytes for b in buffers]
    return iov


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, DEADLINE_S])
def test_send_iovec_gathers_beyond_iov_max_and_resumes_partial_writes(timeout) -> None:
    # Sizes of every kind (empty, 1 byte, pages, 1 MiB) in 3000 buffers (three
    # writev calls), over a socket with a small send buffer: with a timeout
    # (non-blocking underneath) writev returns short counts in the middle of
    # buffers and hits EAGAIN.
    rng = np.random.default_rng(5)
    sizes = rng.choice([0, 1, 8, 4096, 4104, 20000], size=3000)
    sizes[1500] = 1 << 20
    buffers = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in sizes]
    expected = b"".join(b.tobytes() for b in buffers)
    src, dst = connected_tcp()
    with src, dst:
        src.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        src.set_timeout(timeout)
        recv = np.empty(len(expected), dtype=np.uint8)
        reader = InThread(lambda: dst.read_exact_into(recv))
        iov = _iovec(buffers)
        before = iov.copy()
        src.send_iovec(iov)
        reader.result()
        assert recv.tobytes() == expected
        assert src.bytes_sent == len(expected)
        assert np.array_equal(iov, before)          # the caller's array is left alone


class _ShortIovecChannel(Channel):
    """writev that moves at most ``room`` bytes per call (reads the iovecs itself)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.data = bytearray()

    def _writev_raw(self, iov: np.ndarray) -> int:
        import ctypes
        left = self.room
        for base, length in iov.tolist():
            take = min(length, left)
            self.data += ctypes.string_at(base, take)
            left -= take
            if not left:
                break
        return self.room - left


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=40), st.integers(1, 97))
def test_send_iovec_resumes_inside_buffers(chunks: list[bytes], room: int) -> None:
    arrays = [np.frombuffer(c, dtype=np.uint8) if c else np.zeros(0, np.uint8) for c in chunks]
    ch = _ShortIovecChannel(room)
    ch.send_iovec(_iovec(arrays))
    assert bytes(ch.data) == b"".join(chunks)
    assert ch.bytes_sent == len(ch.data)


@pytest.mark.timeout(30)
def test_send_iovec_on_a_command_pipe_and_a_file(tmp_path: Any) -> None:
    buffers = [np.full(n, n % 251, dtype=np.uint8) for n in (5, 4096, 1 << 20, 0, 3)]
    expected = b"".join(b.tobytes() for b in buffers)
    out_path = tmp_path / "pipe.bin"
    with open_outgoing(parse_uri(f"exec:cat > '{out_path}'")) as ch:
        ch.send_iovec(_iovec(buffers))
        ch.finish()
    assert out_path.read_bytes() == expected
    file_path = tmp_path / "file.bin"
    with open_outgoing(FileAddress(str(file_path))) as ch:
        ch.send_iovec(_iovec(buffers))
        assert ch.bytes_sent == len(expected)
    assert file_path.read_bytes() == expected


@pytest.mark.timeout(30)
def test_send_iovec_errors_name_the_cause() -> None:
    a, b = Channel.socketpair()
    with a:
        b.close()
        with pytest.raises(TransportError, match="Unable to write to socket: Broken pipe"):
            big = np.zeros(8 << 20, dtype=np.uint8)
            a.send_iovec(_iovec([big]))
    with pytest.raises(ValueError):
        a.send_iovec(np.zeros(3, dtype=np.uint64))


@pytest.mark.timeout(30)
def test_shutdown_wakes_a_blocked_send_iovec() -> None:
    src, dst = connected_tcp()
    with src, dst:
        big = np.zeros(64 << 20, dtype=np.uint8)       # far more than the socket holds
        writer = InThread(lambda: src.send_iovec(_iovec([big])))
        src.shutdown()
        with pytest.raises(TransportError):
            writer.result()


class _TrickleChannel(Channel):
    """A channel whose every write moves at most 7 bytes: partial writes, always."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.calls = 0

    def _write(self, view: memoryview) -> int:
        return self._writev([view])

    def _writev(self, views: list[memoryview]) -> int:
        self.calls += 1
        room = 7
        for v in views:
            take = bytes(v[:room])
            self.data += take
            room -= len(take)
            if not room:
                break
        return 7 - room


@given(st.lists(st.binary(max_size=40), max_size=30))
def test_gather_resumes_mid_buffer(chunks: list[bytes]) -> None:
    ch = _TrickleChannel()
    ch.sendmsg_all([np.frombuffer(c, dtype=np.uint8) for c in chunks])
    assert bytes(ch.data) == b"".join(chunks)
    assert ch.bytes_sent == len(ch.data)
    ch2 = _TrickleChannel()
    ch2.sendall(b"".join(chunks))
    assert bytes(ch2.data) == b"".join(chunks)


def test_buffers_must_be_contiguous() -> None:
    pages = np.zeros((4, 4096), dtype=np.uint8)
    ch = _TrickleChannel()
    with pytest.raises(ValueError):
        ch.sendall(pages[::2])
    with pytest.raises(ValueError):
        ch.sendmsg_all([pages[:, :10]])
    ch.sendall(pages[1:3])  # a contiguous slice is fine
    ch.sendall(np.arange(4, dtype=np.uint32))  # any dtype, sent as its bytes
    assert len(ch.data) == 2 * 4096 + 16


@pytest.mark.timeout(30)
def test_recv_into_a_numpy_page_array() -> None:
    a, b = Channel.socketpair()
    with a, b:
        pages = np.arange(2 * 4096, dtype=np.uint8).reshape(2, 4096)
        target = np.zeros((4, 4096), dtype=np.uint8)
        a.sendmsg_all([pages])
        b.read_exact_into(target[1:3])  # straight into the "guest RAM"
        assert np.array_equal(target[1:3], pages)
        assert not target[0].any() and not target[3].any()


def test_limit_queue_shrinks_a_sockets_buffers_and_ignores_a_pipe():
    """Postcopy's short queue: SO_SNDBUF / SO_RCVBUF as asked (the kernel
    doubles them); a channel that is no socket is left alone."""
    a, b = SocketChannel.socketpair()
    try:
        a.limit_queue(send=64 << 10)
        b.limit_queue(recv=32 << 10)
        assert a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * (64 << 10)
        assert b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * (32 << 10)
        a.sendall(b"still a channel")
        buf = bytearray(15)
        assert b.read_exact_into(buf) == 15 and bytes(buf) == b"still a channel"
    finally:
        a.close()
        b.close()
    r, w = os.pipe()
    pipe = FdChannel(w, kind="pipe")
    try:
        pipe.limit_queue(send=64 << 10)
        pipe.sendall(b"x")
        assert os.read(r, 1) == b"x"
    finally:
        pipe.close()
        os.close(r)
