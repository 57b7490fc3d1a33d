"""QMP server: QEMU 10.0's monitor protocol over UNIX and TCP sockets, on asyncio.

The server speaks QMP byte for byte like ``qemu-system-x86_64 -qmp``, so
``qemu.qmp``, libvirt-style clients and scripts written against QEMU drive
livemig unmodified:

* greeting ``{"QMP": {"version": {...}, "capabilities": []}}`` (no OOB);
* capabilities negotiation (``qmp_capabilities``) before any command;
* requests are JSON objects, split across reads or concatenated in one,
  parsed by :class:`~livemig.qmp.qjson.JSONMessageParser` (QEMU's streamer
  and error texts);
* every response and event is one JSON object plus ``"\\r\\n"``, written by
  :func:`~livemig.qmp.qjson.encode_message` in QEMU's key order.

This module is the I/O shell only: where to listen comes from
:mod:`livemig.qmp.chardev`, the bytes from :mod:`livemig.qmp.qjson`, the
commands from :class:`~livemig.qmp.registry.CommandRegistry`. The names
those modules used to be imported from here by are re-exported.

Threads: everything here runs on the asyncio loop that called
:meth:`QMPServer.start` (the main thread), except :meth:`QMPServer.emit_event`
and :meth:`QMPServer.request_quit`, which any thread may call.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from livemig.qmp import errors
from livemig.qmp.chardev import (
    ChardevSpec,
    ListenSpec,
    bind_tcp,
    bind_unix,
    open_socket,
    parse_qmp_spec,
    unlink_socket,
)
from livemig.qmp.errors import QMPError, error_fields
from livemig.qmp.fds import CURRENT as CURRENT_MONITOR_FDS
from livemig.qmp.fds import MonitorFds
from livemig.qmp.qjson import (
    QEMU_MAX_NESTING,
    JSONMessageParser,
    encode_message,
    qdict_order,
    qmp_dumps,
)
from livemig.qmp.registry import ArgSpec, Command, CommandRegistry, normalize_args

__all__ = [
    "JSONMessageParser",
    "ListenSpec",
    "QMPServer",
    "encode_message",
    "parse_qmp_spec",
    "qdict_order",
    "qmp_dumps",
]

log = logging.getLogger(__name__)

_QMP_CAPABILITIES_ARGS: Final = normalize_args(
    {"*enable": ArgSpec("list", items=ArgSpec("str", enum=("oob",)))})
_READ_CHUNK: Final = 64 * 1024  # bytes per read
_MAX_FDS: Final = 16  # descriptors taken from one read (SCM_RIGHTS); more are cut off
_INT_SIZE: Final = array.array("i").itemsize
_CLOSE_GRACE_S: Final = 1.0  # seconds a closing client gets to take its last bytes


class _Listener:
    """One ``-qmp`` socket."""

    def __init__(self, spec: ListenSpec) -> None:
        self.spec = spec
        self.server: asyncio.Server | None = None
        self.path: str | None = None
        self.inode: int | None = None
        self.port: int | None = None
        self.first_client: asyncio.Future[None] | None = None


class _Session:
    """One connected client: its parser and negotiation state."""

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.task: asyncio.Task[Any] | None = None
        # Each buffered token costs ~200 bytes of Python objects: bound the count
        # by the byte budget too, or 1 MiB of "1," tokens holds ~120 MiB.
        self.parser = JSONMessageParser(max_token_size=server.max_input_bytes,
                                        max_token_count=max(1024, server.max_input_bytes // 16),
                                        max_nesting=server.max_nesting)
        self.peer = writer.get_extra_info("peername") or writer.get_extra_info("sockname")
        # Descriptors this client passed (SCM_RIGHTS) and named (getfd).
        self.fds = MonitorFds()
        # On a UNIX socket the client's bytes are read with recvmsg(), so that
        # descriptors sent with them arrive: the transport stops reading (before
        # its first read: this runs before the loop polls the new socket) and a
        # duplicate of the socket is read instead; writes stay with the transport.
        self.rsock: socket.socket | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            self.rsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM,
                                       fileno=os.dup(sock.fileno()))
            self.rsock.setblocking(False)

    async def read(self) -> bytes:
        """The next bytes from the client (b"" at EOF), taking passed descriptors."""
        if self.rsock is None:
            return await self.reader.read(_READ_CHUNK)
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancdata, _flags, _ = self.rsock.recvmsg(
                    _READ_CHUNK, socket.CMSG_SPACE(_MAX_FDS * _INT_SIZE),
                    socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                ready: asyncio.Future[None] = loop.create_future()
                fileno = self.rsock.fileno()

                def wake(ready: asyncio.Future[None] = ready) -> None:
                    if not ready.done():
                        ready.set_result(None)
                loop.add_reader(fileno, wake)
                try:
                    await ready
                finally:
                    loop.remove_reader(fileno)
                continue
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % _INT_SIZE
                    fds.extend(array.array("i", payload[:usable]))
            if fds:
                self.fds.receive(fds)   # QEMU keeps the last batch received
            return data

    def release(self) -> None:
        """The client is gone: its descriptors and the read socket are closed."""
        self.fds.close()
        if self.rsock is not None:
            self.rsock.close()

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_message(msg))


def _error_response(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


_BuiltinRun = Callable[[_Session, dict[str, Any]], Any]


def _not_via_registry(args: dict[str, Any]) -> Any:
    raise AssertionError("protocol commands run through QMPServer._builtin_run")


class QMPServer:
    """QMP monitor server on the main thread's asyncio loop.

    Usage::

        registry = CommandRegistry()
        registry.register("query-status", query_status)
        server = QMPServer(registry)
        await server.start("unix:/tmp/vm.qmp,server=on,wait=off")
        ...
        server.emit_event("STOP")            # from any thread
        ...
        await server.wait_closed()           # until close() or quit

    ``quit`` is implemented by the VM layer as
    ``registry.register("quit", lambda args: server.request_quit())``: the
    client gets ``{"return": {}}``, then the server closes and
    :meth:`wait_closed` returns, and the process can exit.

    ``max_input_bytes``: largest request (bytes of JSON tokens) accepted;
    ``max_nesting``: deepest request (brackets plus braces). Beyond either
    the client gets QEMU's limit error and the input is dropped.
    ``preconfig``: while True, commands not registered with
    ``allow_preconfig=True`` are refused like QEMU before machine creation.
    """

    def __init__(self, registry: CommandRegistry, *, version: tuple[int, int, int] = (10, 0, 2),
                 package: str = "livemig 0.1.0", max_input_bytes: int = 1 << 20,
                 max_nesting: int = QEMU_MAX_NESTING) -> None:
        self.registry = registry
        self.version = version
        self.package = package
        self.max_input_bytes = max_input_bytes
        self.max_nesting = max_nesting
        self.preconfig = False
        self._listeners: list[_Listener] = []
        self._sessions: set[_Session] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()  # client-mode connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._inflight = 0  # commands being executed or answered, all clients
        self._quit_requested = False
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        # Protocol commands: schema here, session-aware callables beside.
        self._builtins: dict[str, Command] = {
            name: Command(name, _not_via_registry, args, allow_preconfig=True)
            for name, args in (("qmp_capabilities", _QMP_CAPABILITIES_ARGS),
                               ("query-version", {}), ("query-commands", {}))}
        self._builtin_run: dict[str, _BuiltinRun] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
        }

    # -- inspection --

    @property
    def socket_paths(self) -> list[str]:
        """UNIX socket files being listened on."""
        return [lst.path for lst in self._listeners if lst.path is not None]

    @property
    def ports(self) -> list[int]:
        """TCP ports being listened on (the real one when the spec said 0)."""
        return [lst.port for lst in self._listeners if lst.port is not None]

    @property
    def clients(self) -> int:
        """Number of connected clients."""
        return len(self._sessions)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- listening (QMP loop) --

    async def start(self, spec: str | ChardevSpec) -> None:
        """Serve QMP on one socket chardev: a ``-qmp`` spec or a parsed ``-chardev``
        (``-mon chardev=ID,mode=control``); call once per monitor.

        ``server=on``: listen (with ``wait=on``, QEMU's default, return only
        once a first client is connected). ``server=off`` (QEMU's default):
        connect out and serve that one connection (client mode, as QEMU's
        Python machine class expects when it listens itself). ``fd=N``: an
        inherited descriptor, listening or connected (``SO_ACCEPTCONN``).
        Raises ValueError (ChardevError, QEMU's text) when the spec is wrong
        or the socket cannot be bound or connected.
        """
        listen = parse_qmp_spec(spec) if isinstance(spec, str) else spec
        if self._closing:
            raise RuntimeError("QMP server is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        elif self._loop is not loop:
            raise RuntimeError("QMP server already runs on another event loop")
        listener = _Listener(listen)
        opened = await loop.run_in_executor(None, open_socket, listen) \
            if not listen.server and listen.kind != "fd" else open_socket(listen)
        sock = opened.sock
        listener.path, listener.inode, listener.port = opened.path, opened.inode, opened.port
        callback = functools.partial(self._on_client, listener)
        try:
            if opened.listening:
                if listen.wait:
                    # Exists before the first accept() can run.
                    listener.first_client = loop.create_future()
                if sock.family == socket.AF_UNIX:
                    listener.server = await asyncio.start_unix_server(callback, sock=sock)
                else:
                    listener.server = await asyncio.start_server(callback, sock=sock)
            else:
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    reader, writer = await asyncio.open_unix_connection(sock=sock)
                else:
                    reader, writer = await asyncio.open_connection(sock=sock)
                task = loop.create_task(callback(reader, writer))
                self._client_tasks.add(task)
                task.add_done_callback(self._client_tasks.discard)
        except BaseException:
            sock.close()
            self._unlink(listener)
            raise
        self._listeners.append(listener)
        log.info("QMP %s %s", "listening on" if opened.listening else "connected to",
                 self._describe(listener))
        if listener.first_client is not None:
            log.info("QMP waiting for connection on %s", self._describe(listener))
            await listener.first_client

    @staticmethod
    def _describe(listener: _Listener) -> str:
        if listener.port is not None:
            return f"tcp:{listener.spec.host}:{listener.port}"
        return listener.spec.describe()

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        return bind_unix(path)

    @staticmethod
    def _bind_tcp(listen: ChardevSpec) -> socket.socket:
        return bind_tcp(listen)

    # -- clients (QMP loop) --

    async def _on_client(self, listener: _Listener, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        session = _Session(self, reader, writer)
        session.task = asyncio.current_task()
        if listener.spec.nodelay:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sessions.add(session)
        log.debug("QMP client connected: %s", session.peer)
        try:
            session.send(self._greeting())
            if listener.first_client is not None and not listener.first_client.done():
                listener.first_client.set_result(None)
            await writer.drain()
            await self._serve(session)
        except (ConnectionError, OSError) as exc:
            log.debug("QMP client %s: %s", session.peer, exc)
        except asyncio.CancelledError:
            # Only close() cancels this task, which it owns. Ending quietly
            # also spares CPython 3.11's start_server() callback, which calls
            # task.exception() on a cancelled task and logs the error.
            pass
        finally:
            self._sessions.discard(session)
            writer.close()
            log.debug("QMP client gone: %s", session.peer)

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._version_info(), "capabilities": []}}

    def _version_info(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": self.package}

    async def _serve(self, session: _Session) -> None:
        """Read, parse and answer requests of one client, in order."""
        # The commands of this client's task find its descriptors (monitor_cur()).
        CURRENT_MONITOR_FDS.set(session.fds)
        try:
            await self._serve_requests(session)
        finally:
            session.release()

    async def _serve_requests(self, session: _Session) -> None:
        while True:
            data = await session.read()
            if not data:
                return
            for request, parse_error in session.parser.feed(data):
                self._inflight += 1
                try:
                    if parse_error is not None:
                        response = _error_response(errors.GENERIC_ERROR, parse_error)
                    else:
                        response = await self._dispatch(session, request)
                    self._send_response(session, response, request)
                    await session.writer.drain()
                finally:
                    self._inflight -= 1
                if self._quit_requested:
                    self._begin_close()
                    return

    def _send_response(self, session: _Session, response: dict[str, Any],
                       request: Any) -> None:
        try:
            data = encode_message(response)
        except (TypeError, ValueError) as exc:
            log.error("QMP response to %r cannot be encoded: %s", request, exc)
            fallback = _error_response(errors.GENERIC_ERROR, f"internal error: {exc}")
            if "id" in response:
                fallback["id"] = response["id"]
            data = encode_message(fallback)
        if not session.writer.is_closing():
            session.writer.write(data)

    async def _dispatch(self, session: _Session, request: Any) -> dict[str, Any]:
        """qmp_dispatch() plus monitor_qmp_dispatch()'s negotiation hint."""
        response = await self._dispatch_request(session, request)
        if not session.negotiated:
            error = response.get("error")
            if error is not None and error["class"] == errors.COMMAND_NOT_FOUND:
                error["desc"] = errors.EXPECTING_NEGOTIATION
        return response

    async def _dispatch_request(self, session: _Session, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return _error_response(errors.GENERIC_ERROR, errors.INPUT_NOT_OBJECT)
        response = await self._execute(session, request)
        if "id" in request:
            response["id"] = request["id"]
        return response

    async def _execute(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        # qmp_dispatch_check_obj() looks at members in QDict order.
        for key in qdict_order(request):
            value = request[key]
            if key == "execute":
                if not isinstance(value, str):
                    return _error_response(errors.GENERIC_ERROR,
                                           errors.INPUT_MEMBER_NOT_STRING % key)
            elif key == "arguments":
                if not isinstance(value, dict):
                    return _error_response(errors.GENERIC_ERROR,
                                           errors.INPUT_ARGUMENTS_NOT_OBJECT)
            elif key != "id":
                return _error_response(errors.GENERIC_ERROR,
                                       errors.INPUT_MEMBER_UNEXPECTED % key)
        if "execute" not in request:
            return _error_response(errors.GENERIC_ERROR, errors.INPUT_LACKS_EXECUTE)
        name = request["execute"]
        command = self._find_command(session, name)
        if command is None:
            return _error_response(errors.COMMAND_NOT_FOUND, errors.COMMAND_NOT_FOUND_TEXT % name)
        if self.preconfig and not command.allow_preconfig:
            return _error_response(errors.GENERIC_ERROR, errors.COMMAND_NEEDS_MACHINE % name)
        try:
            arguments = command.validate(request.get("arguments", {}))
            builtin = self._builtin_run.get(name) if command is self._builtins.get(name) else None
            if builtin is not None:
                result = builtin(session, arguments)
            elif command.blocking:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(None, command.handler, arguments)
            else:
                result = command.handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fields = error_fields(exc)
            if fields is None:
                log.exception("QMP command %s failed", name)
                return _error_response(errors.GENERIC_ERROR, str(exc) or type(exc).__name__)
            log.debug("QMP command %s: %s: %s", name, *fields)
            return _error_response(*fields)
        return {"return": {} if result is None else result}

    def _find_command(self, session: _Session, name: str) -> Command | None:
        if not session.negotiated:
            # QEMU's qmp_cap_negotiation_commands holds only this one.
            return self._builtins["qmp_capabilities"] if name == "qmp_capabilities" else None
        return self._builtins.get(name) or self.registry.get(name)

    # -- protocol commands --

    def _qmp_capabilities(self, session: _Session, args: dict[str, Any]) -> dict[str, Any]:
        if session.negotiated:
            raise QMPError(errors.NEGOTIATION_COMPLETE, error_class=errors.COMMAND_NOT_FOUND)
        unavailable = list(args.get("enable", []))  # we offer no capability
        if unavailable:
            raise QMPError(errors.CAPABILITY_NOT_AVAILABLE % ", ".join(unavailable))
        session.negotiated = True
        return {}

    def _query_version(self, session: _Session, args: dict[str, Any]) -> dict[str, Any]:
        return self._version_info()

    def _query_commands(self, session: _Session, args: dict[str, Any]) -> list[dict[str, str]]:
        names = list(self._builtins) + self.registry.names()
        return [{"name": name} for name in names]

    # -- events (any thread) --

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every client past negotiation. Any thread.

        The timestamp is taken now (wall clock, like QEMU's
        ``g_get_real_time``) and ``data`` is serialised now, so the caller
        may reuse it. From the loop thread the event is written at once (so
        an event a handler emits precedes its response, as in QEMU); from
        other threads it is queued to the loop in call order. Events emitted
        before :meth:`start` or after :meth:`close` are dropped.
        """
        now_us = time.time_ns() // 1000
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}
        line = encode_message(msg)
        loop = self._loop
        if loop is None or self._closing:
            return
        if threading.get_ident() == self._loop_thread:
            self._broadcast(line)
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._broadcast, line)

    def _broadcast(self, line: bytes) -> None:
        if self._closing:
            return
        for session in list(self._sessions):
            if session.negotiated and not session.writer.is_closing():
                session.writer.write(line)

    # -- shutting down --

    def request_quit(self) -> None:
        """Close the server once the response to the running command is sent.

        For ``quit``: the handler calls this and returns; the client
        receives ``{"return": {}}`` (flushed to the socket), then listeners
        and clients are closed, socket files removed, and
        :meth:`wait_closed` returns. Called when no command is running
        (say, from a signal handler or the engine), it closes at once. Any
        thread. Commands of other clients still running are not cut short:
        the close follows the first response flushed after this call. To
        stop regardless (a signal, a fatal error), ``await close()`` instead.
        """
        self._quit_requested = True
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._quit_if_idle()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._quit_if_idle)

    @property
    def quit_requested(self) -> bool:
        return self._quit_requested

    def _quit_if_idle(self) -> None:
        if self._inflight == 0:
            self._begin_close()

    def _begin_close(self) -> None:
        if self._close_task is None and not self._closing and self._loop is not None:
            self._close_task = self._loop.create_task(self.close())

    async def close(self) -> None:
        """Close listeners and clients; remove the UNIX socket files we made."""
        if self._closing:
            if self._close_task is not None and self._close_task is not asyncio.current_task():
                await asyncio.shield(self._close_task)
            else:
                await self._closed.wait()
            return
        self._closing = True
        try:
            for listener in self._listeners:
                if listener.server is not None:
                    listener.server.close()
                if listener.first_client is not None and not listener.first_client.done():
                    listener.first_client.set_exception(
                        RuntimeError("QMP server closed while waiting for a client"))
            current = asyncio.current_task()
            sessions = list(self._sessions)
            for session in sessions:
                session.writer.close()
            tasks = [s.task for s in sessions if s.task is not None and s.task is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for session in sessions:
                try:
                    await asyncio.wait_for(session.writer.wait_closed(), _CLOSE_GRACE_S)
                except (TimeoutError, ConnectionError, OSError):
                    session.writer.transport.abort()
            for listener in self._listeners:
                if listener.server is not None:
                    await listener.server.wait_closed()
                self._unlink(listener)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once the server is closed (by :meth:`close` or a quit)."""
        await self._closed.wait()

    @staticmethod
    def _unlink(listener: _Listener) -> None:
        """Remove our socket file, unless someone else's has replaced it."""
        unlink_socket(listener.path, listener.inode)
