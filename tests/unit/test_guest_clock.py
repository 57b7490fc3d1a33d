"""The guest-visible downtime method, sans-IO: ticks in, gaps out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.cli.guest_clock import TickLog, guest_gap


def log_of(*chunks: tuple[bytes, float]) -> TickLog:
    log = TickLog()
    for data, t in chunks:
        log.feed(data, t)
    return log


def test_ticks_are_stamped_with_their_read_time_and_markers_kept():
    log = log_of((b"A...", 1.0), (b"..B.", 2.0))
    assert list(log.times) == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert bytes(log.other) == b"AB" and log.bytes == 8


def test_guest_gap_is_last_source_tick_to_first_destination_tick():
    src = log_of((b"...", 1.0), (b"..", 1.010), (b".", 1.020))
    dst = log_of((b"..", 1.350), (b"...", 1.360))
    assert guest_gap(src, dst) == pytest.approx(0.330)


def test_no_gap_without_ticks():
    assert guest_gap(TickLog(), log_of((b".", 1.0))) is None
    assert guest_gap(log_of((b".", 1.0)), TickLog()) is None


def test_longest_gap_finds_a_stop_cont_pause():
    times = [1.0 + i * 0.001 for i in range(100)] + [1.5 + i * 0.001 for i in range(100)]
    log = TickLog()
    for t in times:
        log.feed(b".", t)
    gap = log.longest_gap(1.0, 2.0)
    assert gap is not None and gap[1] - gap[0] == pytest.approx(0.5 - 0.099)
    assert log.rate(1.0, 1.0995) == pytest.approx(1000, rel=0.01)


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=50),
       st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=50))
def test_gap_never_negative_and_bounded_by_the_logs(a, b):
    src, dst = TickLog(), TickLog()
    for t in sorted(a):
        src.feed(b".", t)
    for t in sorted(b):
        dst.feed(b".", t)
    gap = guest_gap(src, dst)
    if gap is None:
        assert min(a) > min(b)          # the destination ticked before any source tick
    else:
        assert 0 <= gap <= min(b) - min(a)
