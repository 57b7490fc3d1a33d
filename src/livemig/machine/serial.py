"""The serial port (COM1, port 0x3f8): where guest output goes.

:class:`Serial` is the device the vCPU (KVM or soft) writes to; its backend
is one of QEMU's chardevs:

* ``-serial file:PATH``: every byte appended to the file, flushed at once;
* ``-serial unix:PATH,server=on,wait=off`` / ``tcp:...`` / ``chardev:ID`` (a
  socket chardev): every byte sent to the connected client as it is written
  (an observer outside timestamps them), never buffered. With no client the
  bytes are dropped, as QEMU does; a slow client loses what its socket buffer
  cannot take (non-blocking send, EAGAIN drops), a gone one is forgotten
  (EPIPE/ECONNRESET): the vCPU never blocks on the port and never fails;
* ``-serial null`` / ``none`` / no ``-serial``: bytes counted and dropped.

A listening socket is served by one small accept thread (``serial-accept``),
one client at a time as QEMU's socket chardev does: it accepts, then reads
(and discards: the guest has no serial input) until the client's EOF, then
accepts the next. A thread, not the asyncio loop: the Machine lives without
the QMP loop (unit tests, the destination before QMP is up), and a busy loop
must not delay the observer's connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import BinaryIO

from livemig.threadname import name_native_thread

COM1_PORT = 0x3F8
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class SerialSocket:
    """A socket chardev's byte sink: a listening socket (clients accepted on a
    thread) or one connected socket (client mode, or an inherited ``fd=N``)."""

    def __init__(self, sock: socket.socket, listening: bool, describe: str = "") -> None:
        self.describe = describe
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._closed = False
        self._connected = threading.Condition(self._lock)
        self.dropped = 0
        if listening:
            sock.setblocking(True)
            self._listener = sock
        else:
            sock.setblocking(True)
            self._client = sock
        self._thread = threading.Thread(target=self._run, name="serial-accept", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def wait_connected(self, timeout: float | None = None) -> bool:
        """QEMU's ``wait=on``: block until a first client is connected."""
        with self._connected:
            return self._connected.wait_for(lambda: self._client is not None or self._closed,
                                            timeout) and self._client is not None

    def write(self, data: bytes) -> None:
        """From the vCPU: never blocks, never raises."""
        client = self._client
        if client is None:
            self.dropped += len(data)
            return
        try:
            sent = client.send(data, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:  # EPIPE, ECONNRESET, closed under us: forget this client
            self._forget(client)
            sent = 0
        self.dropped += len(data) - sent

    def _forget(self, client: socket.socket) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        name_native_thread()
        while not self._closed:
            client = self._client
            if client is None:
                if self._listener is None:
                    return          # a client-mode socket, gone: no reconnect (QEMU's default)
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    return          # closed
                client.setblocking(True)
                if client.family != socket.AF_UNIX:
                    with contextlib.suppress(OSError):
                        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._connected:
                    if self._closed:
                        client.close()
                        return
                    self._client = client
                    self._connected.notify_all()
            try:                    # input is discarded; EOF means the client left
                while client.recv(4096):
                    pass
            except OSError:
                pass
            self._forget(client)
            client.close()

    def close(self) -> None:
        with self._connected:
            self._closed = True
            client, self._client = self._client, None
            self._connected.notify_all()
        for sock in (self._listener, client):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        for sock in (self._listener, client):
            if sock is not None:
                sock.close()


class Serial:
    """COM1. ``path``: ``-serial file:PATH``; ``sink``: a :class:`SerialSocket`."""

    def __init__(self, path: str | None = None, sink: SerialSocket | None = None) -> None:
        self.path = path
        self._file: BinaryIO | None = open(path, "ab", buffering=0) if path else None
        self.sink = sink
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            self.bytes_written += len(data)
            if self._file is not None:
                self._file.write(data)
            if self.sink is not None:
                self.sink.write(data)

    def close(self) -> None:
        with self._lock:    # no vCPU write is in a send while the socket closes
            if self._file is not None:
                self._file.close()
                self._file = None
            if self.sink is not None:
                self.sink.close()
                self.sink = None
