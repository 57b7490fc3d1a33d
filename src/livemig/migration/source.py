"""The source side: MigrationState and the migration thread (precopy).

Follows QEMU's migration_thread: setup -> active -> [pre-switchover] ->
device -> completed (or failed / cancelling -> cancelled). One thread sends
the stream; a second reads the return path. Cross-thread state lives here,
guarded by ``self._lock``; the QMP loop only calls :meth:`migrate`,
:meth:`cancel`, :meth:`continue_`, :meth:`query` (``@upper_half``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livemig.machine.runstate import RunState
from livemig.migration import switchover
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.multifd import MultifdSender
from livemig.migration.qemu_file import QEMUFile
from livemig.migration.ram import RamSaveHandler
from livemig.migration.return_path import SourceReturnPath
from livemig.migration.savevm import source_handlers
from livemig.migration.status import AnnouncesStatus, StatusMachine
from livemig.migration.status import MigrationStatus as S
from livemig.threadname import name_native_thread
from livemig.transport import Channel, TransportError, open_outgoing
from livemig.wire import (
    MigCmd,
    SectionType,
    encode_command,
    encode_configuration,
    encode_eof,
    encode_footer,
    encode_header,
    encode_section_header,
    encode_vmdesc,
)

log = logging.getLogger("livemig.migration")
EventCallback = Callable[[str, dict | None], None]


class MigrationCancelled(Exception):
    pass


@dataclass
class SourceTimes:
    """Wall-clock marks of one migration, in ``time.monotonic()`` seconds."""

    start: float = 0.0
    setup_done: float | None = None
    end: float | None = None
    downtime_start: float | None = None
    ack: float | None = None
    checkpoints: dict[str, float] = field(default_factory=dict)


def ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class MigrationState(AnnouncesStatus):
    """One VM's outgoing migration. Reused for each ``migrate`` (QEMU's
    migrate_init resets it)."""

    def __init__(self, machine, caps, params, emit: EventCallback) -> None:
        self.machine = machine
        self.caps = caps
        self.params = params
        self.emit = emit
        self.sm = StatusMachine()
        self._lock = threading.Lock()
        self._wake = threading.Event()          # cancel / ACK / continue wake the thread
        self._continue = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        self.error_desc: str | None = None
        self.times = SourceTimes(start=time.monotonic())
        self.downtime_ms: int | None = None
        self.expected_downtime_ms: int = self.params.downtime_limit_ms
        self.threshold_bytes = 0
        self.mbps = 0.0
        self.pages_per_second = 0.0
        self.file: QEMUFile | None = None
        self.ram: RamSaveHandler | None = None
        self.rp: SourceReturnPath | None = None
        self.channel = None
        self.multifd: MultifdSender | None = None
        self.switchover_acked = False
        self.switchover_ack_user_num = 0
        self.iterations = 0
        self.vm_was_running = False
        self.pass_history: list[dict[str, Any]] = []
        self._continue.clear()
        self._wake.clear()

    # -- status ---------------------------------------------------------------------

    def _set_error(self, desc: str) -> None:
        with self._lock:
            if self.error_desc is None:
                self.error_desc = desc

    def is_running(self) -> bool:
        return self.sm.is_running()

    # -- QMP entry points (@upper_half) ------------------------------------------------
    def migrate(self, address) -> None:
        """Start a migration to ``address`` (a transport address). Caller checked
        the preconditions (run state, no migration in progress)."""
        self.reset()
        old = self.sm.status
        if old is S.NONE:
            self._set(S.NONE, S.SETUP)
        else:
            self._set(old, S.SETUP)
        self._thread = threading.Thread(target=self._thread_main, args=(address,),
                                        name="live_migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """QEMU's migrate_cancel: running states go to cancelling; channels are
        shut so blocked sends and reads return at once."""
        while True:
            old = self.sm.status
            if old not in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE):
                return
            if self._set(old, S.CANCELLING):
                break
        self._wake.set()
        self._continue.set()
        if self.channel is not None:
            self.channel.shutdown()
        if self.multifd is not None:
            self.multifd.shutdown()
        if self.rp is not None:
            self.rp.shutdown()

    def continue_(self) -> None:
        self._continue.set()
        self._wake.set()

    def apply_max_bandwidth(self) -> None:
        """``migrate-set-parameters max-bandwidth`` during a migration: QEMU's
        migration_rate_set, except once the guest stopped (the rest goes
        unlimited)."""
        f = self.file
        if f is not None and self.is_running() and self.sm.status is not S.DEVICE:
            f.set_rate_limit(self.params.max_bandwidth_bytes_per_s)

    def on_switchover_ack(self) -> None:
        """@bottom_half (return-path thread)."""
        with self._lock:
            self.switchover_acked = True
            self.times.ack = time.monotonic()
        self._wake.set()

    # -- the migration thread (@bottom_half) ------------------------------------------------
    def _thread_main(self, address) -> None:
        name_native_thread()
        try:
            self._run(address)
        except MigrationCancelled:
            pass
        except Exception as exc:  # any failure fails the migration, never the VM
            log.debug("migration failed", exc_info=True)
            if self.rp is not None and not self.rp.error:
                # A write failed because the destination gave up: its reason is on
                # the return path, right behind. Give the reader a moment for it.
                self.rp.wait_done(1.0)
            self._set_error(self._describe(exc))
        finally:
            self._finish()

    def _describe(self, exc: Exception) -> str:
        if self.rp is not None and self.rp.error:
            return self.rp.error
        if self.file is not None and self.file.error:
            return self.file.error
        desc = getattr(exc, "desc", None)
        return desc or str(exc) or type(exc).__name__

    def _check(self) -> None:
        """Raise if cancelled or if the return path reported a failure."""
        if self.sm.status is S.CANCELLING:
            raise MigrationCancelled()
        if self.rp is not None and self.rp.error:
            raise RuntimeError(self.rp.error)
        if self.multifd is not None and self.multifd.error:
            raise RuntimeError(self.multifd.error)

    def _run(self, address) -> None:
        if isinstance(address, Channel):
            self.channel = address          # already connected (tests, fd:)
        else:
            self.channel = self._connect(address)
        self._check()
        f = self.file = QEMUFile(self.channel)
        f.set_rate_limit(self.params.max_bandwidth_bytes_per_s)
        f.switchover_ack = self.caps.get("switchover-ack")
        f.write(encode_header())
        uuid = self.machine.uuid_bytes if self.caps.get("validate-uuid") else None
        f.write(encode_configuration(self.machine.machine_type, uuid=uuid))
        if self.caps.get("return-path"):
            if not self.channel.supports_return_path:
                raise RuntimeError("Unable to open return-path for postcopy")
            self.rp = SourceReturnPath(self.channel.return_path(), self.on_switchover_ack)
            self.rp.start()
            f.write(encode_command(MigCmd.OPEN_RETURN_PATH))
            f.write(encode_command(MigCmd.PING, (1).to_bytes(4, "big")))

        self.handlers = source_handlers(self.machine, self._on_sync)
        self.ram = self.handlers[0]  # type: ignore[assignment]
        if self.caps.get("multifd"):
            self.multifd = self._open_multifd(address)
            self.ram.multifd = self.multifd
        self.global_state = next(h for h in self.handlers if isinstance(h, GlobalStateHandler))
        for sid, h in enumerate(self.handlers):
            if h.iterable:
                f.write(encode_section_header(SectionType.SECTION_START, sid, h.idstr,
                                              h.instance_id, h.version_id))
                h.save_setup(f)
                f.write(encode_footer(sid))
        f.flush()
        if self.caps.get("switchover-ack"):
            self.switchover_ack_user_num = sum(h.switchover_ack_needed() for h in self.handlers)
        self.times.setup_done = time.monotonic()
        self._check()
        if not self._set(S.SETUP, S.ACTIVE):
            self._check()
        self._iterate_until_complete(f)

    def _connect(self, address) -> Channel:
        """open_outgoing on a helper thread, so migrate_cancel during a slow
        connect (SYN retries to a dead host) ends the migration at once."""
        result: dict[str, Any] = {}
        abandoned = threading.Event()

        def connect() -> None:
            try:
                ch = open_outgoing(address)
            except Exception as exc:  # noqa: BLE001 - handed to the migration thread
                result["error"] = exc
                return
            if abandoned.is_set():
                ch.close()
            else:
                result["channel"] = ch
        t = threading.Thread(target=connect, name="live_migration connect", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if self.sm.status is S.CANCELLING:
                abandoned.set()
                if "channel" in result:
                    result["channel"].close()
                raise MigrationCancelled()
        if "error" in result:
            exc = result["error"]
            raise RuntimeError(getattr(exc, "desc", None) or str(exc)) from None
        return result["channel"]

    def _open_multifd(self, address) -> MultifdSender:
        n = self.params.multifd_channels
        channels = []
        try:
            for _ in range(n):
                channels.append(open_outgoing(address))
        except TransportError as exc:
            for ch in channels:
                ch.close()
            raise RuntimeError(exc.desc) from None
        return MultifdSender(channels, self.machine.ram, os.urandom(16))

    def _can_switchover(self) -> bool:
        return switchover.can_switchover(
            switchover_ack=bool(self.caps.get("switchover-ack")),
            ack_users=self.switchover_ack_user_num,
            vm_running=self.machine.is_running(), acked=self.switchover_acked)

    def _iterate_until_complete(self, f: QEMUFile) -> None:
        window_t0 = time.monotonic()
        window_bytes0 = self.transferred()
        assert self.ram is not None
        while True:
            self._check()
            can_switch = self._can_switchover()
            pending = sum(h.state_pending_estimate() for h in self.handlers if h.iterable)
            if switchover.should_sync_exact(pending, self.threshold_bytes):
                pending = sum(h.state_pending_exact() for h in self.handlers if h.iterable)
            if switchover.complete_ready(pending, self.threshold_bytes, can_switch):
                self._completion(f)
                return
            waiting_for_ack = not can_switch and pending < self.threshold_bytes
            if not f.rate_exceeded():
                self._iterate_once(f)
            self.iterations += 1

            now = time.monotonic()
            window_ms = (now - window_t0) * 1000
            if window_ms >= switchover.BUFFER_DELAY_MS:
                self._close_window(self.transferred() - window_bytes0, window_ms)
                window_t0, window_bytes0 = now, self.transferred()
                f.window_bytes = 0
                continue
            left_ms = switchover.BUFFER_DELAY_MS - window_ms
            if f.rate_exceeded():
                self._wake.wait(left_ms / 1000)        # QEMU's migration_rate_limit
                self._wake.clear()
            elif waiting_for_ack:
                # Nothing worth sending but the ACK is missing: wait for it instead of
                # spinning; dirtied pages still go out on the next pass.
                self._wake.wait(switchover.ack_wait_seconds(left_ms))
                self._wake.clear()

    def _iterate_once(self, f: QEMUFile) -> None:
        """qemu_savevm_state_iterate (9.0+): every handler gets its turn, none starves."""
        for sid, h in enumerate(self.handlers):
            if not h.iterable:
                continue
            if f.rate_exceeded():
                break
            f.write(encode_section_header(SectionType.SECTION_PART, sid))
            h.save_live_iterate(f)
            f.write(encode_footer(sid))
        f.flush()

    def _close_window(self, nbytes: int, window_ms: float) -> None:
        assert self.ram is not None
        c = self.ram.counters
        w = switchover.close_window(nbytes, c.pages_in_window, window_ms)
        c.pages_in_window = 0
        self.mbps = w.mbps
        self.pages_per_second = w.pages_per_second
        limit = self.params.downtime_limit_ms
        self.threshold_bytes = switchover.threshold_size(
            w.bandwidth_bytes_per_ms, limit, self.params.avail_switchover_bandwidth_bytes_per_s)
        if c.dirty_pages_rate and nbytes > 10000:
            self.expected_downtime_ms = switchover.expected_downtime_ms(
                c.dirty_bytes_last_sync, w.bandwidth_bytes_per_ms, limit)
        self.pass_history.append({"t-ms": ms(time.monotonic() - self.times.start),
                                  "window-ms": round(window_ms),
                                  "bytes": nbytes,
                                  "bw-bytes-per-ms": round(w.bandwidth_bytes_per_ms),
                                  "remaining": self.ram.remaining_bytes(),
                                  "threshold": self.threshold_bytes})
        del self.pass_history[:-64]
        log.info("iter=%d sent=%dKiB remaining=%dKiB bw=%.0fMB/s threshold=%dKiB acked=%s",
                 self.iterations, nbytes >> 10, self.ram.remaining_bytes() >> 10,
                 w.bandwidth_bytes_per_ms / 1000, self.threshold_bytes >> 10,
                 self.switchover_acked)

    def _on_sync(self, count: int) -> None:
        if self.caps.get("events"):
            self.emit("MIGRATION_PASS", {"pass": count})

    def _mark(self, name: str) -> None:
        self.times.checkpoints[name] = time.monotonic()

    def _completion(self, f: QEMUFile) -> None:
        """Stop the guest, send what is left, wait for the destination's SHUT."""
        self.times.downtime_start = time.monotonic()
        self._mark("src-downtime-start")
        old_runstate = self.machine.runstate
        self.vm_was_running = self.machine.vm_stop(RunState.FINISH_MIGRATE)
        self.global_state.runstate = "running" if self.vm_was_running else old_runstate.value
        self._mark("src-vm-stopped")
        if self.caps.get("pause-before-switchover"):
            if not self._set(S.ACTIVE, S.PRE_SWITCHOVER):
                self._check()
            while not self._continue.wait(0.1):
                self._check()
            self._check()
            if not self._set(S.PRE_SWITCHOVER, S.DEVICE):
                self._check()
        elif not self._set(S.ACTIVE, S.DEVICE):
            self._check()
        f.rate_limit_bytes = 0
        f.write(encode_command(MigCmd.SWITCHOVER_START))
        for sid, h in enumerate(self.handlers):
            if h.iterable:
                f.write(encode_section_header(SectionType.SECTION_END, sid))
                h.save_live_complete_precopy(f)
                f.write(encode_footer(sid))
        self._mark("src-ram-queued")
        if self.multifd is not None:
            self.multifd.finish()          # every page packet is out before the devices
        self._mark("src-iterable-saved")
        for sid, h in enumerate(self.handlers):
            if not h.iterable:
                f.write(encode_section_header(SectionType.SECTION_FULL, sid, h.idstr,
                                              h.instance_id, h.version_id))
                h.save_state(f)
                f.write(encode_footer(sid))
        f.write(encode_eof())
        f.write(encode_vmdesc(self._vmdesc()))
        f.flush()
        self.channel.finish()       # exec: the command got it all and exited 0
        self._mark("src-non-iterable-saved")
        if self.rp is not None:
            self.rp.wait_shut(self._check)
            self._mark("src-return-path-shut")
        self._check()
        end = time.monotonic()
        self._mark("src-downtime-end")
        self.downtime_ms = ms(end - self.times.downtime_start)
        self.times.end = end
        total_ms = (end - self.times.start) * 1000
        setup_ms = ((self.times.setup_done or end) - self.times.start) * 1000
        if total_ms - setup_ms > 0:
            self.mbps = self.transferred() * 8 / (total_ms - setup_ms) / 1000
        self._set(S.DEVICE, S.COMPLETED)

    def transferred(self) -> int:
        """All bytes sent: main channel plus multifd channels (QEMU's transferred)."""
        return ((self.file.transferred if self.file else 0)
                + (self.multifd.bytes_sent if self.multifd else 0))

    def _vmdesc(self) -> bytes:
        devices = [{"name": h.idstr, "instance_id": h.instance_id, "vmsd_name": h.idstr,
                    "version": h.version_id} for h in self.handlers if not h.iterable]
        return json.dumps({"page_size": 4096, "devices": devices},
                          separators=(",", ":")).encode()

    def _finish(self) -> None:
        """migration_iteration_finish + cleanup: final status, run state, threads."""
        for h in getattr(self, "handlers", []):
            try:
                h.save_cleanup()
            except Exception:
                log.debug("save_cleanup failed", exc_info=True)
        status = self.sm.status
        if self.times.end is None:
            self.times.end = time.monotonic()
        if status is S.COMPLETED:
            self.machine.set_runstate(RunState.POSTMIGRATE)
        else:
            if status is S.CANCELLING:
                self._set(S.CANCELLING, S.CANCELLED)
            elif status not in (S.FAILED, S.CANCELLED):
                if self.error_desc is None:
                    self.error_desc = "migration failed"
                self._set(status, S.FAILED)
            if self.machine.runstate is RunState.FINISH_MIGRATE:
                if self.vm_was_running:
                    self.machine.vm_start()
                else:
                    self.machine.set_runstate(RunState.PAUSED)
        if self.channel is not None:
            self.channel.shutdown()
        if self.multifd is not None:
            self.multifd.shutdown()
            self.multifd.close()
        if self.rp is not None:
            self.rp.shutdown()
            self.rp.join(2.0)
        if self.channel is not None:
            try:
                self.channel.close()
            except Exception:
                log.debug("channel close failed", exc_info=True)

    # -- query-migrate ----------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        status = self.sm.status
        if status is S.NONE:
            return {}
        info: dict[str, Any] = {"status": status.value}
        now = time.monotonic()
        if status in (S.ACTIVE, S.CANCELLING, S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED) \
                and self.ram is not None:
            c = self.ram.counters
            end = self.times.end if status is S.COMPLETED else now
            total_ms = ms(end - self.times.start)
            info["total-time"] = total_ms
            if status is not S.COMPLETED:
                info["expected-downtime"] = self.expected_downtime_ms
            else:
                info["downtime"] = self.downtime_ms
            if self.times.setup_done is not None:
                info["setup-time"] = ms(self.times.setup_done - self.times.start)
            done = status is S.COMPLETED
            mfd = self.multifd
            # multifd pages by run state: those sent once the guest stopped are downtime.
            at_stop = self.ram.multifd_pages_at_stop
            mfd_pages = mfd.normal_pages if mfd else 0
            mfd_precopy = mfd_pages if at_stop is None else at_stop
            mfd_downtime = 0 if at_stop is None else mfd_pages - at_stop
            info["ram"] = {
                "transferred": self.transferred(),
                "remaining": 0 if done else self.ram.remaining_bytes(),
                "total": self.machine.ram.size,
                "duplicate": c.duplicate + (mfd.zero_pages if mfd else 0),
                "normal": c.normal + (mfd.normal_pages if mfd else 0),
                "normal-bytes": (c.normal + (mfd.normal_pages if mfd else 0)) * 4096,
                "dirty-pages-rate": 0 if done else c.dirty_pages_rate,
                "mbps": round(self.mbps, 2),
                "dirty-sync-count": c.dirty_sync_count,
                "postcopy-requests": 0,
                "page-size": 4096,
                "multifd-bytes": mfd.bytes_sent if mfd else 0,
                "pages-per-second": int(self.pages_per_second),
                "precopy-bytes": c.precopy_bytes + mfd_precopy * 4096,
                "downtime-bytes": c.downtime_bytes + mfd_downtime * 4096,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }
            if self.caps.get("switchover-ack"):
                ack = {"users": self.switchover_ack_user_num, "acked": self.switchover_acked}
                if self.times.ack is not None:
                    ack["ack-time"] = ms(self.times.ack - self.times.start)
                else:
                    ack["waiting"] = not done
                info["x-switchover-ack"] = ack
            if self.pass_history:
                info["x-windows"] = self.pass_history[-8:]   # the last 100 ms windows
            if self.times.checkpoints and self.times.downtime_start is not None:
                t0 = self.times.downtime_start
                info["x-downtime-checkpoints"] = {k: round((v - t0) * 1000, 3)
                                                  for k, v in self.times.checkpoints.items()}
        if self.error_desc is not None and status in (S.FAILED, S.CANCELLED, S.CANCELLING):
            info["error-desc"] = self.error_desc
        return info
