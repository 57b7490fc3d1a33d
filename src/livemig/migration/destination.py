"""The destination side: IncomingState and the load thread.

QEMU's process_incoming_migration / qemu_loadvm_state: accept the main
channel, decode the stream (``livemig.wire``), hand each section's payload
to its handler, answer the return path, count switchover-ack approvals, and
start the guest only when everything loaded. A failed load never runs the
guest; the reason goes back to the source on the return path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.machine.runstate import TRANSITIONS, RunState
from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration import savevm, tls
from livemig.migration.errors import LoadError, MigrationError
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.multifd import MultifdReceiver
from livemig.migration.postcopy import POSTCOPY_QUEUE_BYTES, PostcopyIncoming
from livemig.migration.ram import RamDirectLoad, RamLoadHandler
from livemig.migration.return_path import DestinationReturnPath
from livemig.migration.status import AnnouncesStatus, StatusMachine
from livemig.migration.status import MigrationStatus as S
from livemig.qapi.capabilities import Capabilities
from livemig.qapi.parameters import Parameters
from livemig.threadname import name_native_thread
from livemig.transport import Channel, Listener, TransportError, listen
from livemig.transport.channel import SocketChannel
from livemig.wire import (
    LIVEMIG_HELLO,
    MULTIFD_INIT_SIZE,
    QEMU_VM_FILE_MAGIC,
    StreamDecoder,
    StreamError,
    decode_multifd_init,
)
from livemig.wire.postcopy import PostcopyAdvise, RamDiscard

log = logging.getLogger("livemig.migration")
EventCallback = Callable[[str, dict | None], None]
Clock = Callable[[], float]
MAX_RECORD_BYTES = 16 << 20
COSTS_PERIOD_S = 0.25          # X_LOAD_COSTS at most this often
MIN_RATE_BYTES = 4 << 20       # measure the load rate only over at least this much

__all__ = ["IncomingState", "LoadError"]


class TlsAcceptor:
    """Accepts on its own thread and shakes hands on one thread per connection,
    so a peer that fails or stalls its handshake holds up nobody: its error is
    reported (QEMU's error_report) and the listener stays open for the next
    one, as QEMU's does. ``accept`` hands out channels that passed every check."""

    def __init__(self, listener: Listener, handshake: Callable[[Channel], Channel]) -> None:
        self.listener = listener
        self.handshake = handshake
        self.ready: queue.Queue[Channel | BaseException] = queue.Queue()
        threading.Thread(target=self._accept_loop, name="incoming accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                ch = self.listener.accept()
            except (TransportError, OSError) as exc:
                self.ready.put(exc)       # listener closed, or broken: accept() says why
                return
            threading.Thread(target=self._shake, args=(ch,), name="incoming tls",
                             daemon=True).start()

    def _shake(self, ch: Channel) -> None:
        try:
            self.ready.put(self.handshake(ch))
        except TransportError as exc:
            print(f"livemig: {exc.desc}", file=sys.stderr, flush=True)
            log.info("incoming TLS connection refused: %s", exc.desc)
            with contextlib.suppress(OSError):
                ch.close()
        except Exception:
            log.exception("incoming TLS handshake")
            with contextlib.suppress(OSError):
                ch.close()

    def accept(self, timeout: float | None = None) -> Channel:
        try:
            item = self.ready.get(timeout=timeout)
        except queue.Empty:
            raise TransportError("Timed out waiting for a migration channel",
                                 errno.ETIMEDOUT) from None
        if isinstance(item, BaseException):
            self.ready.put(item)
            raise item
        return item


class IncomingState(AnnouncesStatus):
    """One VM's incoming migration (``@upper_half`` entry points: start, query)."""

    def __init__(self, machine, caps: Capabilities, params: Parameters, emit: EventCallback,
                 on_failure_exit: Callable[[str], None] | None = None, *,
                 clock: Clock = time.monotonic, objects: Any = None) -> None:
        self.machine = machine
        self.objects = objects                  # /objects: tls-creds and tls-authz
        self.clock = clock
        self.caps = caps
        self.params = params
        self.emit = emit
        self.on_failure_exit = on_failure_exit
        self.sm = StatusMachine()
        self.error_desc: str | None = None
        self.listener: Listener | None = None
        self.channel: Channel | None = None
        self.savevm = savevm.SaveVMState()
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
        # The source said hello (PING LIVEMIG_HELLO): it reads X_ERROR and X_LOAD_COSTS.
        self.peer_livemig = False
        self._read_blocked_s = 0.0        # load thread time spent waiting for data
        self._read_bytes = 0
        self._costs_sent_at = 0.0
        self.device_cost_ms = 0.0
        self.final_costs: dict[str, float] = {}     # at completion, measured-* included
        self.postcopy: PostcopyIncoming | None = None
        self._recover = threading.Event()       # migrate-recover gave a listener
        self._recover_listener: Listener | None = None

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
        if self.caps.switchover_ack and status is not S.SETUP:
            info["x-switchover-ack"] = {"pending": self.switchover_ack_pending_num,
                                        "approved": dict(self.approvals)}
        if self.load_times:
            info["x-load-checkpoints"] = {k: round(v * 1000, 3)
                                          for k, v in self.load_times.items()}
        if status is not S.SETUP:
            info["x-load-costs"] = self._load_costs_info()
        if self.postcopy is not None:
            pc = info["x-postcopy"] = self.postcopy.info()
            if self.caps.postcopy_blocktime:
                # QEMU's figures: time the (one) vCPU waited on faulted pages, ms.
                info["postcopy-blocktime"] = pc["blocked-ms"]
                info["postcopy-vcpu-blocktime"] = [pc["blocked-ms"]]
        return info

    def _load_costs_info(self) -> dict[str, Any]:
        """``x-load-costs``: what this side reports (or would report) to a
        livemig source, and once loaded what it measured, device by device."""
        costs = self.final_costs or self.load_costs(self.clock())
        out: dict[str, Any] = {"declared-device-load-ms": self.device_cost_ms}
        rate = costs.get("ram-load-bytes-per-s")
        if rate is not None:
            out["ram-load-bytes-per-s"] = int(rate)
        if self.final_costs:
            out.update({k.removeprefix("measured-"): v for k, v in costs.items()
                        if k.startswith("measured-")})
            out["devices"] = {
                k: {"final-load-ms": round(self.savevm.final_load_s.get(k, 0.0) * 1000, 3),
                    "load-complete-ms": round(v * 1000, 3)}
                for k, v in self.savevm.load_complete_s.items() if k != "ram"}
        return out

    # -- LoadContext (device callbacks, any thread) ------------------------------------
    def switchover_ack_enabled(self) -> bool:
        return self.caps.switchover_ack

    def approve_switchover(self, handler: SaveVMHandlers) -> None:
        """QEMU's qemu_loadvm_approve_switchover: the last approval sends the ACK."""
        with self._lock:
            if self.switchover_ack_pending_num == 0:
                log.warning("%s approved switchover with nothing pending", handler.idstr)
                return
            self.switchover_ack_pending_num -= 1
            self.approvals[handler.idstr] = round((self.clock() - self._t0) * 1000, 3)
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
        self._t0 = self.clock()
        self._set(S.SETUP, S.ACTIVE)
        try:
            self._load()
        except MigrationError as exc:
            self._fail(exc.desc)
        except (StreamError, ValueError) as exc:
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
        assert self.listener is not None
        accept = self.listener.accept
        if tls.tls_enabled(self.params):
            accept = TlsAcceptor(self.listener, self._tls_server).accept
        if not self.caps.multifd:
            self.channel = accept()
            return
        n = self.params.multifd_channels
        multifd: dict[int, Any] = {}
        while self.channel is None or len(multifd) < n:
            ch = accept(timeout=60)
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
        self.multifd = MultifdReceiver([multifd[i] for i in range(n)], self.machine.ram,
                                       self.machine.extra_ram)

    def _tls_server(self, channel: Channel) -> Channel:
        """QEMU's migration_tls_channel_process_incoming for one accepted connection."""
        creds = tls.migration_tls_get_creds(self.objects, self.params.get("tls-creds"),
                                            "server")
        return tls.tls_server(channel, creds, self.params.get("tls-authz"), self.objects)

    def _fail(self, reason: str) -> None:
        self.error_desc = f"load of migration failed: {reason}"
        # exit-on-error prints it (one line, as QEMU); otherwise query-migrate has it.
        log.info("%s", self.error_desc)
        savevm.qemu_loadvm_state_cleanup(self.savevm)
        if self.postcopy is not None:
            self.postcopy.close()
            if self.machine.is_running():
                # Pages it lacks will never come: stop the guest rather than let
                # it block on them (QEMU would pause for recovery).
                self.machine.vm_stop(RunState.PAUSED)
        if self.rp is not None:
            if self.peer_livemig:             # a QEMU source would call 0x4c01 invalid
                self.rp.send_error(reason[:512])
            self.rp.send_shut(1)
            if self.channel is not None:
                self.channel.linger(2.0)
            self.rp.close()
        if self.channel is not None:
            self.channel.shutdown()
            self.channel.close()
        if self.multifd is not None:
            self.multifd.shutdown()
            self.multifd.close()
        self.sm.force(S.FAILED) if self.sm.status is not S.FAILED else None
        if self.caps.events:
            self.emit("MIGRATION", {"status": "failed"})
        if self.exit_on_error and self.on_failure_exit is not None:
            self.on_failure_exit(self.error_desc)

    # -- LoadvmHost (the savevm layer asks; load thread) ------------------------------
    def mark(self, name: str) -> None:
        """A load checkpoint; only the first of each name counts."""
        self.load_times.setdefault(name, self.clock() - self._t0)

    def read_into(self, buf) -> int:
        """The load thread's input; it also measures how fast this side loads
        (bytes per second of the load thread's own work, waits excluded)."""
        assert self.channel is not None
        t0 = self.clock()
        return self._count_read(t0, self.channel.recv_into(buf))

    def read_iovec(self, iov) -> int:
        """``read_into`` for a direct read: one readv into ``iov`` (some bytes)."""
        assert self.channel is not None
        t0 = self.clock()
        return self._count_read(t0, self.channel.recv_iovec_some(iov))

    def _count_read(self, t0: float, n: int) -> int:
        t1 = self.clock()
        self._read_blocked_s += t1 - t0
        self._read_bytes += n
        if self.peer_livemig and t1 - self._costs_sent_at >= COSTS_PERIOD_S:
            self._send_costs(t1)
        return n

    def load_costs(self, now: float) -> dict[str, float]:
        """What X_LOAD_COSTS reports: the RAM load rate so far (once there is
        enough to measure) and the devices' costs after the last byte."""
        costs = {"device-load-ms": self.device_cost_ms}
        busy = (now - self._t0) - self._read_blocked_s
        if self._read_bytes >= MIN_RATE_BYTES and busy > 0:
            costs["ram-load-bytes-per-s"] = self._read_bytes / busy
        return costs

    def measured_costs(self) -> dict[str, float]:
        """What the switchover really cost here (ms), beside what was declared:
        the devices' own work on their final state (``device-load-ms`` measured),
        their load_complete plus starting the guest (``post-load-ms``), and the
        last byte (EOF) to the guest running."""
        lt = self.load_times
        started = lt.get("dst-vm-started", 0.0)
        loaded = lt.get("dst-loaded", started)
        return {
            "measured-device-load-ms": round(sum(self.savevm.final_load_s.values()) * 1000, 3),
            "measured-post-load-ms": round(
                (sum(self.savevm.load_complete_s.values()) + started - loaded) * 1000, 3),
            "measured-last-byte-to-running-ms": round(
                (started - lt.get("dst-eof", started)) * 1000, 3),
        }

    def _send_costs(self, now: float) -> None:
        self._costs_sent_at = now
        if self.rp is not None:
            self.rp.send_load_costs(self.load_costs(now))

    def has_return_path(self) -> bool:
        return self.rp is not None

    def open_return_path(self) -> None:
        if self.rp is not None:
            log.warning("CMD_OPEN_RETURN_PATH called when RP already open")
            return
        assert self.channel is not None
        self.rp = DestinationReturnPath(self.channel.return_path())
        if self.caps.switchover_ack and self.switchover_ack_pending_num == 0:
            self.rp.send_switchover_ack()     # nothing to prepare: ACK at once

    def send_pong(self, value: int) -> None:
        assert self.rp is not None
        if value == LIVEMIG_HELLO and not self.peer_livemig:
            self.peer_livemig = True          # a livemig source: our own messages are welcome
            self._send_costs(self.clock())    # before the PONG: the source has them then
        self.rp.send_pong(value)

    def set_switchover_ack_pending(self, count: int) -> None:
        with self._lock:
            self.switchover_ack_pending_num = count

    def set_device_cost(self, ms: float) -> None:
        self.device_cost_ms = ms

    # -- postcopy (LoadvmHost; load thread) -----------------------------------------
    def postcopy_ram_enabled(self) -> bool:
        return self.caps.postcopy_ram

    def postcopy_advise(self, advise: PostcopyAdvise) -> None:
        if self.postcopy is not None:
            raise LoadError("CMD_POSTCOPY_ADVISE in wrong postcopy state (1)")
        if advise.pagesize_summary is None:
            return
        self.postcopy = PostcopyIncoming(self)
        self.postcopy.advise(advise)

    def postcopy_ram_discard(self, discard: RamDiscard) -> None:
        if self.postcopy is None or self.postcopy.listening:
            raise LoadError(f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state "
                            f"({0 if self.postcopy is None else 3})")
        self.postcopy.discard(discard)

    def postcopy_listen(self) -> None:
        if self.postcopy is None or self.postcopy.listening:
            raise LoadError(f"CMD_POSTCOPY_LISTEN in wrong postcopy state "
                            f"({0 if self.postcopy is None else 3})")
        self.postcopy.listen()
        self._ram_load.placer = self.postcopy
        self.mark("dst-postcopy-listen")
        self._set(S.ACTIVE, S.POSTCOPY_ACTIVE)

    def postcopy_run(self) -> None:
        """loadvm_postcopy_handle_run: the devices are complete, the guest runs."""
        if self.postcopy is None or not self.postcopy.listening:
            raise LoadError("CMD_POSTCOPY_RUN in wrong postcopy state (1)")
        savevm.qemu_loadvm_state_complete(self.savevm, self.clock, postcopy_run=True)
        self.mark("dst-postcopy-run")
        self._start_guest()
        self.mark("dst-vm-started")

    def postcopy_recv_bitmap(self, block: str) -> None:
        """loadvm_handle_recv_bitmap: only while recovering."""
        if self.postcopy is None or self.sm.status is not S.POSTCOPY_RECOVER:
            raise LoadError("CMD_RECV_BITMAP: not in postcopy-recover state")
        if block != self.machine.ram.idstr:
            raise LoadError(f"CMD_RECV_BITMAP: can't find block '{block}'")
        assert self.rp is not None
        self.rp.send_recv_bitmap(block, self.postcopy.received_now())

    def postcopy_resume(self) -> None:
        """loadvm_postcopy_handle_resume: postcopy-active again, RESUME_ACK, and
        the page requests the break swallowed go out again."""
        if self.postcopy is None or self.sm.status is not S.POSTCOPY_RECOVER:
            raise LoadError("Illegal resume received: not in postcopy-recover state")
        assert self.rp is not None
        self._set(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
        self.rp.send_resume_ack()
        self.postcopy.resend_requests()

    # -- postcopy recovery (QMP entry points and the load thread) ---------------------
    def migrate_recover(self, address) -> None:
        """@upper_half: listen at ``address`` for the source's new channel (the
        caller checked the status is postcopy-paused)."""
        if self._recover.is_set() or self._recover_listener is not None:
            raise LoadError("Migrate recovery is triggered already")
        self._recover_listener = listen(address)
        self._recover.set()

    def migrate_pause(self) -> None:
        """@upper_half: ``migrate-pause`` here: cut the channel on purpose."""
        if self.channel is not None:
            self.channel.shutdown()

    def _can_pause(self, exc: BaseException) -> bool:
        """A broken channel in postcopy pauses (QEMU: postcopy_pause_incoming);
        a protocol violation still fails."""
        if self.postcopy is None or not self.postcopy.listening:
            return False
        if self.sm.status not in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
            return False
        if isinstance(exc, (TransportError, OSError)):
            return True
        text = str(exc)
        return "Truncated migration stream" in text or "stream ended" in text

    def _postcopy_pause(self, dec: StreamDecoder) -> None:
        """Paused: the guest runs on with what it has (and blocks on what it
        lacks) until migrate-recover's listener gets the source's new channel."""
        self._set(self.sm.status, S.POSTCOPY_PAUSED)
        if self.rp is not None:
            self.rp.close()
            self.rp = None
        if self.channel is not None:
            self.channel.shutdown()
            self.channel.close()
            self.channel = None
        self._recover.wait()
        self._recover.clear()
        listener = self._recover_listener
        assert listener is not None
        try:
            # The new channel is wrapped as the first was (QEMU: the same
            # migration_channel_process_incoming), so a failed handshake is
            # reported and the listener waits for the next one.
            accept = (TlsAcceptor(listener, self._tls_server).accept
                      if tls.tls_enabled(self.params) else listener.accept)
            self.channel = accept()
        finally:
            listener.close()
            self._recover_listener = None
        self._set(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)   # QEMU's destination: no setup state
        self.channel.limit_queue(recv=POSTCOPY_QUEUE_BYTES)
        self.rp = DestinationReturnPath(self.channel.return_path())
        dec.resume()

    def multifd_recv_sync_main(self) -> None:
        if self.multifd is not None:
            self._multifd_flushes += 1
            self.multifd.wait_sync(self._multifd_flushes)

    def _load(self) -> None:
        self.savevm = savevm.SaveVMState()
        self.global_state = GlobalStateHandler()
        ram = self._ram_load = RamLoadHandler(self.machine)
        for h in (ram, *self.machine.vmstate_handlers(), self.global_state):
            self.savevm.register_savevm_live(h)
        # No record of ours comes near 16 MiB (device data goes in 1 MiB chunks): a
        # hostile length is refused instead of buffered.
        dec = StreamDecoder(self.savevm.payload_kinds(), max_payload=MAX_RECORD_BYTES,
                            vmstate=self.savevm.vmstate_descriptions())
        if self._preread:
            dec.receive_data(self._preread)    # the magic multifd classification read
        # Page runs go straight into guest RAM where the channel can scatter
        # (not once postcopy listens: RamDirectLoad checks ram.postcopy_armed).
        direct = (RamDirectLoad(self.machine.ram, ram, self.read_iovec)
                  if isinstance(self.channel, SocketChannel) else None)
        while True:
            try:
                savevm.qemu_loadvm_state_main(self.savevm, self, dec,
                                              machine_type=self.machine.machine_type,
                                              uuid=self.machine.uuid_bytes, clock=self.clock,
                                              direct=direct)
                break
            except (TransportError, OSError, StreamError, LoadError) as exc:
                if not self._can_pause(exc):
                    raise
                log.info("postcopy paused: %s", exc)
                self._postcopy_pause(dec)
        savevm.qemu_loadvm_state_complete(self.savevm, self.clock)
        self._complete()

    def _complete(self) -> None:
        """process_incoming_migration_bh: decide whether the guest runs."""
        if self.multifd is not None:
            # The last MULTIFD_FLUSH already waited for every page; the channels are done.
            if self.multifd.error:
                raise LoadError(self.multifd.error)
            self.multifd.shutdown()
            self.multifd.close()
        self.mark("dst-loaded")
        if self.postcopy is not None and self.postcopy.listening:
            self._complete_postcopy()
            return
        self._start_guest()
        self.mark("dst-vm-started")
        self.final_costs = {**self.load_costs(self.clock()), **self.measured_costs()}
        self._set(S.ACTIVE, S.COMPLETED)
        self._shut_and_close()

    def _complete_postcopy(self) -> None:
        """Every page is in: disarm userfaultfd, then completed and SHUT."""
        assert self.postcopy is not None
        self._ram_load.placer = None
        self.postcopy.close()
        self._set(S.POSTCOPY_ACTIVE, S.COMPLETED)
        self._shut_and_close()

    def _start_guest(self) -> None:
        """The run state the source's globalstate says (running: if not -S)."""
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

    def _shut_and_close(self) -> None:
        if self.rp is not None:
            if self.peer_livemig:             # what it really cost, for the source to show
                self.rp.send_load_costs(self.final_costs)
            self.rp.send_shut(0)
            self.rp.close()
        if self.channel is not None:
            self.channel.close()
