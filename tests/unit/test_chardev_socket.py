"""Opening socket chardevs (bind, connect out, adopt fd=N) and the serial port's
socket sink: bytes go to the client as written, dropped without one, and a slow or
gone client never blocks or fails the writer (the vCPU)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from livemig.machine.serial import Serial, SerialSocket
from livemig.qmp.chardev import ChardevError, open_socket, parse_chardev

DEADLINE_S = 10.0


def wait_for(pred, what: str, timeout: float = DEADLINE_S) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(DEADLINE_S)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "EOF"
        out += chunk
    return out


@pytest.mark.timeout(30)
def test_client_mode_failures_are_qemus_texts(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    with pytest.raises(ChardevError) as exc:
        open_socket(parse_chardev(f"socket,id=m,path={missing}"))
    assert str(exc.value) == f"Failed to connect to '{missing}': No such file or directory"
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ChardevError) as exc:
        open_socket(parse_chardev(f"socket,id=m,host=127.0.0.1,port={port}"))
    assert str(exc.value) == f"Failed to connect to '127.0.0.1:{port}': Connection refused"


@pytest.mark.timeout(30)
def test_fd_that_is_not_a_socket(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(ChardevError) as exc:
            open_socket(parse_chardev(f"socket,id=m,fd={fd}"))
        assert str(exc.value) == f"File descriptor '{fd}' is not a socket"
        os.fstat(fd)   # still open: a refused fd is not ours to close
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_fd_listening_or_connected_by_so_acceptconn(tmp_path: Path) -> None:
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(tmp_path / "l.sock"))
    lsock.listen(1)
    opened = open_socket(parse_chardev(f"socket,id=m,fd={lsock.detach()}"))
    assert opened.listening
    opened.sock.close()
    a, b = socket.socketpair()
    opened = open_socket(parse_chardev(f"socket,id=m,fd={a.detach()}"))
    assert not opened.listening
    opened.sock.sendall(b"hi")
    assert recv_exactly(b, 2) == b"hi"
    opened.sock.close()
    b.close()


@pytest.mark.timeout(30)
def test_server_sink_drops_without_client_then_streams_to_one(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    opened = open_socket(parse_chardev(f"socket,id=s,path={path},server=on,wait=off"))
    assert opened.listening and path.exists() and (path.stat().st_mode & 0o777) == 0o600
    serial = Serial(sink=SerialSocket(opened.sock, True))
    try:
        serial.write(b"lost")                      # nobody connected: dropped, as QEMU
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        assert serial.sink is not None
        wait_for(lambda: serial.sink.connected, "the accept")
        serial.write(b"A")
        serial.write(b"B")
        assert recv_exactly(client, 2) == b"AB"
        client.close()                             # gone: forgotten, the next one served
        wait_for(lambda: not serial.sink.connected, "the client's EOF to be seen")
        serial.write(b"x" * 10)                    # never raises
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(path))
        wait_for(lambda: serial.sink.connected, "the second accept")
        serial.write(b"C")
        assert recv_exactly(second, 1) == b"C"
        second.close()
    finally:
        serial.close()
    assert serial.bytes_written == 17


@pytest.mark.timeout(30)
def test_a_client_that_never_reads_never_blocks_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    opened = open_socket(parse_chardev(f"socket,id=s,path={path},server=on,wait=off"))
    sink = SerialSocket(opened.sock, True)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    try:
        wait_for(lambda: sink.connected, "the accept")
        chunk = b"." * 4096
        start = time.monotonic()
        for _ in range(2000):                      # 8 MiB: far beyond any socket buffer
            sink.write(chunk)
        assert time.monotonic() - start < 5.0
        assert sink.dropped > 0 and sink.connected
    finally:
        client.close()
        sink.close()


@pytest.mark.timeout(30)
def test_a_client_gone_mid_stream_is_forgotten_not_fatal() -> None:
    a, b = socket.socketpair()
    sink = SerialSocket(a, False)                 # client mode / a connected fd
    try:
        sink.write(b"A")
        assert recv_exactly(b, 1) == b"A"
        b.close()
        for _ in range(100):                       # EPIPE: never raised to the writer
            sink.write(b"B")
        wait_for(lambda: not sink.connected, "the client to be forgotten")
    finally:
        sink.close()


@pytest.mark.timeout(30)
def test_wait_on_blocks_until_the_first_client(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    opened = open_socket(parse_chardev(f"socket,id=s,path={path},server=on"))
    sink = SerialSocket(opened.sock, True)
    try:
        assert not sink.wait_connected(timeout=0.05)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        assert sink.wait_connected(timeout=DEADLINE_S)
        client.close()
    finally:
        sink.close()


@pytest.mark.timeout(30)
def test_tcp_server_port_zero(tmp_path: Path) -> None:
    opened = open_socket(parse_chardev("socket,id=s,host=127.0.0.1,port=0,server=on,wait=off"))
    assert opened.listening and opened.port
    sink = SerialSocket(opened.sock, True)
    client = socket.create_connection(("127.0.0.1", opened.port))
    try:
        wait_for(lambda: sink.connected, "the accept")
        sink.write(b"AB")
        assert recv_exactly(client, 2) == b"AB"
    finally:
        client.close()
        sink.close()
