"""``livemig run``: one VM process, the composition root.

Builds the machine, the migration state of both directions, the QMP server,
and runs the asyncio loop on the main thread until ``quit`` or a signal.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import sys

from livemig import QEMU_VERSION, __version__
from livemig.cli.daemon import PidFile, PidFileError, os_daemonize, setup_post
from livemig.cli.run_options import (
    OptionError,
    RunOptions,
    help_text,
    parse_run_args,
    serial_failure,
)
from livemig.machine.hostmem import HostMemoryBackend, MemoryBackend
from livemig.machine.machine import Machine, MachineConfig, choose_accelerator
from livemig.machine.serial import Serial, SerialSocket
from livemig.migration.destination import IncomingState
from livemig.migration.source import MigrationState
from livemig.qapi.errors import QapiError
from livemig.qapi.global_props import apply_globals
from livemig.qmp.chardev import ChardevError, ChardevSpec, open_socket, unlink_socket
from livemig.qmp.commands import register_vm_commands
from livemig.qmp.registry import CommandRegistry
from livemig.qmp.server import QMPServer
from livemig.qom.object import ObjectRoot
from livemig.transport import TransportError, parse_uri

PROG = "livemig"


class VmProcess:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.name = opts.name
        bad = [d for d, _, _ in opts.globals if d != "migration"]
        if bad:
            raise OptionError(f"-global {bad[0]}.*: driver '{bad[0]}' not found")
        try:
            self.caps, self.params, warnings = apply_globals(
                (prop, value) for _, prop, value in opts.globals)
        except QapiError as exc:
            raise OptionError(exc.desc) from None
        for warning in [*opts.warnings, *warnings]:
            report(f"warning: {warning}")
        if opts.cpu == "host" and choose_accelerator(opts.accel) != "kvm":
            raise OptionError("CPU model 'host' requires KVM or HVF")
        # Chardevs not served by QMP, in command-line order as QEMU creates them:
        # the serial port's, and unused ones (opened all the same, as QEMU does).
        self._sinks: list[tuple[SerialSocket, ChardevSpec, str | None, int | None]] = []
        serial = None
        try:
            for chardev in opts.chardevs.values():
                if chardev.id in opts.monitors:
                    continue
                sink = self._open_chardev(chardev)
                if sink is not None and chardev.id == opts.serial_chardev:
                    serial = Serial(sink=sink)
        except BaseException:
            self._close_sinks()
            raise
        # -object, in command-line order (QEMU: after parsing, before the machine).
        self.objects = ObjectRoot()
        try:
            for options in opts.objects:
                self.objects.add(options)
        except QapiError as exc:
            self.objects.close()
            self._close_sinks()
            raise OptionError(exc.desc) from None
        try:
            backend = self._ram_backend()
        except OptionError:
            self.objects.close()
            self._close_sinks()
            raise
        self.registry = CommandRegistry()
        self.server = QMPServer(self.registry, version=QEMU_VERSION,
                                package=f"livemig {__version__}")
        self.loop: asyncio.AbstractEventLoop | None = None
        self._quit: asyncio.Event | None = None
        self.exit_status = 0
        self.shutdown_reason = "host-qmp-quit"
        try:
            self.machine = Machine(MachineConfig(
                ram_size=opts.ram_size, ram_backend=backend, accel=opts.accel, guest=opts.guest,
                serial_path=opts.serial, serial=serial, devices=opts.devices, name=opts.name,
                uuid=opts.uuid, incoming=opts.incoming is not None,
                start_paused=opts.start_paused, mem_prealloc=opts.mem_prealloc,
                machine_type=opts.machine, dump_guest_core=opts.dump_guest_core,
                microvm=opts.microvm, bios_path=opts.bios),
                on_event=self.server.emit_event)
        except BaseException:
            self._close_sinks()
            raise
        if opts.mem_lock != "off":
            try:
                mlockall(on_fault=opts.mem_lock == "on-fault")
            except OSError:
                self.machine.close()
                self._close_sinks()
                raise OptionError("locking memory failed") from None
        self.daemon_pipe: int | None = None   # -daemonize: told once the monitors listen
        self.source = MigrationState(self.machine, self.caps, self.params,
                                     self.server.emit_event, objects=self.objects)
        self.incoming = IncomingState(self.machine, self.caps, self.params,
                                      self.server.emit_event,
                                      on_failure_exit=self._incoming_failed,
                                      objects=self.objects)
        register_vm_commands(self.registry, self)

    def _ram_backend(self) -> HostMemoryBackend | None:
        """``-machine memory-backend=ID``: that object is the guest RAM; with -m their
        sizes must agree, without it the backend's size is the RAM size (QEMU's rules)."""
        opts, backend_id = self.opts, self.opts.memory_backend
        if backend_id is None:
            return None
        obj = self.objects.get(backend_id)
        if not isinstance(obj, MemoryBackend):
            raise OptionError(f"Memory backend '{backend_id}' not found")
        backend = obj.backend()
        if opts.ram_size_given and opts.ram_size != backend.size:
            raise OptionError("Machine memory size does not match the size of the memory "
                              "backend")
        if not opts.ram_size_given:
            opts.ram_size = backend.size
            if opts.guest.kind == "walk" and opts.machine != "none":
                try:
                    opts.guest.validate(opts.ram_size)
                except ValueError as exc:
                    raise OptionError(f"-guest: {exc}") from None
        obj.in_use = True
        return backend

    def _open_chardev(self, chardev: ChardevSpec) -> SerialSocket | None:
        """A socket chardev for the serial port (or none): bound, connected or adopted;
        with ``wait=on``, blocks until its first client (QEMU's startup wait)."""
        if chardev.backend == "file":
            assert chardev.path is not None
            try:
                open(chardev.path, "ab").close()   # QEMU opens (creates) it
            except OSError as exc:
                raise OptionError(self._chardev_failure(
                    chardev, f"Could not open '{chardev.path}': {exc.strerror}")) from None
            return None
        if chardev.backend != "socket":
            return None
        try:
            opened = open_socket(chardev)
        except ChardevError as exc:
            raise OptionError(self._chardev_failure(chardev, str(exc))) from None
        sink = SerialSocket(opened.sock, opened.listening, chardev.describe())
        self._sinks.append((sink, chardev, opened.path, opened.inode))
        if opened.listening and chardev.wait:
            print(f"{PROG}: {chardev.location}: info: QEMU waiting for connection on: "
                  f"disconnected:{chardev.describe()}", file=sys.stderr, flush=True)
            sink.wait_connected()
        return sink

    def _chardev_failure(self, chardev: ChardevSpec, text: str) -> str:
        first = f"{chardev.location}: {text}"
        if chardev.option == "-serial":
            return serial_failure(chardev.spec, first)
        return first

    def _close_sinks(self) -> None:
        for sink, _, path, inode in self._sinks:
            sink.close()
            unlink_socket(path, inode)
        self._sinks.clear()

    # -- lifecycle ----------------------------------------------------------------------
    def request_quit(self, reason: str = "host-qmp-quit", status: int = 0) -> None:
        """Thread-safe: SHUTDOWN event, then end the process once pending QMP
        replies are flushed (from the loop, i.e. ``quit``, the event precedes the
        command's reply, as in QEMU)."""
        self.shutdown_reason = reason
        self.exit_status = status
        if self.loop is None or self._quit is None:
            return

        def shutdown() -> None:
            assert self._quit is not None
            if not self._quit.is_set():
                self.server.emit_event("SHUTDOWN", {"guest": False, "reason": reason})
                self.server.request_quit()
                self._quit.set()
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:   # the quit command: event first, then its reply (QEMU's order)
            shutdown()
        else:
            self.loop.call_soon_threadsafe(shutdown)

    def _incoming_failed(self, desc: str) -> None:
        """exit-on-error: QEMU prints the error and exits with status 1."""
        report(desc)
        self.request_quit("host-error", status=1)

    async def listen(self) -> asyncio.Event:
        """Adopt the running loop and bind every ``-qmp`` socket (with ``wait=on``,
        until its first client); returns the event a quit sets. :meth:`main` adds
        signals, the guest or the incoming migration, and the wait; the in-process
        QMP tests (``tests/qmp_inprocess.py``) use this alone."""
        self.loop = asyncio.get_running_loop()
        self._quit = quit_event = asyncio.Event()
        for chardev_id in self.opts.monitors:
            chardev = self.opts.chardevs[chardev_id]
            try:
                await self.server.start(chardev)
            except ChardevError as exc:
                raise ChardevError(f"{chardev.location}: {exc}") from None
        return quit_event

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        # Their callbacks run on the loop, so not before listen() has set self.loop.
        for sig, reason in ((signal.SIGTERM, "host-signal"), (signal.SIGINT, "host-signal"),
                            (signal.SIGHUP, "host-signal")):
            loop.add_signal_handler(sig, self.request_quit, reason)
        quit_event = await self.listen()
        if self.daemon_pipe is not None:    # the monitors listen: the first process may go
            setup_post(self.daemon_pipe)
            self.daemon_pipe = None
        if self.opts.incoming not in (None, "defer"):
            self.incoming.start(parse_uri(self.opts.incoming))
        elif self.opts.incoming is None and not self.opts.start_paused:
            self.machine.vm_start()
        await quit_event.wait()
        self.source.cancel()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 5)
        except TimeoutError:
            await self.server.close()
        self.machine.close()        # closes the serial port's socket
        self._close_sinks()
        self.objects.close()
        return self.exit_status


_msg_timestamp = False   # -msg timestamp=on


def report(text: str) -> None:
    """One message on stderr as QEMU's error_report prints it (``-msg timestamp=on``:
    the UTC time first)."""
    prefix = ""
    if _msg_timestamp:
        now = datetime.datetime.now(datetime.UTC)
        prefix = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ ")
    print(f"{prefix}{PROG}: {text}", file=sys.stderr, flush=True)


def mlockall(*, on_fault: bool) -> None:
    """``-overcommit mem-lock=on|on-fault``: QEMU's os_mlock (MCL_CURRENT|MCL_FUTURE)."""
    import ctypes
    flags = 1 | 2 | (4 if on_fault else 0)      # MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(flags) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def run_main(argv: list[str]) -> int:
    global _msg_timestamp
    logging.basicConfig(level=os.environ.get("LIVEMIG_LOG", "WARNING").upper(),
                        format=f"{PROG}: %(name)s: %(message)s")
    pidfile: PidFile | None = None
    try:
        opts = parse_run_args(argv)
        if opts.help is not None:      # -M help, -accel help, -cpu help, -version
            print(help_text(opts))
            return 0
        _msg_timestamp = opts.msg_timestamp
        # QEMU's order: daemonize first, then the pidfile (the daemon's pid), then the VM.
        pipe = os_daemonize() if opts.daemonize else None
        if opts.pidfile is not None:
            try:
                pidfile = PidFile(opts.pidfile)
            except PidFileError as exc:
                raise OptionError(f"cannot create PID file: {exc}") from None
        vm = VmProcess(opts)
        vm.daemon_pipe = pipe
    except (OptionError, ValueError, OSError) as exc:
        report(str(exc))
        if pidfile is not None:
            pidfile.unlink()
        return 1
    try:
        return asyncio.run(vm.main())
    except (ValueError, OSError, TransportError) as exc:
        report(str(getattr(exc, "desc", None) or exc))
        return 1
    finally:
        if pidfile is not None:
            pidfile.unlink()
