"""The destination side: IncomingState and the load thread.

QEMU's process_incoming_migration / qemu_loadvm_state: accept the main
channel, decode the stream (``livemig.wire``), hand each section's payload
to its handler, answer the return path, count switchover-ack approvals, and
start the guest only when everything loaded. A failed load never runs the
guest; the reason goes back to the source on the return path.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from livemig.machine.runstate import TRANSITIONS, RunState
from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.multifd import MultifdReceiver
from livemig.migration.return_path import DestinationReturnPath
from livemig.migration.savevm import destination_handlers, find_handler, payload_kinds
from livemig.migration.status import AnnouncesStatus, StatusMachine
from livemig.migration.status import MigrationStatus as S
from livemig.threadname import name_native_thread
from livemig.transport import TransportError, listen
from livemig.wire import (
    MULTIFD_INIT_SIZE,
    NEED_DATA,
    QEMU_VM_FILE_MAGIC,
    Closed,
    Command,
    Configuration,
    Eof,
    Header,
    MigCmd,
    RamMultifdFlush,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamError,
    VmDescription,
    decode_multifd_init,
)

log = logging.getLogger("livemig.migration")
EventCallback = Callable[[str, dict | None], None]
_SECTION_TYPE = {SectionStart: "start", SectionPart: "part", SectionEnd: "end",
                 SectionFull: "full"}
RECV_CHUNK = 4 << 20
MAX_RECORD_BYTES = 16 << 20


class LoadError(Exception):
    """A load failure with the reason to report (error-desc and to the source)."""


class IncomingState(AnnouncesStatus):
    """One VM's incoming migration (``@upper_half`` entry points: start, query)."""

    def __init__(self, machine, caps, params, emit: EventCallback,
                 on_failure_exit: Callable[[str], None] | None = None) -> None:
        self.machine = machine
        self.caps = caps
        self.params = params
        self.emit = emit
        self.on_failure_exit = on_failure_exit
        self.sm = StatusMachine()
        self.error_desc: str | None = None
        self.listener = None
        self.channel = None
        self.rp: DestinationReturnPath | None = None
        self.exit_on_error = True
        self.started = False
        self.switchover_ack_pending_num = 0
        self.approvals: dict[str, float] = {}       # idstr -> seconds since load start
        self._lock = threading.Lock()
        self._t0 = 0.0
        self.load_times: dict[str, float] = {}
        self.multifd: MultifdReceiver | None = None
        self._preread = b""
        self._multifd_flushes = 0
        self._thread: threading.Thread | None = None


    # -- QMP entry points -----------------------------------------------------------------
    def start(self, address, *, exit_on_error: bool = True, channel=None) -> None:
        """Listen at ``address`` (raises TransportError at once, e.g. address in use),
        or load from an already connected ``channel`` (address None)."""
        self.exit_on_error = exit_on_error
        self.listener = listen(address) if channel is None else None
        self.channel = channel
        self.started = True
        self._set(S.NONE, S.SETUP)
        self._thread = threading.Thread(target=self._thread_main, name="incoming", daemon=True)
        self._thread.start()

    def socket_address(self) -> list[dict[str, Any]] | None:
        if self.listener is None or self.sm.status is not S.SETUP:
            return None
        return self.listener.socket_address()

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        status = self.sm.status
        if status is S.NONE:
            return info
        info["status"] = status.value
        addr = self.socket_address()
        if addr:
            info["socket-address"] = addr
        if self.error_desc is not None:
            info["error-desc"] = self.error_desc
        if self.caps.get("switchover-ack") and status is not S.SETUP:
            info["x-switchover-ack"] = {"pending": self.switchover_ack_pending_num,
                                        "approved": dict(self.approvals)}
        if self.load_times:
            info["x-load-checkpoints"] = {k: round(v * 1000, 3)
                                          for k, v in self.load_times.items()}
        return info

    # -- LoadContext (device callbacks, any thread) ------------------------------------
    def switchover_ack_enabled(self) -> bool:
        return bool(self.caps.get("switchover-ack"))

    def approve_switchover(self, handler: SaveVMHandlers) -> None:
        """QEMU's qemu_loadvm_approve_switchover: the last approval sends the ACK."""
        with self._lock:
            if self.switchover_ack_pending_num == 0:
                log.warning("%s approved switchover with nothing pending", handler.idstr)
                return
            self.switchover_ack_pending_num -= 1
            self.approvals[handler.idstr] = round((time.monotonic() - self._t0) * 1000, 3)
            send = self.switchover_ack_pending_num == 0
        if send and self.rp is not None:
            self.rp.send_switchover_ack()

    # -- load thread (@bottom_half) -----------------------------------------------------
    def _thread_main(self) -> None:
        name_native_thread()
        if self.listener is not None:
            try:
                self._accept_channels()
            except (TransportError, OSError, StreamError, LoadError) as exc:
                self._fail(getattr(exc, "desc", None) or str(exc))
                return
            finally:
                self.listener.close()
        self._t0 = time.monotonic()
        self._set(S.SETUP, S.ACTIVE)
        try:
            self._load()
        except (StreamError, LoadError, ValueError) as exc:
            self._fail(str(exc))
        except TransportError as exc:
            self._fail(exc.desc)
        except OSError as exc:
            self._fail(f"Input/output error ({exc.strerror or exc})")
        except Exception as exc:
            log.exception("load failed")
            self._fail(f"{type(exc).__name__}: {exc}")

    def _accept_channels(self) -> None:
        """The main channel, plus ``multifd-channels`` more when multifd is on;
        they are told apart by their first 4 bytes, as QEMU does."""
        if not self.caps.get("multifd"):
            self.channel = self.listener.accept()
            return
        n = self.params.multifd_channels
        multifd: dict[int, Any] = {}
        while self.channel is None or len(multifd) < n:
            ch = self.listener.accept(timeout=60)
            head = bytearray(4)
            ch.read_exact_into(head)
            if bytes(head) == QEMU_VM_FILE_MAGIC.to_bytes(4, "big"):
                self.channel = ch
                self._preread = bytes(head)
                continue
            rest = bytearray(MULTIFD_INIT_SIZE - 4)
            ch.read_exact_into(rest)
            init = decode_multifd_init(bytes(head + rest))
            if init.channel_id >= n or init.channel_id in multifd:
                raise LoadError(f"multifd: unexpected channel id {init.channel_id}")
            multifd[init.channel_id] = ch
        self.multifd = MultifdReceiver([multifd[i] for i in range(n)], self.machine.ram)

    def _fail(self, reason: str) -> None:
        self.error_desc = f"load of migration failed: {reason}"
        # exit-on-error prints it (one line, as QEMU); otherwise query-migrate has it.
        log.info("%s", self.error_desc)
        for h in getattr(self, "handlers", []):
            try:
                h.load_cleanup()
            except Exception:  # noqa: BLE001
                pass
        if self.rp is not None:
            self.rp.send_error(reason[:512])
            self.rp.send_shut(1)
            self._linger()
            self.rp.close()
        if self.channel is not None:
            self.channel.shutdown()
            self.channel.close()
        if self.multifd is not None:
            self.multifd.shutdown()
            self.multifd.close()
        self.sm.force(S.FAILED) if self.sm.status is not S.FAILED else None
        if self.caps.get("events"):
            self.emit("MIGRATION", {"status": "failed"})
        if self.exit_on_error and self.on_failure_exit is not None:
            self.on_failure_exit(self.error_desc)

    def _linger(self, seconds: float = 2.0) -> None:
        """Half-close, then drain what the source still sends until it hangs up.
        Closing a socket with unread data sends an RST, and an RST can make the
        source drop our error message unread."""
        sock = getattr(self.channel, "sock", None)
        if sock is None:
            return
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + seconds
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.1)
            while time.monotonic() < deadline:
                try:
                    if sock.recv_into(buf) == 0:
                        return
                except TimeoutError:
                    continue
        except OSError:
            return

    def _mark(self, name: str) -> None:
        self.load_times[name] = time.monotonic() - self._t0

    def _load(self) -> None:
        self.handlers = destination_handlers(self.machine)
        self.global_state = next(h for h in self.handlers
                                 if isinstance(h, GlobalStateHandler))
        # No record of ours comes near 16 MiB (device data goes in 1 MiB chunks): a
        # hostile length is refused instead of buffered.
        dec = StreamDecoder(payload_kinds(self.handlers), max_payload=MAX_RECORD_BYTES)
        if self._preread:
            dec.receive_data(self._preread)    # the magic multifd classification read
        by_id: dict[int, SaveVMHandlers] = {}
        current: SaveVMHandlers | None = None
        current_type = ""
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                buf = dec.get_buffer(RECV_CHUNK)
                dec.buffer_updated(self.channel.recv_into(buf))  # 0: end of data
                continue
            if isinstance(ev, Closed):
                raise LoadError("stream ended before the VM description")
            if isinstance(ev, (SectionStart, SectionFull)):
                h = find_handler(self.handlers, ev.idstr, ev.instance_id)
                if h is None:
                    raise LoadError(
                        f"Unknown savevm section or instance '{ev.idstr}' {ev.instance_id}. "
                        "Make sure that your current VM setup matches your saved VM setup, "
                        "including any hotplugged devices")
                if ev.version_id > h.version_id:
                    raise LoadError(f"savevm: unsupported version {ev.version_id} for "
                                    f"'{ev.idstr}' v{h.version_id}")
                by_id[ev.section_id] = h
                current, current_type = h, _SECTION_TYPE[type(ev)]
            elif isinstance(ev, (SectionPart, SectionEnd)):
                current = by_id.get(ev.section_id)
                if current is None:
                    raise LoadError(f"Unknown savevm section {ev.section_id}")
                current_type = _SECTION_TYPE[type(ev)]
                if current_type == "end" and "dst-first-end-section" not in self.load_times:
                    self._mark("dst-first-end-section")
            elif isinstance(ev, SectionFooter):
                assert current is not None
                self._section_done(current, current_type)
                current = None
            elif isinstance(ev, Command):
                self._command(ev)
            elif isinstance(ev, RamMultifdFlush):
                if self.multifd is not None:
                    self._multifd_flushes += 1
                    self.multifd.wait_sync(self._multifd_flushes)
            elif isinstance(ev, Configuration):
                self._configuration(ev)
            elif isinstance(ev, Eof):
                self._mark("dst-eof")
            elif isinstance(ev, VmDescription):
                break
            elif isinstance(ev, Header):
                pass
            else:
                if current is None:
                    raise LoadError(f"payload outside a section: {type(ev).__name__}")
                current.load_event(ev)
        self._complete()

    def _section_done(self, h: SaveVMHandlers, section_type: str) -> None:
        try:
            h.load_section_done(section_type)
        except ValueError as exc:
            raise LoadError(f"error while loading state for device '{h.idstr}': {exc}") from exc

    def _configuration(self, ev: Configuration) -> None:
        local = self.machine.machine_type
        if ev.machine_type != local[: len(ev.machine_type)]:
            raise LoadError(f"Machine type received is '{ev.machine_type}' and local is "
                            f"'{local}'")
        if ev.uuid is not None and self.machine.uuid_bytes is not None \
                and ev.uuid != self.machine.uuid_bytes:
            raise LoadError(f"UUID received is {uuidlib.UUID(bytes=ev.uuid)} and local is "
                            f"{uuidlib.UUID(bytes=self.machine.uuid_bytes)}")
        # QEMU counts approvals after load_setup, before the section loop.
        for h in self.handlers:
            h.load_setup(self)
        if self.caps.get("switchover-ack"):
            self.switchover_ack_pending_num = sum(h.switchover_ack_needed()
                                                  for h in self.handlers)

    def _command(self, ev: Command) -> None:
        if ev.cmd == MigCmd.OPEN_RETURN_PATH:
            if self.rp is not None:
                log.warning("CMD_OPEN_RETURN_PATH called when RP already open")
                return
            self.rp = DestinationReturnPath(self.channel.return_path())
            if self.caps.get("switchover-ack") and self.switchover_ack_pending_num == 0:
                self.rp.send_switchover_ack()
        elif ev.cmd == MigCmd.PING:
            if self.rp is None:
                raise LoadError(f"CMD_PING (0x{int.from_bytes(ev.payload, 'big'):x}) "
                                "received with no return path")
            self.rp.send_pong(int.from_bytes(ev.payload, "big"))

    def _complete(self) -> None:
        """process_incoming_migration_bh: decide whether the guest runs."""
        for h in self.handlers:
            try:
                h.load_complete()
            except ValueError as exc:
                raise LoadError(f"error while loading state for device '{h.idstr}': "
                                f"{exc}") from exc
        if self.multifd is not None:
            # The last MULTIFD_FLUSH already waited for every page; the channels are done.
            if self.multifd.error:
                raise LoadError(self.multifd.error)
            self.multifd.shutdown()
            self.multifd.close()
        self._mark("dst-loaded")
        received = self.global_state.runstate or "running"
        if received == "running":
            if self.machine.autostart:
                self.machine.vm_start()
            else:
                self.machine.set_runstate(RunState.PAUSED)      # -S
        else:
            allowed = {s.value for s in TRANSITIONS[RunState.INMIGRATE]} - {"running"}
            if received not in allowed:
                raise LoadError(f"globalstate: run state '{received}' cannot follow an "
                                "incoming migration")
            self.machine.set_runstate(RunState(received))
        self._mark("dst-vm-started")
        self._set(S.ACTIVE, S.COMPLETED)
        if self.rp is not None:
            self.rp.send_shut(0)
            self.rp.close()
        self.channel.close()
