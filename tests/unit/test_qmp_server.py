"""QMP server protocol layer: real sockets, driven by qemu.qmp and raw bytes.

Expected texts are QEMU 10.0's (see livemig.qmp.errors for their sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import pytest
from qemu.qmp import ExecuteError, QMPClient

from livemig.qmp.errors import QMPError
from livemig.qmp.qjson import qdict_order, qmp_dumps
from livemig.qmp.registry import ArgSpec, CommandRegistry
from livemig.qmp.server import QMPServer

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
            b'"package": "livemig 0.1.0"}, "capabilities": []}}\r\n')
TIMEOUT_S = 20.0


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a test coroutine on a fresh loop, with a deadline."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), TIMEOUT_S)
    return asyncio.run(bounded())


class DuckError(Exception):
    """Like livemig.qapi's QapiError: QMP fields, no QMPError base."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.error_class = "GenericError"
        self.desc = desc


class Harness:
    """A server with a few test commands, on a UNIX socket in tmp_path."""

    def __init__(self, tmp_path: Path, **server_kwargs: Any) -> None:
        self.path = str(tmp_path / "qmp.sock")
        self.registry = CommandRegistry()
        self.server = QMPServer(self.registry, **server_kwargs)
        self.release = asyncio.Event()
        self.blocking_thread: int | None = None
        reg = self.registry

        @reg.register("echo", args={"*value": "any"})
        def echo(args: dict) -> Any:
            return args.get("value")

        reg.register("typed", lambda args: args, args={
            "uri": "str",
            "*count": "int",
            "*size": "uint64",
            "*channels": "uint8",
            "*flag": "bool",
            "*ratio": "number",
            "*opts": ArgSpec("dict", members={"mode": ArgSpec("str", enum=("normal", "cpr"))}),
            "*capabilities": ArgSpec("list", items=ArgSpec("dict", members={
                "capability": ArgSpec("str", enum=("events", "return-path")),
                "state": "bool"})),
        })

        @reg.register("depth", args={"value": "any"})
        def depth(args: dict) -> int:
            value, levels = args["value"], 0
            while isinstance(value, list) and value:
                value, levels = value[0], levels + 1
            return levels

        @reg.register("fail")
        def fail(args: dict) -> None:
            raise QMPError("Device 'x' not found", error_class="DeviceNotFound")

        @reg.register("duck")
        def duck(args: dict) -> None:
            raise DuckError("State blocked by non-migratable device 'vfio'")

        @reg.register("boom")
        def boom(args: dict) -> None:
            raise RuntimeError("kaboom")

        @reg.register("slow")
        async def slow(args: dict) -> dict:
            await self.release.wait()
            return {"slow": True}

        @reg.register("blocking", blocking=True)
        def blocking(args: dict) -> dict:
            self.blocking_thread = threading.get_ident()
            time.sleep(0.01)
            return {"ok": True}

        @reg.register("emit")
        def emit(args: dict) -> None:
            self.server.emit_event("MIGRATION", {"status": "setup"})

        @reg.register("quit")
        def quit_(args: dict) -> None:
            self.server.request_quit()

    async def __aenter__(self) -> Self:
        await self.server.start(f"unix:{self.path},server=on,wait=off")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()

    async def client(self) -> QMPClient:
        qmp = QMPClient("test")
        await qmp.connect(self.path)
        return qmp

    async def raw(self, *, negotiate: bool = False) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=4 << 20)
        client = RawClient(reader, writer)
        assert await client.line() == GREETING
        if negotiate:
            assert await client.call({"execute": "qmp_capabilities"}) == {"return": {}}
        return client


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        return await self.reader.readuntil(b"\r\n")

    async def recv(self) -> Any:
        return json.loads(await self.line())

    async def call(self, request: Any) -> Any:
        await self.send(json.dumps(request).encode() + b"\n")
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def error(desc: str, error_class: str = "GenericError", **extra: Any) -> dict:
    return {"error": {"class": error_class, "desc": desc}, **extra}


# -- greeting and negotiation ------------------------------------------------


@pytest.mark.timeout(30)
def test_greeting_is_qemus_bytes(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw()  # asserts the exact greeting line
            await raw.close()
            qmp = await h.client()
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.capabilities == []
            await qmp.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_commands_refused_before_negotiation(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw()
            expecting = "Expecting capabilities negotiation with 'qmp_capabilities'"
            await raw.send(b'{"execute": "query-version", "id": 1}\n')
            assert await raw.line() == (
                b'{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting '
                b'capabilities negotiation with \'qmp_capabilities\'"}}\r\n')
            assert await raw.call({"execute": "nosuch"}) == error(expecting, "CommandNotFound")
            # Not a CommandNotFound: reported as is, even before negotiation.
            assert await raw.call({"execute": 1}) == error(
                "QMP input member 'execute' must be a string")
            assert await raw.call({"execute": "qmp_capabilities"}) == {"return": {}}
            assert await raw.call({"execute": "qmp_capabilities", "id": "x"}) == error(
                "Capabilities negotiation is already complete, command ignored",
                "CommandNotFound", id="x")
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_oob_capability_is_not_offered(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw()
            assert await raw.call({"execute": "qmp_capabilities",
                                   "arguments": {"enable": ["oob"]}}) == error(
                "Capability oob not available")
            assert await raw.call({"execute": "qmp_capabilities",
                                   "arguments": {"enable": ["bogus"]}}) == error(
                "Parameter 'null' does not accept value 'bogus'")
            assert await raw.call({"execute": "qmp_capabilities",
                                   "arguments": {"enable": "oob"}}) == error(
                "Invalid parameter type for 'enable', expected: array")
            # Still negotiating: a plain qmp_capabilities works.
            assert await raw.call({"execute": "qmp_capabilities",
                                   "arguments": {"enable": []}}) == {"return": {}}
            assert await raw.call({"execute": "echo", "arguments": {"value": 7}}) == {
                "return": 7}
            await raw.close()
    run(main)


# -- responses ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_id_is_echoed_whatever_its_json_type(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            for ident in (1, "abc", None, 1.5, True, [1, {"x": None}], {"a": [2]}):
                request = {"execute": "echo", "arguments": {"value": "v"}, "id": ident}
                assert await raw.call(request) == {"return": "v", "id": ident}
                request = {"execute": "nosuch", "id": ident}
                assert await raw.call(request) == error(
                    "The command nosuch has not been found", "CommandNotFound", id=ident)
            # QEMU's key order: return before id, id before error.
            await raw.send(b'{"execute": "echo", "id": 1}\n')
            assert await raw.line() == b'{"return": {}, "id": 1}\r\n'
            await raw.send(b'{"id": 2, "execute": "fail"}\n')
            assert await raw.line() == (b'{"id": 2, "error": {"class": "DeviceNotFound", '
                                        b'"desc": "Device \'x\' not found"}}\r\n')
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_query_version_and_query_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path, version=(10, 0, 2), package="livemig 0.1.0") as h:
            qmp = await h.client()
            assert await qmp.execute("query-version") == {
                "qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "livemig 0.1.0"}
            names = [entry["name"] for entry in await qmp.execute("query-commands")]
            assert names[:3] == ["qmp_capabilities", "query-version", "query-commands"]
            assert set(h.registry.names()) <= set(names)
            await qmp.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_unknown_command_and_handler_errors(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            qmp = await h.client()
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("nosuch")
            assert info.value.error_class == "CommandNotFound"
            assert str(info.value) == "The command nosuch has not been found"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("fail")
            assert (info.value.error_class, str(info.value)) == (
                "DeviceNotFound", "Device 'x' not found")
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("duck")
            assert (info.value.error_class, str(info.value)) == (
                "GenericError", "State blocked by non-migratable device 'vfio'")
            with (caplog.at_level(logging.ERROR, logger="livemig.qmp.server"),
                  pytest.raises(ExecuteError) as info):
                await qmp.execute("boom")
            assert (info.value.error_class, str(info.value)) == ("GenericError", "kaboom")
            assert any("kaboom" in (r.exc_text or "") or r.exc_info for r in caplog.records)
            # The server survived all of that.
            assert await qmp.execute("echo", {"value": [1]}) == [1]
            await qmp.disconnect()
    run(main)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("arguments", "desc"), [
    ({}, "Parameter 'uri' is missing"),
    ({"uri": "tcp:x:1", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": None}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": "u", "count": "1"}, "Invalid parameter type for 'count', expected: integer"),
    ({"uri": "u", "count": 1.0}, "Invalid parameter type for 'count', expected: integer"),
    ({"uri": "u", "count": True}, "Invalid parameter type for 'count', expected: integer"),
    ({"uri": "u", "flag": 1}, "Invalid parameter type for 'flag', expected: boolean"),
    ({"uri": "u", "ratio": "x"}, "Invalid parameter type for 'ratio', expected: number"),
    ({"uri": "u", "size": 1.5}, "Parameter 'size' expects uint64"),
    ({"uri": "u", "size": "1"}, "Parameter 'size' expects uint64"),
    ({"uri": "u", "channels": 256}, "Parameter 'channels' expects uint8_t"),
    ({"uri": "u", "opts": []}, "Invalid parameter type for 'opts', expected: object"),
    ({"uri": "u", "opts": {"mode": "x"}}, "Parameter 'mode' does not accept value 'x'"),
    ({"uri": "u", "opts": {"mode": "cpr", "z": 1}}, "Parameter 'opts.z' is unexpected"),
    ({"uri": "u", "capabilities": {}},
     "Invalid parameter type for 'capabilities', expected: array"),
    ({"uri": "u", "capabilities": [1]},
     "Invalid parameter type for 'capabilities[0]', expected: object"),
    ({"uri": "u", "capabilities": [{"capability": "events", "state": True},
                                   {"capability": "events"}]},
     "Parameter 'capabilities[1].state' is missing"),
    ({"uri": "u", "capabilities": [{"capability": "events", "state": "on"}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    # Missing members are found in schema order, before left-over keys.
    ({"bogus": 1}, "Parameter 'uri' is missing"),
])
def test_argument_validation_uses_qemu_texts(tmp_path: Path, arguments: dict,
                                             desc: str) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            qmp = await h.client()
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("typed", arguments)
            assert (info.value.error_class, str(info.value)) == ("GenericError", desc)
            await qmp.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_arguments_are_converted_like_qemu(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            qmp = await h.client()
            result = await qmp.execute("typed", {"uri": "u", "size": -1, "ratio": 2,
                                                 "count": -(1 << 63)})
            # uint64 wraps negative values (QEMU keeps this for compatibility).
            assert result == {"uri": "u", "count": -(1 << 63), "size": (1 << 64) - 1,
                              "ratio": 2.0}
            await qmp.disconnect()
            # 'number' reaches the handler as a float (QEMU's double) ...
            command = h.registry.get("typed")
            assert command is not None
            assert command.validate({"uri": "u", "ratio": 2}) == {"uri": "u", "ratio": 2.0}
            assert isinstance(command.validate({"uri": "u", "ratio": 2})["ratio"], float)
            # ... and is written back like QEMU's "%.17g".
            assert qmp_dumps([2.0, 0.5]) == "[2, 0.5]"
    run(main)


@pytest.mark.timeout(30)
def test_request_envelope_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            cases = [
                ([1, 2], error("QMP input must be a JSON object")),
                ({"execute": "echo", "arguments": [1], "id": 3},
                 error("QMP input member 'arguments' must be an object", id=3)),
                ({"arguments": {}, "id": 4}, error("QMP input lacks member 'execute'", id=4)),
                ({"execute": "echo", "foo": 1},
                 error("QMP input member 'foo' is unexpected")),
                ({"exec-oob": "echo"}, error("QMP input member 'exec-oob' is unexpected")),
                # Members are checked in QDict hash order, like QEMU: 'bogus'
                # comes before 'execute', 'execute' before 'foo'.
                ({"execute": 42, "bogus": 1}, error("QMP input member 'bogus' is unexpected")),
                ({"execute": 42, "foo": 1},
                 error("QMP input member 'execute' must be a string")),
            ]
            for request, expected in cases:
                assert await raw.call(request) == expected, request
            assert qdict_order(["execute", "bogus", "foo"]) == ["bogus", "execute", "foo"]
            await raw.close()
    run(main)


# -- the byte stream ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_garbage_then_valid_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            await raw.send(b'garbage\n{"execute": "echo", "arguments": {"value": 1}, "id": 2}\n')
            assert await raw.recv() == error("JSON parse error, invalid keyword 'garbage'")
            assert await raw.recv() == {"return": 1, "id": 2}
            # A stray byte: QEMU reports it, skips to the next structural
            # character, and reports what is left of that object too.
            await raw.send(b'{"execute": @}\n{"execute": "echo", "id": 3}\n')
            assert await raw.recv() == error("JSON parse error, stray '@'")
            assert await raw.recv() == error("JSON parse error, expecting value")
            assert await raw.recv() == {"return": {}, "id": 3}
            await raw.send(b'{"execute": }\n')
            assert await raw.recv() == error("JSON parse error, expecting value")
            await raw.send(b'"unterminated\n{"execute": "echo", "id": 4}\n')
            assert await raw.recv() == error("JSON parse error, stray '\"unterminated\n'")
            assert await raw.recv() == {"return": {}, "id": 4}
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_split_and_concatenated_objects(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            request = b'{"execute": "echo", "arguments": {"value": "\xc3\xa9"}, "id": 1}'
            for byte in request:
                await raw.send(bytes([byte]))
            assert await raw.line() == b'{"return": "\\u00E9", "id": 1}\r\n'
            await raw.send(b'{"execute": "echo", "id": 2}{"execute": "echo", "id": 3}'
                           b'  {"execute":\n"echo", "id": 4}')
            assert [await raw.recv() for _ in range(3)] == [
                {"return": {}, "id": 2}, {"return": {}, "id": 3}, {"return": {}, "id": 4}]
            await raw.close()
    run(main)


@pytest.mark.timeout(60)
def test_oversized_input_is_dropped_and_client_kept(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            big = b"a" * ((1 << 20) + 1000)
            request = b'{"execute": "echo", "arguments": {"value": "' + big + b'"}}\n'
            for offset in range(0, len(request), 100_000):
                await raw.send(request[offset:offset + 100_000])
            assert await raw.recv() == error("JSON token size limit exceeded")
            assert await raw.call({"execute": "echo", "id": 1}) == {"return": {}, "id": 1}
            # Many small tokens add up too.
            many = b"[" + b"1," * 600_000 + b"1]\n"
            await raw.send(many)
            assert await raw.recv() == error("JSON token count limit exceeded")
            assert await raw.call({"execute": "echo", "id": 2}) == {"return": {}, "id": 2}
            # Nesting: 1024 levels are fine (request + arguments + 1022), 1025 are not.
            ok = b'{"execute": "depth", "arguments": {"value": ' + b"[" * 1021 + b"[1"
            await raw.send(ok + b"]" * 1022 + b'}, "id": 3}\n')
            assert await raw.recv() == {"return": 1022, "id": 3}
            await raw.send(ok.replace(b"[1", b"[[1") + b"]" * 1023 + b'}, "id": 3}\n')
            assert await raw.recv() == error("JSON nesting depth limit exceeded")
            await raw.send(b"[" * 1100 + b"]" * 1100 + b"\n")
            assert await raw.recv() == error("JSON nesting depth limit exceeded")
            assert await raw.call({"execute": "echo", "id": 4}) == {"return": {}, "id": 4}
            # An oversized object that never ends is dropped up to the newline.
            await raw.send(b'{"execute": "echo", "arguments": {"value": ' + b"[" * 1100 + b"\n")
            assert await raw.recv() == error("JSON nesting depth limit exceeded")
            assert await raw.call({"execute": "echo", "id": 5}) == {"return": {}, "id": 5}
            await raw.close()
    run(main)


# -- concurrency and events --------------------------------------------------


@pytest.mark.timeout(30)
def test_two_clients_are_served_concurrently(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            first, second = await h.client(), await h.client()
            assert h.server.clients == 2
            slow = asyncio.ensure_future(first.execute("slow"))
            # The second client is answered while the first one's command waits.
            assert await second.execute("echo", {"value": "b"}) == "b"
            assert not slow.done()
            h.release.set()
            assert await slow == {"slow": True}
            await first.disconnect()
            await second.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_commands_of_one_client_run_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            await raw.send(b'{"execute": "slow", "id": 1}{"execute": "echo", "id": 2}')
            await asyncio.sleep(0)  # let the server read; nothing may come back yet
            h.release.set()
            assert await raw.recv() == {"return": {"slow": True}, "id": 1}
            assert await raw.recv() == {"return": {}, "id": 2}
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_blocking_handler_runs_off_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            qmp = await h.client()
            assert await qmp.execute("blocking") == {"ok": True}
            assert h.blocking_thread not in (None, threading.get_ident())
            await qmp.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_events_reach_every_negotiated_client(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            first, second = await h.client(), await h.client()
            unnegotiated = await h.raw()
            raw = await h.raw(negotiate=True)
            before = time.time()
            h.server.emit_event("STOP")
            line = await raw.line()
            after = time.time()
            event = json.loads(line)
            # QEMU's key order: timestamp, event, data; no data when None.
            assert line.startswith(b'{"timestamp": {"seconds": ')
            assert line.endswith(b'}, "event": "STOP"}\r\n')
            stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
            assert before - 1e-6 <= stamp <= after
            for qmp in (first, second):
                got = await qmp.events.get()
                assert got["event"] == "STOP" and "data" not in got
                assert got["timestamp"] == event["timestamp"]
            h.server.emit_event("MIGRATION", {"status": "setup"})
            assert (await first.events.get())["data"] == {"status": "setup"}
            assert (await second.events.get())["data"] == {"status": "setup"}
            line = await raw.line()
            assert b'"event": "MIGRATION", "data": {"status": "setup"}}\r\n' in line
            # The client still negotiating got nothing: its next line is the reply.
            assert await unnegotiated.call({"execute": "qmp_capabilities"}) == {"return": {}}
            for qmp in (first, second):
                await qmp.disconnect()
            await unnegotiated.close()
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_event_emitted_by_a_handler_precedes_its_response(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            raw = await h.raw(negotiate=True)
            await raw.send(b'{"execute": "emit", "id": 9}\n')
            assert (await raw.recv())["event"] == "MIGRATION"
            assert await raw.recv() == {"return": {}, "id": 9}
            await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_emit_event_from_another_thread(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            qmp = await h.client()
            raw = await h.raw(negotiate=True)

            def migration_thread() -> None:
                for status in ("setup", "active", "completed"):
                    h.server.emit_event("MIGRATION", {"status": status})

            thread = threading.Thread(target=migration_thread)
            thread.start()
            statuses = [(await qmp.events.get())["data"]["status"] for _ in range(3)]
            assert statuses == ["setup", "active", "completed"]
            stamps = []
            for _ in range(3):
                event = await raw.recv()
                stamps.append((event["timestamp"]["seconds"], event["timestamp"]["microseconds"]))
            assert stamps == sorted(stamps)
            await asyncio.to_thread(thread.join)
            await qmp.disconnect()
            await raw.close()
    run(main)


# -- sockets and lifetime ----------------------------------------------------


@pytest.mark.timeout(30)
def test_unix_socket_is_0600_replaces_stale_and_is_removed(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "qmp.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # a socket file nobody listens on
        h = Harness(tmp_path)
        async with h:
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert h.server.socket_paths == [str(path)]
            qmp = await h.client()
            assert await qmp.execute("echo", {"value": 1}) == 1
            await qmp.disconnect()
        assert not path.exists()
        assert h.server.closed
    run(main)


@pytest.mark.timeout(30)
def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "qmp.sock"
        path.write_text("precious")
        server = QMPServer(CommandRegistry())
        with pytest.raises(ValueError, match="not a socket"):
            await server.start(f"unix:{path},server=on,wait=off")
        assert path.read_text() == "precious"
        await server.close()
    run(main)


@pytest.mark.timeout(30)
def test_tcp_listener_and_several_listeners(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.server.start("tcp:127.0.0.1:0,server=on,wait=off")
            (port,) = h.server.ports
            assert port > 0
            qmp = QMPClient("tcp")
            await qmp.connect(("127.0.0.1", port))
            assert await qmp.execute("echo", {"value": "t"}) == "t"
            unix = await h.client()
            assert h.server.clients == 2
            await qmp.disconnect()
            await unix.disconnect()
    run(main)


@pytest.mark.timeout(30)
def test_wait_on_returns_when_a_client_connects(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "qmp.sock")
        server = QMPServer(CommandRegistry())
        start = asyncio.ensure_future(server.start(f"unix:{path},server=on"))
        while not os.path.exists(path):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert not start.done()
        reader, writer = await asyncio.open_unix_connection(path)
        assert await reader.readuntil(b"\r\n") == GREETING
        await start
        writer.close()
        await server.close()
    run(main)


@pytest.mark.timeout(30)
def test_quit_replies_then_closes(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.server.start(f"unix:{h.path},server=on,wait=off")
        raw = await h.raw(negotiate=True)
        other = await h.client()
        await raw.send(b'{"execute": "quit", "id": "q"}\n')
        assert await raw.line() == b'{"return": {}, "id": "q"}\r\n'
        await h.server.wait_closed()
        assert await raw.reader.read() == b""  # then EOF
        assert not os.path.exists(h.path)
        assert h.server.quit_requested
        with contextlib.suppress(EOFError):  # qemu.qmp reports the hang-up
            await other.disconnect()
        await raw.close()
    run(main)


@pytest.mark.timeout(30)
def test_request_quit_outside_a_command_closes_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            await asyncio.to_thread(h.server.request_quit)
            await h.server.wait_closed()
            assert not os.path.exists(h.path)
            h.server.emit_event("STOP")  # dropped, no error
    run(main)


@pytest.mark.timeout(30)
def test_preconfig_refuses_commands_not_allowed(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as h:
            h.server.preconfig = True
            raw = await h.raw(negotiate=True)
            assert await raw.call({"execute": "echo"}) == error(
                "The command 'echo' is permitted only after machine initialization "
                "has completed")
            assert (await raw.call({"execute": "query-version"}))["return"]["qemu"]["major"] == 10
            await raw.close()
    run(main)


def test_registry_rejects_bad_registrations() -> None:
    registry = CommandRegistry()
    registry.register("x", lambda args: None)
    with pytest.raises(ValueError):
        registry.register("x", lambda args: None)
    with pytest.raises(ValueError):
        registry.register("query-version", lambda args: None)
    with pytest.raises(ValueError):
        registry.register("y", lambda args: None, args={"a": "string"})
    with pytest.raises(ValueError):
        QMPError("x", error_class="NoSuchClass")



def test_names_moved_out_are_still_importable_from_server() -> None:
    from livemig.qmp import chardev, qjson, server
    assert server.parse_qmp_spec is chardev.parse_qmp_spec
    assert server.ListenSpec is chardev.ListenSpec
    for name in ("JSONMessageParser", "encode_message", "qdict_order", "qmp_dumps"):
        assert getattr(server, name) is getattr(qjson, name)
