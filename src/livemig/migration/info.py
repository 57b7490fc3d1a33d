"""The source's statistics and ``query-migrate``, rendered from a snapshot.

The migration thread updates :class:`SourceStats`; the QMP thread takes an
immutable :class:`SourceSnapshot` (``MigrationState.snapshot()``) and
:func:`query_migrate_info` turns it into QEMU's ``MigrationInfo`` members
(plus livemig's ``x-`` members) without touching live engine state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from livemig.migration.policy import Convergence, ThrottleState
from livemig.migration.status import MigrationStatus as S
from livemig.migration.switchover import DowntimeEstimate

PAGE_SIZE = 4096
WINDOWS_SHOWN = 8             # x-windows: the last 100 ms windows
WINDOWS_KEPT = 64


def ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass
class SourceTimes:
    """Wall-clock marks of one migration, in the engine's clock (seconds)."""

    start: float = 0.0
    setup_done: float | None = None
    end: float | None = None
    downtime_start: float | None = None
    ack: float | None = None
    checkpoints: dict[str, float] = field(default_factory=dict)


@dataclass
class SourceStats:
    """What the migration thread measures (QEMU's MigrationState counters)."""

    times: SourceTimes = field(default_factory=SourceTimes)
    downtime_ms: int | None = None
    expected_downtime_ms: int = 0
    threshold_bytes: int = 0
    mbps: float = 0.0
    pages_per_second: float = 0.0
    iterations: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)
    bandwidth_bytes_per_s: float = 0.0      # the last window's
    convergence: Convergence = Convergence()
    throttle: ThrottleState = ThrottleState()
    estimate: DowntimeEstimate | None = None   # the last window's switchover prediction
    pending_at_switchover: int | None = None   # what the prediction was made for

    def add_window(self, window: dict[str, Any]) -> None:
        self.windows.append(window)
        del self.windows[:-WINDOWS_KEPT]


@dataclass(frozen=True)
class RamFigures:
    """RAM's counters at one moment, main channel and multifd together."""

    duplicate: int = 0
    normal: int = 0
    precopy_pages: int = 0
    downtime_pages: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    remaining: int = 0
    multifd_bytes: int = 0
    postcopy_requests: int = 0     # REQ_PAGES the destination sent
    postcopy_bytes: int = 0        # RAM bytes sent once postcopy began
    dirty_sync_missed_zero_copy: int = 0   # multifd flushes that found every send copied


@dataclass(frozen=True)
class SourceSnapshot:
    """Everything ``query-migrate`` shows, copied at one moment."""

    status: S
    now: float
    times: SourceTimes
    stats: SourceStats
    ram: RamFigures | None
    ram_total: int
    transferred: int
    switchover_ack: bool
    ack_users: int
    acked: bool
    error_desc: str | None
    cpu_throttle_percentage: int | None = None   # with auto-converge on
    dest_costs: dict[str, float] = field(default_factory=dict)   # the last X_LOAD_COSTS


def snapshot_stats(stats: SourceStats) -> SourceStats:
    """A copy the QMP thread may read while the migration thread goes on."""
    times = replace(stats.times, checkpoints=dict(stats.times.checkpoints))
    return replace(stats, times=times, windows=list(stats.windows[-WINDOWS_SHOWN:]))


_SHOWS_RAM = (S.ACTIVE, S.CANCELLING, S.PRE_SWITCHOVER, S.DEVICE, S.POSTCOPY_ACTIVE,
              S.COMPLETED)


def _estimate_info(s: SourceSnapshot, done: bool) -> dict[str, Any]:
    """The prediction's parts; once completed, the one the switchover was
    made on, beside what it measured: the downtime here and what the
    destination measured of its own part (a livemig destination reports it)."""
    est = s.stats.estimate
    assert est is not None and s.ram is not None
    if not done:
        conv = s.stats.convergence
        return est.parts(s.ram.remaining if conv.state == "first-pass" else conv.remaining)
    pending = s.stats.pending_at_switchover or 0
    out: dict[str, Any] = est.parts(pending)
    # The RAM it priced beside the RAM the stopped guest really sent (the final
    # sync adds what was dirtied since the last): which of the two was off.
    out["pending-bytes"] = pending
    measured: dict[str, Any] = {"total-ms": s.stats.downtime_ms,
                                "ram-bytes": s.ram.downtime_pages * PAGE_SIZE}
    for key in ("device-load-ms", "post-load-ms", "last-byte-to-running-ms"):
        value = s.dest_costs.get(f"measured-{key}")
        if value is not None:
            measured[f"destination-{key}"] = int(round(value))
    out["measured"] = measured
    return out


def query_migrate_info(s: SourceSnapshot) -> dict[str, Any]:
    """QEMU's fill_source_migration_info, from a snapshot."""
    if s.status is S.NONE:
        return {}
    info: dict[str, Any] = {"status": s.status.value}
    t = s.times
    if s.status in _SHOWS_RAM and s.ram is not None:
        done = s.status is S.COMPLETED
        end = t.end if done and t.end is not None else s.now
        info["total-time"] = ms(end - t.start)
        if not done:
            info["expected-downtime"] = s.stats.expected_downtime_ms
        else:
            info["downtime"] = s.stats.downtime_ms
        if t.setup_done is not None:
            info["setup-time"] = ms(t.setup_done - t.start)
        r = s.ram
        info["ram"] = {
            "transferred": s.transferred,
            "remaining": 0 if done else r.remaining,
            "total": s.ram_total,
            "duplicate": r.duplicate,
            "normal": r.normal,
            "normal-bytes": r.normal * PAGE_SIZE,
            "dirty-pages-rate": 0 if done else r.dirty_pages_rate,
            "mbps": round(s.stats.mbps, 2),
            "dirty-sync-count": r.dirty_sync_count,
            "postcopy-requests": r.postcopy_requests,
            "page-size": PAGE_SIZE,
            "multifd-bytes": r.multifd_bytes,
            "pages-per-second": int(s.stats.pages_per_second),
            "precopy-bytes": r.precopy_pages * PAGE_SIZE,
            "downtime-bytes": r.downtime_pages * PAGE_SIZE,
            "postcopy-bytes": r.postcopy_bytes,
            "dirty-sync-missed-zero-copy": r.dirty_sync_missed_zero_copy,
        }
        if s.cpu_throttle_percentage is not None and not done:
            info["cpu-throttle-percentage"] = s.cpu_throttle_percentage
        if s.switchover_ack:
            ack: dict[str, Any] = {"users": s.ack_users, "acked": s.acked}
            if t.ack is not None:
                ack["ack-time"] = ms(t.ack - t.start)
            else:
                ack["waiting"] = not done
            info["x-switchover-ack"] = ack
        if s.stats.windows:
            info["x-windows"] = s.stats.windows[-WINDOWS_SHOWN:]
        if s.stats.estimate is not None:
            info["x-downtime-estimate"] = _estimate_info(s, done)
        conv = s.stats.convergence
        if conv.state != "first-pass" and not done:
            x: dict[str, Any] = {"state": conv.state, "since-ms": ms(conv.since - t.start),
                                 "remaining": conv.remaining, "threshold": conv.threshold,
                                 "dirty-rate": int(conv.dirty_rate),
                                 "bandwidth": int(conv.bandwidth)}
            projected = conv.projected_s()
            if projected is not None:
                x["projected-ms"] = ms(projected)
            info["x-convergence"] = x
        if t.checkpoints and t.downtime_start is not None:
            t0 = t.downtime_start
            info["x-downtime-checkpoints"] = {k: round((v - t0) * 1000, 3)
                                              for k, v in t.checkpoints.items()}
    if s.error_desc is not None and s.status in (S.FAILED, S.CANCELLED, S.CANCELLING):
        info["error-desc"] = s.error_desc
    return info
