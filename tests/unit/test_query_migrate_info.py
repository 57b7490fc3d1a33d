"""``query-migrate`` on the source, rendered from a snapshot: no VM, no thread."""

from __future__ import annotations

from livemig.migration.info import (
    RamFigures,
    SourceSnapshot,
    SourceStats,
    SourceTimes,
    query_migrate_info,
)
from livemig.migration.status import MigrationStatus as S

RAM = RamFigures(duplicate=10, normal=100, precopy_pages=90, downtime_pages=10,
                 dirty_sync_count=3, dirty_pages_rate=1234, remaining=8192, multifd_bytes=0)


def snap(status: S, **kw) -> SourceSnapshot:
    times = kw.pop("times", SourceTimes(start=10.0, setup_done=10.05))
    stats = kw.pop("stats", SourceStats(times=times, expected_downtime_ms=42, mbps=812.345,
                                        pages_per_second=1000.7))
    base = dict(status=status, now=12.0, times=times, stats=stats, ram=RAM,
                ram_total=512 << 20, transferred=999, switchover_ack=False, ack_users=0,
                acked=False, error_desc=None)
    base.update(kw)
    return SourceSnapshot(**base)  # type: ignore[arg-type]


def test_no_migration_is_empty():
    assert query_migrate_info(snap(S.NONE)) == {}


def test_active_shows_qemus_members_in_qemus_order():
    info = query_migrate_info(snap(S.ACTIVE))
    assert list(info) == ["status", "total-time", "expected-downtime", "setup-time", "ram"]
    assert info["total-time"] == 2000 and info["setup-time"] == 50
    assert info["expected-downtime"] == 42
    ram = info["ram"]
    assert ram["remaining"] == 8192 and ram["normal-bytes"] == 100 * 4096
    assert ram["precopy-bytes"] == 90 * 4096 and ram["downtime-bytes"] == 10 * 4096
    assert ram["mbps"] == 812.35 and ram["pages-per-second"] == 1000
    assert ram["dirty-pages-rate"] == 1234


def test_completed_shows_downtime_and_nothing_remaining():
    times = SourceTimes(start=10.0, setup_done=10.05, end=11.5, downtime_start=11.4,
                        checkpoints={"src-downtime-start": 11.4, "src-downtime-end": 11.5})
    stats = SourceStats(times=times, downtime_ms=100)
    info = query_migrate_info(snap(S.COMPLETED, times=times, stats=stats))
    assert "expected-downtime" not in info
    assert info["downtime"] == 100 and info["total-time"] == 1500
    assert info["ram"]["remaining"] == 0 and info["ram"]["dirty-pages-rate"] == 0
    assert info["x-downtime-checkpoints"] == {"src-downtime-start": 0.0,
                                              "src-downtime-end": 100.0}


def test_switchover_ack_waiting_then_acked():
    waiting = query_migrate_info(snap(S.ACTIVE, switchover_ack=True, ack_users=1))
    assert waiting["x-switchover-ack"] == {"users": 1, "acked": False, "waiting": True}
    times = SourceTimes(start=10.0, ack=11.25)
    acked = query_migrate_info(snap(S.ACTIVE, times=times, stats=SourceStats(times=times),
                                    switchover_ack=True, ack_users=1, acked=True))
    assert acked["x-switchover-ack"] == {"users": 1, "acked": True, "ack-time": 1250}


def test_failed_in_setup_shows_only_the_cause():
    info = query_migrate_info(snap(S.FAILED, ram=None, error_desc="Connection refused"))
    assert info == {"status": "failed", "error-desc": "Connection refused"}


def test_completed_shows_the_prediction_it_switched_on_beside_the_measurement():
    from livemig.migration.switchover import downtime_estimate
    times = SourceTimes(start=10.0, setup_done=10.05, end=11.5, downtime_start=11.2)
    est = downtime_estimate(1000.0, 1000, 0, {"ram-load-bytes-per-s": 500_000.0,
                                               "device-load-ms": 200.0}, 3.0)
    stats = SourceStats(times=times, downtime_ms=300, estimate=est,
                        pending_at_switchover=50_000)
    costs = {"measured-device-load-ms": 204.6, "measured-post-load-ms": 1.2,
             "measured-last-byte-to-running-ms": 2.0}
    info = query_migrate_info(snap(S.COMPLETED, times=times, stats=stats, dest_costs=costs))
    x = info["x-downtime-estimate"]
    # 50 kB at the slower of link (1000 B/ms) and load (500 B/ms): 100 ms, + 203 fixed.
    assert x["ram-ms"] == 100 and x["total-ms"] == 303 and x["device-load-ms"] == 200
    assert x["pending-bytes"] == 50_000
    assert x["measured"] == {"total-ms": 300, "ram-bytes": 40960,
                             "destination-device-load-ms": 205,
                             "destination-post-load-ms": 1,
                             "destination-last-byte-to-running-ms": 2}
    # A QEMU destination measures nothing for us: the downtime alone.
    info = query_migrate_info(snap(S.COMPLETED, times=times, stats=stats))
    assert info["x-downtime-estimate"]["measured"] == {"total-ms": 300, "ram-bytes": 40960}
