"""The iteration policy in virtual time: the real loop
(``policy.migration_iterate_until_complete``) drives a model of a migration
whose clock only moves when the model says so (sending, syncing, waiting).
Nothing here sleeps or races."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.migration import policy, switchover


class Horizon(Exception):
    """The model ran past its time limit without completing."""


@dataclass
class Model:
    """A guest dirtying ``dirty_rate`` B/s and a link moving ``bandwidth`` B/s.

    Pending bytes are what the last sync found and is not yet sent; pages
    dirtied since are invisible until the next sync, as with a dirty log."""

    ram: int = 512 << 20
    bandwidth: float = 1e9
    dirty_rate: float = 0.0
    downtime_limit_ms: int = 300
    max_bandwidth: int = 0              # bytes/s, 0 = unlimited
    ack_users: int = 0
    ack_at: float | None = None         # when the destination's ACK arrives
    sync_cost: float = 0.002
    horizon: float = 60.0
    t: float = 0.0
    pending: int = 0
    unsynced: float = 0.0
    threshold: int = 0
    window_bytes: int = 0
    sent_total: int = 0
    completed_at: float | None = None
    postcopy_at: float | None = None    # when migrate-start-postcopy is asked
    must_precopy: int = 0               # pending that postcopy cannot move
    postcopy_started_at: float | None = None
    pending_at_completion: int | None = None
    passes: int = 0
    syncs: int = 0
    iterations: int = 0
    waits: list[tuple[float, float]] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    stall_timeout_s: float = 0.0
    convergence: policy.Convergence = policy.Convergence()
    auto_converge: policy.ThrottleParams | None = None
    throttle: policy.ThrottleState = policy.ThrottleState()
    throttles: list[tuple[float, int]] = field(default_factory=list)
    period_t0: float = 0.0
    period_new: int = 0
    period_sent0: int = 0
    failed: str | None = None
    failed_at: float | None = None

    def __post_init__(self) -> None:
        self.pending = self.ram          # the first pass sends everything

    # -- the model's physics ----------------------------------------------------------
    def _advance(self, dt: float) -> None:
        self.t += dt
        rate = self.dirty_rate * (1 - self.throttle.pct / 100)
        self.unsynced = min(self.ram, self.unsynced + rate * dt)

    def _acked(self) -> bool:
        return self.ack_at is not None and self.t >= self.ack_at

    def _budget_left(self) -> int | None:
        if not self.max_bandwidth:
            return None
        return max(0, self.max_bandwidth // 10 - self.window_bytes)

    # -- IterationEngine ----------------------------------------------------------------
    def now(self) -> float:
        return self.t

    def check(self) -> None:
        if self.t > self.horizon:
            raise Horizon()

    def iteration_stats(self, window_start: float, pending: int | None = None
                        ) -> policy.IterationStats:
        left = self._budget_left()
        return policy.IterationStats(
            now=self.t, window_start=window_start,
            pending=self.pending if pending is None else pending,
            pending_exact=pending is not None, threshold=self.threshold,
            can_switchover=switchover.can_switchover(
                switchover_ack=self.ack_users > 0, ack_users=self.ack_users,
                vm_running=True, acked=self._acked()),
            rate_exceeded=left is not None and left == 0,
            convergence=self.convergence, stall_timeout_s=self.stall_timeout_s,
            start_postcopy=self.postcopy_at is not None and self.t >= self.postcopy_at,
            must_precopy=self.must_precopy)

    def pending_exact(self) -> int:
        self.syncs += 1
        self._advance(self.sync_cost)
        new = min(self.ram - self.pending, int(self.unsynced))
        self.pending += new
        self.unsynced = 0.0
        self.period_new += new
        if self.auto_converge is not None and self.t - self.period_t0 >= 1.0:
            self.throttle = policy.migration_trigger_throttle(
                self.throttle, dirty_bytes=self.period_new,
                xfer_bytes=self.sent_total - self.period_sent0, p=self.auto_converge)
            self.throttles.append((self.t, self.throttle.pct))
            self.period_t0, self.period_new, self.period_sent0 = self.t, 0, self.sent_total
        self.convergence = policy.convergence_update(
            self.convergence, now=self.t, remaining=self.pending, dirty_rate=self.dirty_rate,
            bandwidth=self.bandwidth, threshold=self.threshold)
        return self.pending

    def iterate(self) -> None:
        """One round: at most 50 ms of sending (QEMU's MAX_WAIT), within the budget."""
        self.iterations += 1
        n = min(self.pending, int(self.bandwidth * 0.05))
        left = self._budget_left()
        if left is not None:
            n = min(n, left)
        self.pending -= n
        self.window_bytes += n
        self.sent_total += n
        self._advance(n / self.bandwidth)

    def complete(self) -> None:
        self.completed_at = self.t
        self.pending_at_completion = self.pending

    def fail(self, desc: str) -> None:
        self.failed, self.failed_at = desc, self.t

    def postcopy_start(self) -> None:
        self.postcopy_started_at = self.t

    def pass_done(self) -> None:
        self.passes += 1
        if self.passes > 1_000_000:
            raise AssertionError("the loop spins without time passing")

    def close_window(self, window_start: float) -> float:
        ms = (self.t - window_start) * 1000
        w = switchover.close_window(self.window_bytes, 0, ms)
        self.threshold = switchover.threshold_size(w.bandwidth_bytes_per_ms,
                                                   self.downtime_limit_ms)
        self.windows.append(self.window_bytes)
        self.window_bytes = 0
        return self.t

    def wait(self, seconds: float) -> None:
        self.waits.append((self.t, seconds))
        end = self.t + seconds
        if self.ack_at is not None and self.t < self.ack_at <= end:
            end = self.ack_at                 # the ACK wakes the migration thread
        self._advance(end - self.t)


def run(model: Model) -> Model:
    policy.migration_iterate_until_complete(model)
    return model


# -- the loop in virtual time --------------------------------------------------------

def test_converges_when_the_link_outruns_the_guest():
    m = run(Model(dirty_rate=200e6))
    assert m.completed_at is not None and m.completed_at < 5
    assert m.pending_at_completion is not None
    assert m.pending_at_completion < m.threshold
    # The threshold is what the link moves within downtime-limit.
    assert m.threshold == pytest.approx(1e9 * 0.3, rel=0.05)


def test_never_completes_when_the_guest_outruns_the_link():
    m = Model(ram=2 << 30, bandwidth=1e8, dirty_rate=5e8, horizon=30)
    with pytest.raises(Horizon):
        run(m)
    assert m.completed_at is None
    assert m.syncs == 0 or m.pending >= m.threshold


def test_idle_guest_completes_after_one_full_pass():
    m = run(Model(ram=64 << 20))
    assert m.completed_at is not None
    assert m.sent_total == 64 << 20
    assert m.pending_at_completion == 0


def test_a_pass_that_sent_nothing_completes_at_once():
    """Nothing pending: the first pass syncs, finds nothing and completes
    without an iteration."""
    m = run(Model(ram=0))
    assert m.completed_at == pytest.approx(m.sync_cost)
    assert m.iterations == 0 and m.syncs == 1


def test_waits_for_the_switchover_ack_without_spinning():
    m = run(Model(ram=64 << 20, dirty_rate=1e6, ack_users=1, ack_at=3.0))
    assert m.completed_at is not None
    # Completion follows the ACK, within one bounded wait (<= 50 ms) and a pass.
    assert 3.0 <= m.completed_at < 3.0 + 0.05 + 0.01
    ack_waits = [s for t, s in m.waits if t < 3.0]
    assert ack_waits and all(0.005 <= s <= 0.05 for s in ack_waits)
    # About 3 s of waiting in steps of >= 5 ms: hundreds of passes, not QEMU's 165,000.
    assert m.passes < 3.0 / 0.005 + 100


def test_no_ack_needed_when_no_device_uses_it():
    m = run(Model(ram=64 << 20, ack_users=0, ack_at=None))
    assert m.completed_at is not None and m.completed_at < 1


def test_rate_limit_holds_each_window_to_its_budget():
    limit = 100 << 20                      # 100 MiB/s -> 10 MiB per 100 ms window
    m = run(Model(ram=256 << 20, max_bandwidth=limit))
    assert m.completed_at is not None
    full = m.windows[:-1]
    assert full and all(b <= limit // 10 for b in full)
    # What went before the switchover went at 100 MiB/s, not at the link's 1 GB/s;
    # the threshold is the measured (limited) rate times downtime-limit: ~30 MiB.
    assert m.threshold == pytest.approx(limit * 0.3, rel=0.05)
    precopy = (256 << 20) - m.pending_at_completion
    assert m.completed_at >= precopy / limit - 0.1
    assert any(s > 0 for _, s in m.waits)


# -- the decision functions --------------------------------------------------------

def stats(**kw) -> policy.IterationStats:
    base = dict(now=0.0, window_start=0.0, pending=10, pending_exact=False, threshold=100,
                can_switchover=True, rate_exceeded=False)
    base.update(kw)
    return policy.IterationStats(**base)  # type: ignore[arg-type]


def test_sync_only_near_the_threshold():
    assert policy.migration_iteration_run(stats(pending=1000)) == policy.Iterate()
    assert policy.migration_iteration_run(stats(pending=100)) == policy.Sync()
    assert policy.migration_iteration_run(stats(pending=50, pending_exact=True)) == \
        policy.Complete()


def test_rate_exceeded_sends_nothing():
    assert policy.migration_iteration_run(stats(pending=1000, rate_exceeded=True)) == \
        policy.Idle()


def test_pass_end_closes_the_window_then_waits():
    assert policy.migration_rate_limit(stats(now=0.1), waited_for_ack=True) == \
        policy.CloseWindow()
    assert policy.migration_rate_limit(stats(now=0.04, rate_exceeded=True),
                                       waited_for_ack=False) == \
        policy.Wait(pytest.approx(0.06), "rate-limit")
    assert policy.migration_rate_limit(stats(now=0.04), waited_for_ack=True) == \
        policy.Wait(0.05, "switchover-ack")
    assert policy.migration_rate_limit(stats(now=0.04), waited_for_ack=False) is None


@given(pending=st.integers(0, 1 << 40), threshold=st.integers(0, 1 << 40),
       exact=st.booleans(), can=st.booleans(), rate=st.booleans())
def test_complete_only_when_it_fits_after_a_sync(pending, threshold, exact, can, rate):
    action = policy.migration_iteration_run(stats(
        pending=pending, threshold=threshold, pending_exact=exact, can_switchover=can,
        rate_exceeded=rate))
    if isinstance(action, policy.Complete):
        assert exact and can and (pending == 0 or pending < threshold)
    if isinstance(action, policy.Sync):
        assert not exact and pending <= threshold
    if isinstance(action, policy.Iterate):
        assert not rate


# -- convergence and stalls ------------------------------------------------------------

def test_a_stall_fails_after_the_timeout_with_its_cause():
    """The guest outruns the link: after the first pass each sync finds the same
    dirty set; two syncs and 2 s without a new low is a stall, and the stall
    fails once it lasted x-stall-timeout."""
    m = run(Model(ram=512 << 20, bandwidth=2e8, dirty_rate=8e8, stall_timeout_s=1.5,
                  horizon=120))
    assert m.completed_at is None and m.failed is not None and m.failed_at is not None
    c = m.convergence
    assert c.state == "stalled"
    assert c.since - c.low_at >= policy.STALL_AFTER_S
    assert c.since + 1.5 <= m.failed_at < c.since + 1.5 + 0.2
    assert "faster than the migration sends it" in m.failed
    assert "800 MB/s" in m.failed and "200 MB/s" in m.failed
    assert "auto-converge" in m.failed


def test_no_timeout_no_failure():
    m = Model(ram=512 << 20, bandwidth=2e8, dirty_rate=8e8, horizon=20)
    with pytest.raises(Horizon):
        run(m)
    assert m.failed is None and m.convergence.state == "stalled"


def test_a_converging_migration_never_stalls():
    m = run(Model(ram=2 << 30, bandwidth=1e9, dirty_rate=6e8, stall_timeout_s=0.5))
    assert m.completed_at is not None and m.failed is None
    assert m.convergence.state == "converging"


def test_convergence_update_rules():
    c = policy.convergence_update(policy.Convergence(), now=1.0, remaining=100 << 20,
                                  dirty_rate=0, bandwidth=1e8, threshold=10 << 20)
    assert (c.state, c.since, c.low, c.low_at) == ("converging", 1.0, 100 << 20, 1.0)
    # 3% lower is no new low; two such syncs 2 s after the low: stalled.
    c = policy.convergence_update(c, now=2.0, remaining=97 << 20, dirty_rate=1e8,
                                  bandwidth=1e8, threshold=10 << 20)
    assert c.state == "converging" and c.low == 100 << 20
    c = policy.convergence_update(c, now=3.5, remaining=98 << 20, dirty_rate=1e8,
                                  bandwidth=1e8, threshold=10 << 20)
    assert (c.state, c.since, c.low_at) == ("stalled", 3.5, 1.0)
    assert c.projected_s() is None
    # A real new low ends the stall.
    c = policy.convergence_update(c, now=4.0, remaining=50 << 20, dirty_rate=5e7,
                                  bandwidth=1e8, threshold=10 << 20)
    assert (c.state, c.since) == ("converging", 4.0)
    assert c.projected_s() == pytest.approx((40 << 20) / 5e7)


def test_stall_verdict_names_a_high_remaining_when_rates_are_fine():
    c = policy.Convergence("stalled", 10.0, 300 << 20, 7.0, 3, 300 << 20, 1e8, 5e8, 50 << 20)
    assert policy.stall_verdict(c, 10.5, 1.0) is None
    text = policy.stall_verdict(c, 11.0, 1.0)
    assert text is not None and "300.0 MiB remain after each pass" in text
    assert "above the 50.0 MiB that fit" in text
    assert "no progress for 4000 ms" in text
    assert policy.stall_verdict(c, 100.0, 0.0) is None        # x-stall-timeout 0: off


# -- auto-converge -----------------------------------------------------------------------

QEMU_DEFAULT_THROTTLE = policy.ThrottleParams()


def test_throttle_needs_two_high_periods_then_jumps_to_what_the_rates_need():
    p = QEMU_DEFAULT_THROTTLE
    t = policy.migration_trigger_throttle(policy.ThrottleState(), dirty_bytes=1000,
                                          xfer_bytes=100, p=p)
    assert t == policy.ThrottleState(0, 1)           # once: not yet
    t = policy.migration_trigger_throttle(t, dirty_bytes=1000, xfer_bytes=100, p=p)
    # 1000 dirtied against 50 allowed (50% of 100 sent): the guest may run 5%.
    assert t == policy.ThrottleState(95, 0)
    low = policy.migration_trigger_throttle(policy.ThrottleState(0, 1), dirty_bytes=60,
                                            xfer_bytes=100, p=p)
    assert low.pct == 20                              # cpu-throttle-initial is the floor


def test_throttle_steps_at_least_the_increment_and_stops_at_the_maximum():
    p = policy.ThrottleParams(maximum=80)
    assert policy.mig_throttle_guest_down(20, 52, 50, p) == 30     # QEMU's step
    assert policy.mig_throttle_guest_down(20, 60, 50, p) == 34     # what the rates need
    assert policy.mig_throttle_guest_down(20, 1000, 50, p) == 80   # capped
    tail = policy.ThrottleParams(tailslow=True)
    # tailslow: a step toward the ideal, never more than the increment (QEMU's rule).
    assert policy.mig_throttle_guest_down(50, 55, 50, tail) == 55
    assert policy.mig_throttle_guest_down(50, 1000, 50, tail) == 60


def test_auto_converge_completes_where_plain_precopy_stalls():
    stalled = Model(ram=1 << 30, bandwidth=2e8, dirty_rate=1e9, horizon=30)
    with pytest.raises(Horizon):
        run(stalled)
    m = run(Model(ram=1 << 30, bandwidth=2e8, dirty_rate=1e9, horizon=120,
                  auto_converge=QEMU_DEFAULT_THROTTLE))
    assert m.completed_at is not None
    assert m.throttles and max(pct for _, pct in m.throttles) <= 99
    assert m.pending_at_completion is not None
    assert m.pending_at_completion < m.threshold


# -- the downtime contract ------------------------------------------------------------------

def test_fixed_costs_over_the_limit_never_complete_and_wait_between_passes():
    s = stats(pending=0, pending_exact=True, threshold=0, fits=False)
    assert policy.migration_iteration_run(s) == policy.Iterate()
    assert policy.held_back(s) == "downtime-contract"
    assert policy.migration_rate_limit(stats(now=0.04), waited_for_ack="downtime-contract") \
        == policy.Wait(0.05, "downtime-contract")


def test_fixed_costs_over_the_limit_are_a_stall_with_that_cause():
    c = policy.convergence_update(policy.Convergence(), now=1.0, remaining=0, dirty_rate=0,
                                  bandwidth=1e9, threshold=0, fixed_ms=400, limit_ms=300)
    assert c.state == "stalled" and not c.fits
    text = policy.stall_verdict(c, 2.0, 0.5)
    assert text is not None and "needs 400 ms" in text and "downtime-limit 300 ms" in text
    assert "switchover-ack" in text


# -- postcopy ----------------------------------------------------------------------

def test_postcopy_finishes_a_migration_precopy_cannot():
    """A guest that outruns the link: migrate-start-postcopy at 2 s switches
    within one pass (RAM is what postcopy moves: nothing must go precopy)."""
    m = run(Model(ram=2 << 30, bandwidth=1e8, dirty_rate=5e8, postcopy_at=2.0))
    assert m.completed_at is None
    assert m.postcopy_started_at is not None
    assert 2.0 <= m.postcopy_started_at < 2.0 + 0.2


def test_switchover_ack_gates_the_start_of_postcopy():
    """QEMU's rule: postcopy starts only when it may switch over; the ACK at 3 s."""
    m = run(Model(ram=2 << 30, bandwidth=1e8, dirty_rate=5e8, postcopy_at=1.0,
                  ack_users=1, ack_at=3.0))
    assert m.postcopy_started_at is not None
    assert 3.0 <= m.postcopy_started_at < 3.0 + 0.2


def test_postcopy_waits_while_precopy_only_state_is_over_the_threshold():
    assert policy.migration_iteration_run(
        stats(pending=1000, start_postcopy=True, must_precopy=500)) == policy.Iterate()
    assert policy.migration_iteration_run(
        stats(pending=1000, start_postcopy=True, must_precopy=50)) == policy.StartPostcopy()
    assert policy.migration_iteration_run(
        stats(pending=1000, start_postcopy=True, can_switchover=False)) == policy.Iterate()
    # What fits completes precopy, asked or not (QEMU checks completion first).
    assert policy.migration_iteration_run(
        stats(pending=50, pending_exact=True, start_postcopy=True)) == policy.Complete()
