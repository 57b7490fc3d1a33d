"""The source side: MigrationState and the migration thread (precopy).

Follows QEMU's migration_thread: setup -> active -> [pre-switchover] ->
device -> completed (or failed / cancelling -> cancelled). This module holds
the threads and the I/O; the stream's sections are framed by the savevm
layer (``savevm.py``), the decision of each pass is the pure policy's
(``policy.py``), ``query-migrate`` is rendered from a snapshot (``info.py``).

One thread sends the stream; a second reads the return path. Cross-thread
state lives here, guarded by ``self._lock``; the QMP loop only calls
:meth:`migrate`, :meth:`cancel`, :meth:`continue_`, :meth:`apply_max_bandwidth`,
:meth:`query` (``@upper_half``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from livemig.machine.runstate import RunState
from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration import policy, savevm, switchover, tls
from livemig.migration.errors import MigrationCancelled, MigrationError
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.info import (
    RamFigures,
    SourceSnapshot,
    SourceStats,
    SourceTimes,
    ms,
    query_migrate_info,
    snapshot_stats,
)
from livemig.migration.multifd import MultifdSender
from livemig.migration.postcopy import (
    PostcopySource,
    postcopy_run_to_end,
    postcopy_start,
    send_postcopy_advise,
)
from livemig.migration.qemu_file import QEMUFile
from livemig.migration.ram import RamSaveHandler
from livemig.migration.return_path import SourceReturnPath
from livemig.migration.status import RUNNING, AnnouncesStatus, StatusMachine
from livemig.migration.status import MigrationStatus as S
from livemig.qapi.capabilities import Capabilities
from livemig.qapi.errors import POSTCOPY_CANNOT_CANCEL
from livemig.qapi.parameters import Parameters
from livemig.threadname import name_native_thread
from livemig.transport import Channel, TransportError, open_outgoing, zerocopy
from livemig.wire import LIVEMIG_HELLO

log = logging.getLogger("livemig.migration")
EventCallback = Callable[[str, dict | None], None]
Clock = Callable[[], float]

__all__ = ["MigrationCancelled", "MigrationState", "SourceTimes", "ms"]


class MigrationState(AnnouncesStatus):
    """One VM's outgoing migration. Reused for each ``migrate`` (QEMU's
    migrate_init resets it). It is the :class:`SaveContext` its handlers see."""

    def __init__(self, machine, caps: Capabilities, params: Parameters, emit: EventCallback,
                 *, clock: Clock = time.monotonic, objects: Any = None) -> None:
        self.machine = machine
        self.objects = objects                  # /objects: tls-creds are looked up there
        self.caps = caps
        self.params = params
        self.emit = emit
        self.clock = clock
        self.sm = StatusMachine()
        self._lock = threading.Lock()
        self._wake = threading.Event()          # cancel / ACK / continue wake the thread
        self._continue = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        self.error_desc: str | None = None
        self.stats = SourceStats(times=SourceTimes(start=self.clock()),
                                 expected_downtime_ms=self.params.downtime_limit_ms)
        self.file: QEMUFile | None = None
        self.ram: RamSaveHandler | None = None
        self.rp: SourceReturnPath | None = None
        self.channel: Channel | None = None
        self.multifd: MultifdSender | None = None
        self.savevm = savevm.SaveVMState()
        self.global_state = GlobalStateHandler()
        self.switchover_acked = False
        self.switchover_ack_user_num = 0
        self.vm_was_running = False
        self._window_bytes0 = 0
        self._recent_bw: deque[float] = deque(maxlen=switchover.SUSTAINED_WINDOWS)
        self._periods_seen = 0
        self._sent_at_period = 0
        self.dest_costs: dict[str, float] | None = None
        self.hello_answered = False
        self.rp_rtt_ms = 0.0
        self._ping_sent_at: float | None = None
        self.start_postcopy = False        # migrate-start-postcopy asked
        self.in_postcopy = False
        self.postcopy: PostcopySource | None = None
        self.postcopy_discarded = 0
        self._continue.clear()
        self._wake.clear()

    @property
    def times(self) -> SourceTimes:
        return self.stats.times

    # -- status ---------------------------------------------------------------------

    def _set_error(self, desc: str) -> None:
        with self._lock:
            if self.error_desc is None:
                self.error_desc = desc

    def is_running(self) -> bool:
        return self.sm.is_running()

    # -- SaveContext -------------------------------------------------------------------
    def switchover_ack_enabled(self) -> bool:
        return self.caps.switchover_ack

    # -- QMP entry points (@upper_half) ------------------------------------------------
    def migrate(self, address) -> None:
        """Start a migration to ``address`` (a transport address, or a connected
        Channel). Caller checked the preconditions (run state, no migration in
        progress)."""
        self.reset()
        self._set(self.sm.status, S.SETUP)
        self._thread = threading.Thread(target=self._thread_main, args=(address,),
                                        name="live_migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """QEMU's migrate_cancel: running states go to cancelling; channels are
        shut so blocked sends and reads return at once. Refused once postcopy
        has sent its package (QEMU 10.0's qmp_migrate_cancel: the guest may run
        on the destination, the source cannot take it back); the check and
        ``postcopy_start``'s point of no return hold ``_lock``, so a cancel
        comes wholly before it (the source guest restarts) or is refused."""
        with self._lock:
            while True:
                old = self.sm.status
                if self.in_postcopy and old in RUNNING:
                    raise MigrationError(POSTCOPY_CANNOT_CANCEL)
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

    def migrate_start_postcopy(self) -> None:
        """@upper_half: the next pass that may switches to postcopy."""
        self.start_postcopy = True
        self._wake.set()

    def migrate_resume(self, address) -> None:
        """@upper_half: ``migrate resume=true``: the paused postcopy goes on over
        a new channel to ``address`` (the caller checked it is paused)."""
        assert self.postcopy is not None
        self._set(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP)
        self.postcopy.resume_to(address)

    def migrate_pause(self) -> None:
        """@upper_half: ``migrate-pause`` in postcopy: cut the channel on purpose."""
        if self.channel is not None:
            self.channel.shutdown()
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

    def on_load_costs(self, costs: dict[str, float]) -> None:
        """@bottom_half (return-path thread): the destination's X_LOAD_COSTS."""
        with self._lock:
            self.dest_costs = dict(costs)

    def on_pong(self, value: int) -> None:
        """@bottom_half: the first PONG times the return path's round trip."""
        if value == 1 and self._ping_sent_at is not None:
            with self._lock:
                self.rp_rtt_ms = (self.clock() - self._ping_sent_at) * 1000
        elif value == LIVEMIG_HELLO:
            # A livemig destination sent its costs before this; a QEMU one sends none.
            self.hello_answered = True
            self._wake.set()

    def on_switchover_ack(self) -> None:
        """@bottom_half (return-path thread)."""
        with self._lock:
            self.switchover_acked = True
            self.times.ack = self.clock()
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
            if self.sm.status is S.CANCELLING:
                # migrate_cancel shut the channels down under us: the write or
                # read that failed is the cancel itself, not a cause to report.
                return
            if self.rp is not None and not self.rp.error:
                # A write failed because the destination gave up: its reason is on
                # the return path, right behind. Give the reader a moment for it.
                self.rp.wait_done(1.0)
            self._set_error(self._describe(exc))
        finally:
            self._finish()

    def _describe(self, exc: Exception) -> str:
        """The failure's cause: the destination's word first (it knows why it
        hung up), then the stream's write error, then the exception's text."""
        if self.rp is not None and self.rp.error:
            return self.rp.error
        if self.file is not None and self.file.error:
            return self.file.error
        if isinstance(exc, (MigrationError, TransportError)):
            return exc.desc
        return str(exc) or type(exc).__name__

    def check(self) -> None:
        """Raise if cancelled or if the return path or multifd reported a failure."""
        if self.sm.status is S.CANCELLING:
            raise MigrationCancelled()
        if self.rp is not None and self.rp.error:
            raise MigrationError(self.rp.error)
        if self.multifd is not None and self.multifd.error:
            raise MigrationError(self.multifd.error)

    def _run(self, address) -> None:
        channel = address if isinstance(address, Channel) else self._connect(address)
        self.channel = channel                 # a Channel: already connected (tests, fd:)
        if self.caps.zero_copy_send and not channel.enable_zero_copy():
            # QEMU's socket_outgoing_migration checks the main channel at connect.
            raise MigrationError(zerocopy.FEATURE_NOT_DETECTED)
        self.check()
        f = self.file = QEMUFile(channel)
        f.set_rate_limit(self.params.max_bandwidth_bytes_per_s)
        uuid = self.machine.uuid_bytes if self.caps.validate_uuid else None
        savevm.qemu_savevm_state_header(f, self.machine.machine_type, uuid)
        self.savevm.configuration = (self.machine.machine_type, uuid)
        if self.caps.postcopy_ram:
            self.postcopy = PostcopySource(self.machine.ram.idstr, self.machine.ram.size)
        if self.caps.return_path or self.caps.postcopy_ram:     # postcopy needs it (QEMU)
            if not channel.supports_return_path:
                raise MigrationError("Unable to open return-path for postcopy")
            self.rp = SourceReturnPath(
                channel.return_path(), self.on_switchover_ack, on_costs=self.on_load_costs,
                on_pong=self.on_pong,
                on_postcopy=self.postcopy.on_rp_message if self.postcopy else None)
            self.rp.start()
            savevm.qemu_savevm_send_open_return_path(f)
            self._ping_sent_at = self.clock()
            savevm.qemu_savevm_send_ping(f, 1)
            # "I read livemig's messages": a livemig destination then reports its
            # load costs; a QEMU destination only echoes the value.
            savevm.qemu_savevm_send_ping(f, LIVEMIG_HELLO)
        if self.caps.postcopy_ram:
            send_postcopy_advise(self)
        if self.caps.multifd:
            self.multifd = self._open_multifd(address)
        self.ram = RamSaveHandler(self.machine, self._on_sync, multifd=self.multifd)
        self.ram.has_postcopy = self.caps.postcopy_ram
        self._register(self.ram, *self.machine.vmstate_handlers(), self.global_state)
        savevm.qemu_savevm_state_setup(self.savevm, f, self)
        if self.caps.switchover_ack:
            self.switchover_ack_user_num = self.savevm.switchover_ack_needed()
        self.times.setup_done = self.clock()
        self.check()
        if not self._set(S.SETUP, S.ACTIVE):
            self.check()
        self._window_bytes0 = self.transferred()
        policy.migration_iterate_until_complete(self)

    def _register(self, *handlers: SaveVMHandlers) -> None:
        for h in handlers:
            self.savevm.register_savevm_live(h)

    def _connect(self, address) -> Channel:
        """open_outgoing on a helper thread, so migrate_cancel during a slow
        connect (SYN retries to a dead host) ends the migration at once."""
        result: dict[str, Any] = {}
        abandoned = threading.Event()

        def connect() -> None:
            try:
                ch = self._open_channel(address)
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
            raise MigrationError(getattr(exc, "desc", None) or str(exc)) from None
        return result["channel"]

    def _open_channel(self, address) -> Channel:
        """Connect (QEMU's socket_start_outgoing_migration), then TLS when
        ``tls-creds`` is set (migration_tls_channel_connect)."""
        ch = open_outgoing(address)
        if not tls.tls_enabled(self.params):
            return ch
        try:
            creds = tls.migration_tls_get_creds(self.objects, self.params.get("tls-creds"),
                                                "client")
        except TransportError:
            ch.close()
            raise
        hostname = self.params.get("tls-hostname") or getattr(address, "host", None)
        return tls.tls_client(ch, creds, hostname)

    def _open_multifd(self, address) -> MultifdSender:
        n = self.params.multifd_channels
        channels = []
        zero_copy = self.caps.zero_copy_send
        try:
            for _ in range(n):
                channels.append(self._open_channel(address))
                if zero_copy and not channels[-1].enable_zero_copy():
                    # QEMU's qio_channel_writev_full on a channel without the feature
                    raise TransportError(zerocopy.FEATURE_NOT_AVAILABLE)
        except TransportError as exc:
            for ch in channels:
                ch.close()
            raise MigrationError(exc.desc) from None
        # QEMU's multifd_send_initial_packet: the VM's -uuid (zeros without one), which a
        # QEMU destination checks against its own.
        return MultifdSender(channels, self.machine.ram, self.machine.uuid_bytes or bytes(16),
                             zero_copy=zero_copy)

    # -- the iteration loop: the policy decides, this carries it out --------------------
    def _can_switchover(self) -> bool:
        return switchover.can_switchover(
            switchover_ack=self.caps.switchover_ack,
            ack_users=self.switchover_ack_user_num,
            vm_running=self.machine.is_running(), acked=self.switchover_acked)

    # IterationEngine: what the policy's loop drives (policy.migration_iterate_until_complete)
    def now(self) -> float:
        return self.clock()

    def iteration_stats(self, window_start: float,
                        pending: int | None = None) -> policy.IterationStats:
        assert self.file is not None
        return policy.IterationStats(
            now=self.clock(), window_start=window_start,
            pending=(savevm.qemu_savevm_state_pending_estimate(self.savevm)
                     if pending is None else pending),
            pending_exact=pending is not None, threshold=self.stats.threshold_bytes,
            can_switchover=self._can_switchover(), rate_exceeded=self.file.rate_exceeded(),
            convergence=self.stats.convergence, stall_timeout_s=self.params.stall_timeout_s,
            fits=self._fits(), start_postcopy=self.start_postcopy,
            must_precopy=savevm.qemu_savevm_state_must_precopy(self.savevm))

    def _fits(self) -> bool:
        """Can any switchover meet downtime-limit? Not known until the destination
        answered the hello (then its costs, if it is livemig, are in)."""
        if self.rp is not None and not self.hello_answered:
            return False
        with self._lock:
            costs, rtt = self.dest_costs, self.rp_rtt_ms
        if costs is None:
            return True
        return switchover.destination_fixed_ms(costs) + rtt < self.params.downtime_limit_ms

    def pending_exact(self) -> int:
        return savevm.qemu_savevm_state_pending_exact(self.savevm)

    def iterate(self) -> None:
        assert self.file is not None
        savevm.qemu_savevm_state_iterate(self.savevm, self.file)

    def complete(self) -> None:
        assert self.file is not None
        self._completion(self.file)

    def postcopy_start(self) -> None:
        postcopy_start(self)
        postcopy_run_to_end(self)

    def fail(self, desc: str) -> None:
        raise MigrationError(desc)

    def pass_done(self) -> None:
        self.stats.iterations += 1

    def close_window(self, window_start: float) -> float:
        assert self.file is not None
        now = self.clock()
        sent = self.transferred()
        self._close_window(sent - self._window_bytes0, (now - window_start) * 1000)
        self._window_bytes0 = sent
        self.file.window_bytes = 0
        return now

    def wait(self, seconds: float) -> None:
        # rate-limit: QEMU's migration_rate_limit. switchover-ack: nothing worth
        # sending but the ACK is missing; dirtied pages go out on the next pass.
        self._wake.wait(seconds)
        self._wake.clear()

    def _close_window(self, nbytes: int, window_ms: float) -> None:
        assert self.ram is not None
        c = self.ram.counters
        w = switchover.close_window(nbytes, c.pages_in_window, window_ms)
        c.pages_in_window = 0
        st = self.stats
        st.mbps = w.mbps
        st.bandwidth_bytes_per_s = w.bandwidth_bytes_per_ms * 1000
        st.pages_per_second = w.pages_per_second
        limit = self.params.downtime_limit_ms
        with self._lock:
            costs, rtt = self.dest_costs, self.rp_rtt_ms
        if nbytes > 0:
            self._recent_bw.append(w.bandwidth_bytes_per_ms)
        # With the destination's costs the prediction is livemig's contract: the rate
        # the link keeps; without them QEMU's estimate, on the last window.
        link = (switchover.sustained_rate(self._recent_bw) if costs is not None
                else w.bandwidth_bytes_per_ms)
        est = switchover.downtime_estimate(
            link, limit, self.params.avail_switchover_bandwidth_bytes_per_s, costs, rtt)
        st.estimate = est
        st.threshold_bytes = est.threshold
        if est.basis == "destination":
            st.expected_downtime_ms = est.predicted_ms(c.dirty_bytes_last_sync)
        elif c.dirty_pages_rate and nbytes > 10000:
            st.expected_downtime_ms = switchover.expected_downtime_ms(
                c.dirty_bytes_last_sync, w.bandwidth_bytes_per_ms, limit)
        st.add_window({"t-ms": ms(self.clock() - self.times.start),
                       "window-ms": round(window_ms),
                       "bytes": nbytes,
                       "bw-bytes-per-ms": round(w.bandwidth_bytes_per_ms),
                       "remaining": self.ram.remaining_bytes(),
                       "threshold": st.threshold_bytes})
        log.info("iter=%d sent=%dKiB remaining=%dKiB bw=%.0fMB/s threshold=%dKiB acked=%s",
                 st.iterations, nbytes >> 10, self.ram.remaining_bytes() >> 10,
                 w.bandwidth_bytes_per_ms / 1000, st.threshold_bytes >> 10,
                 self.switchover_acked)

    def _throttle_params(self) -> policy.ThrottleParams:
        g = self.params.get
        return policy.ThrottleParams(
            initial=int(g("cpu-throttle-initial")), increment=int(g("cpu-throttle-increment")),
            tailslow=bool(g("cpu-throttle-tailslow")), maximum=int(g("max-cpu-throttle")),
            trigger_threshold=int(g("throttle-trigger-threshold")))

    def _on_sync(self, count: int) -> None:
        """After each dirty-log sync: judge convergence, announce the pass."""
        if self.ram is not None:
            c, st = self.ram.counters, self.stats
            est = st.estimate
            st.convergence = policy.convergence_update(
                st.convergence, now=self.clock(), remaining=c.dirty_bytes_last_sync,
                dirty_rate=c.dirty_pages_rate * 4096.0, bandwidth=st.bandwidth_bytes_per_s,
                threshold=st.threshold_bytes, fixed_ms=est.fixed_ms if est else 0.0,
                limit_ms=est.limit_ms if est else 0)
            if self.caps.auto_converge and c.periods != self._periods_seen:
                self._periods_seen = c.periods
                sent = self.transferred()
                st.throttle = policy.migration_trigger_throttle(
                    st.throttle, dirty_bytes=c.period_dirty_bytes,
                    xfer_bytes=sent - self._sent_at_period, p=self._throttle_params())
                self._sent_at_period = sent
                if st.throttle.pct != self.machine.throttle.percentage:
                    log.info("auto-converge: cpu throttle %d%%", st.throttle.pct)
                    self.machine.throttle.set(st.throttle.pct)
        if self.caps.events:
            self.emit("MIGRATION_PASS", {"pass": count})

    def _mark(self, name: str) -> None:
        self.times.checkpoints[name] = self.clock()

    def _completion(self, f: QEMUFile) -> None:
        """migration_completion: stop the guest, send what is left, wait for
        the destination's SHUT."""
        assert self.channel is not None
        self.machine.throttle.set(0)        # cpu_throttle_stop: the guest stops anyway
        self.times.downtime_start = self.clock()
        self._mark("src-downtime-start")
        if self.ram is not None:
            if self.stats.estimate is None:
                # Switched over inside the first window: that window is the basis.
                begun = self.times.setup_done or self.times.start
                self._close_window(self.transferred() - self._window_bytes0,
                                   (self.times.downtime_start - begun) * 1000)
            self.stats.pending_at_switchover = self.ram.remaining_bytes()
        old_runstate = self.machine.runstate
        self.vm_was_running = self.machine.vm_stop(RunState.FINISH_MIGRATE)
        self.global_state.runstate = "running" if self.vm_was_running else old_runstate.value
        self._mark("src-vm-stopped")
        if self.caps.pause_before_switchover:
            if not self._set(S.ACTIVE, S.PRE_SWITCHOVER):
                self.check()
            while not self._continue.wait(0.1):
                self.check()
            self.check()
            if not self._set(S.PRE_SWITCHOVER, S.DEVICE):
                self.check()
        elif not self._set(S.ACTIVE, S.DEVICE):
            self.check()
        f.rate_limit_bytes = 0
        savevm.qemu_savevm_state_complete_precopy_iterable(self.savevm, f)
        self._mark("src-ram-queued")
        if self.multifd is not None:
            self.multifd.finish()          # every page packet is out before the devices
        self._mark("src-iterable-saved")
        savevm.qemu_savevm_state_complete_precopy_non_iterable(self.savevm, f)
        end = self._await_destination("src-non-iterable-saved")
        self._mark("src-downtime-end")
        st = self.stats
        st.downtime_ms = ms(end - self.times.downtime_start)
        self.times.end = end
        total_ms = (end - self.times.start) * 1000
        setup_ms = ((self.times.setup_done or end) - self.times.start) * 1000
        if total_ms - setup_ms > 0:
            st.mbps = self.transferred() * 8 / (total_ms - setup_ms) / 1000
        # The run state first: whoever sees 'completed' then sees 'postmigrate'.
        self.machine.set_runstate(RunState.POSTMIGRATE)
        if not self._set(S.DEVICE, S.COMPLETED):
            # Cancelled at the last moment: _finish restarts the guest from here.
            self.machine.set_runstate(RunState.FINISH_MIGRATE)

    def _await_destination(self, sent_mark: str) -> float:
        """The stream's end: flush the channel (exec: the command got it all and
        exited 0), mark ``sent_mark``, wait for the destination's SHUT on the
        return path; the time it all ended."""
        assert self.channel is not None
        self.channel.finish()
        self._mark(sent_mark)
        if self.rp is not None:
            self.rp.wait_shut(self.check)
            self._mark("src-return-path-shut")
        self.check()
        return self.clock()

    def transferred(self) -> int:
        """All bytes sent: main channel plus multifd channels (QEMU's transferred)."""
        return ((self.file.transferred if self.file else 0)
                + (self.multifd.bytes_sent if self.multifd else 0))

    def _finish(self) -> None:
        """migration_iteration_finish + cleanup: final status, run state, threads."""
        self.machine.throttle.set(0)
        savevm.qemu_savevm_state_cleanup(
            self.savevm, lambda h, exc: log.debug("save_cleanup of %s failed: %s", h.idstr, exc))
        status = self.sm.status
        if self.times.end is None:
            self.times.end = self.clock()
        if status is not S.COMPLETED:
            if status not in (S.FAILED, S.CANCELLED, S.CANCELLING):
                if self.error_desc is None:
                    self.error_desc = "migration failed"
                self._set(status, S.FAILED)
            # The guest restarts before 'cancelling' becomes 'cancelled' (QEMU's
            # order: cancelling, RESUME, cancelled), so whoever sees 'cancelled'
            # sees it running.
            if self.in_postcopy:
                # The guest's truth is on the destination now: never run it here
                # (QEMU would pause for recovery; livemig has none yet).
                log.info("postcopy failed: the source guest stays stopped")
            elif self.machine.runstate is RunState.FINISH_MIGRATE:
                if self.vm_was_running:
                    self.machine.vm_start()
                else:
                    self.machine.set_runstate(RunState.PAUSED)
            if status is S.CANCELLING:
                self._set(S.CANCELLING, S.CANCELLED)
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
    def snapshot(self) -> SourceSnapshot:
        """The figures at this moment, for ``query-migrate`` (any thread)."""
        status = self.sm.status
        ram = self.ram
        figures = None
        if ram is not None:
            c = ram.counters
            mfd = self.multifd.stats() if self.multifd is not None else None
            # multifd pages by run state: those sent once the guest stopped are downtime.
            at_stop = ram.multifd_pages_at_stop
            mfd_pages = mfd.normal_pages if mfd else 0
            mfd_precopy = mfd_pages if at_stop is None else at_stop
            figures = RamFigures(
                duplicate=c.duplicate + (mfd.zero_pages if mfd else 0),
                normal=c.normal + mfd_pages,
                precopy_pages=c.precopy_bytes // 4096 + mfd_precopy,
                downtime_pages=c.downtime_bytes // 4096 + (mfd_pages - mfd_precopy),
                dirty_sync_count=c.dirty_sync_count,
                dirty_pages_rate=c.dirty_pages_rate,
                remaining=ram.remaining_bytes(),
                multifd_bytes=mfd.bytes_sent if mfd else 0,
                postcopy_requests=self.postcopy.requests if self.postcopy else 0,
                postcopy_bytes=c.postcopy_bytes,
                dirty_sync_missed_zero_copy=mfd.missed_zero_copy if mfd else 0)
        with self._lock:
            acked = self.switchover_acked
            stats = snapshot_stats(self.stats)
            error = self.error_desc
            dest_costs = dict(self.dest_costs or {})
        return SourceSnapshot(
            status=status, now=self.clock(), times=stats.times, stats=stats, ram=figures,
            ram_total=self.machine.ram.size, transferred=self.transferred(),
            switchover_ack=self.caps.switchover_ack, ack_users=self.switchover_ack_user_num,
            acked=acked, error_desc=error, dest_costs=dest_costs,
            cpu_throttle_percentage=(self.machine.throttle.percentage
                                     if self.caps.auto_converge else None))

    def query(self) -> dict[str, Any]:
        return query_migrate_info(self.snapshot())
