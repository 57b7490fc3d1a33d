"""The switchover decision, as pure functions (the seed's rules)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.migration import switchover as sw


@pytest.mark.parametrize("cap,users,running,acked,expected", [
    (False, 1, True, False, True),    # capability off: never wait
    (True, 0, True, False, True),     # no device uses it
    (True, 1, False, False, True),    # guest stopped: no reason to wait
    (True, 1, True, True, True),      # ACK arrived
    (True, 1, True, False, False),    # the one case that waits
    (True, 3, True, False, False),
])
def test_can_switchover(cap, users, running, acked, expected):
    assert sw.can_switchover(switchover_ack=cap, ack_users=users, vm_running=running,
                             acked=acked) is expected


def test_threshold_is_bandwidth_times_downtime_limit():
    assert sw.threshold_size(1000.0, 300) == 300_000


def test_avail_switchover_bandwidth_replaces_the_estimate():
    # 2,000,000 B/s -> 2000 B/ms, integer division as QEMU does
    assert sw.threshold_size(1.0, 300, 2_000_999) == 2000 * 300


def test_complete_needs_both_threshold_and_can_switchover():
    assert not sw.complete_ready(10, 100, False)
    assert sw.complete_ready(10, 100, True)
    assert not sw.complete_ready(100, 100, True)
    assert sw.complete_ready(0, 0, True)          # first window: only pending == 0


def test_sync_exact_near_the_threshold_as_qemu():
    assert sw.should_sync_exact(99, 100)
    assert sw.should_sync_exact(100, 100)        # QEMU: must_precopy <= threshold_size
    assert not sw.should_sync_exact(101, 100)
    assert sw.should_sync_exact(0, 0)            # first window: pending 0 still syncs


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.booleans())
def test_complete_ready_never_without_can_switchover(pending, threshold, can):
    if not can:
        assert not sw.complete_ready(pending, threshold, can)


def test_close_window_units():
    w = sw.close_window(bytes_in_window=12_500_000, pages_in_window=3000, window_ms=100)
    assert w.bandwidth_bytes_per_ms == 125_000
    assert w.mbps == pytest.approx(1000.0)
    assert w.pages_per_second == 30_000


def test_expected_downtime():
    assert sw.expected_downtime_ms(1_000_000, 1000.0, 300) == 1000
    assert sw.expected_downtime_ms(1_000_000, 0.0, 300) == 300


@given(st.floats(0, 1000))
def test_ack_wait_is_bounded(left_ms):
    assert 0.005 <= sw.ack_wait_seconds(left_ms) <= 0.05


# -- the load-aware estimate (issue 12) ---------------------------------------------------

def test_without_destination_costs_it_is_qemus_estimate():
    est = sw.downtime_estimate(1000.0, 300)
    assert est.basis == "bandwidth" and est.threshold == 300_000 and est.fits
    assert est.predicted_ms(150_000) == 150


def test_the_slower_of_link_and_destination_load_after_fixed_costs():
    est = sw.downtime_estimate(1000.0, 300, costs={"ram-load-bytes-per-s": 500_000.0,
                                                   "device-load-ms": 50.0},
                               return_path_ms=10.0)
    assert est.basis == "destination" and est.rate_bytes_per_ms == 500.0
    assert est.fixed_ms == 60.0 and est.threshold == 500 * 240
    assert est.predicted_ms(500 * 240) == 300
    parts = est.parts(100_000)
    assert parts["ram-ms"] == 200 and parts["total-ms"] == 260
    assert parts["load-bytes-per-s"] == 500_000 and parts["device-load-ms"] == 50


def test_a_device_preparing_longer_than_the_limit_never_fits():
    est = sw.downtime_estimate(1000.0, 300, costs={"device-load-ms": 400.0})
    assert not est.fits and est.threshold == 0
    assert est.predicted_ms(0) == 400


@given(st.floats(1, 1e7), st.integers(1, 5000), st.floats(1, 1e7), st.floats(0, 3000))
def test_a_switchover_at_the_threshold_is_predicted_within_the_limit(bw, limit, load, dev):
    est = sw.downtime_estimate(bw, limit, costs={"ram-load-bytes-per-s": load * 1000,
                                                 "device-load-ms": dev})
    if est.fits:
        assert est.predicted_ms(est.threshold) <= limit + 1
    else:
        assert est.threshold == 0


def test_the_contract_counts_on_the_rate_the_link_keeps_not_its_last_window():
    from collections import deque

    from livemig.migration.switchover import SUSTAINED_WINDOWS, sustained_rate
    assert sustained_rate([]) == 0.0 and sustained_rate([0.0, 0.0]) == 0.0
    assert sustained_rate([900.0]) == 900.0
    # One burst into an empty send buffer does not set the rate; the 20th percentile does.
    recent = [1000.0, 1100.0, 950.0, 1050.0, 1000.0, 980.0, 1020.0, 990.0, 1010.0, 1800.0]
    assert sustained_rate(recent) == 980.0
    # Only the last second counts, and windows that sent nothing are not rates.
    window = deque([10.0] * 5, maxlen=2 * SUSTAINED_WINDOWS)
    window.extend([0.0] + [500.0] * SUSTAINED_WINDOWS)
    assert sustained_rate(window) == 500.0
