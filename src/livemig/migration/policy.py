"""The iteration decision, as a pure policy: a stats snapshot in, one action out.

QEMU's migration_thread runs two steps per pass: ``migration_iteration_run``
(how much is pending; sync the dirty log near the threshold; complete, or
send another round) and ``migration_rate_limit`` (close the 100 ms bandwidth
window, or wait out the rate limit). Here each step is a function of an
immutable :class:`IterationStats`, with the time inside it: the migration
thread (``source.py``) only gathers the snapshot and carries out the
action, so the decision is unit-tested in virtual time (``tests/unit/
test_policy.py``) instead of through real processes and real clocks.

Actions today: :class:`Sync`, :class:`Complete`, :class:`StartPostcopy`
(``migrate-start-postcopy`` was asked, what only precopy can move fits and
switchover is allowed: QEMU's rule, so switchover-ack gates postcopy too),
:class:`Fail` (stalled for ``x-stall-timeout``: :func:`stall_verdict` on the
:class:`Convergence` folded from each sync), :class:`Iterate`, :class:`Idle`
(the window's budget is spent: send nothing), and after a pass
:class:`CloseWindow`, :class:`Wait` (for the rate limit, or for the
destination's switchover ACK) or ``None`` (go on at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from livemig.migration import switchover

WINDOW_SLACK_MS = 1e-3
STALL_AFTER_S = 2.0           # no new low of remaining for this long (and 2 syncs): stalled
NEW_LOW = 0.95                # a new low must be at least 5% under the previous one


@dataclass(frozen=True)
class Convergence:
    """Is the migration getting anywhere? Judged at each dirty-log sync from
    what remained after it (QEMU has no such judgement; KubeVirt builds one
    from outside). Units: bytes, bytes/s, seconds of the engine's clock."""

    state: str = "first-pass"     # first-pass | converging | stalled
    since: float = 0.0            # when this state began
    low: int = 0                  # lowest remaining after a sync
    low_at: float = 0.0           # when that low was reached
    syncs_since_low: int = 0
    remaining: int = 0            # after the last sync
    dirty_rate: float = 0.0       # the guest's, bytes/s
    bandwidth: float = 0.0        # the link's, bytes/s (last window)
    threshold: int = 0
    fixed_ms: float = 0.0         # switchover costs besides RAM (destination devices, RP)
    limit_ms: int = 0             # downtime-limit

    @property
    def fits(self) -> bool:
        return not self.limit_ms or self.fixed_ms < self.limit_ms

    def projected_s(self) -> float | None:
        """Time to reach the threshold at today's rates (None: never)."""
        gain = self.bandwidth - self.dirty_rate
        if gain <= 0:
            return None
        return max(0.0, (self.remaining - self.threshold) / gain)


def convergence_update(c: Convergence, *, now: float, remaining: int, dirty_rate: float,
                       bandwidth: float, threshold: int, fixed_ms: float = 0.0,
                       limit_ms: int = 0) -> Convergence:
    """Fold one sync into the judgement: a new low (5% under the last) is
    progress; two syncs and ``STALL_AFTER_S`` without one is a stall. Syncs
    come once per drain of the dirty set, so a long first pass is no stall.
    Fixed costs at or over the limit are a stall at once: no amount of
    sending makes that switchover fit."""
    over = bool(limit_ms) and fixed_ms >= limit_ms
    if over:
        since = c.since if c.state == "stalled" else now
        return Convergence("stalled", since, min(c.low, remaining) if c.low else remaining,
                           c.low_at or now, c.syncs_since_low + 1, remaining, dirty_rate,
                           bandwidth, threshold, fixed_ms, limit_ms)
    if c.state == "first-pass" or remaining <= c.low * NEW_LOW:
        state, since, low, low_at, syncs = ("converging", c.since if c.state == "converging"
                                            else now, remaining, now, 0)
    else:
        syncs = c.syncs_since_low + 1
        low, low_at = c.low, c.low_at
        if syncs >= 2 and now - c.low_at >= STALL_AFTER_S:
            state, since = "stalled", c.since if c.state == "stalled" else now
        else:
            state, since = c.state, c.since
    return Convergence(state, since, low, low_at, syncs, remaining, dirty_rate, bandwidth,
                       threshold, fixed_ms, limit_ms)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def stall_verdict(c: Convergence, now: float, stall_timeout_s: float) -> str | None:
    """The ``error-desc`` of a migration stalled for ``x-stall-timeout``
    (0: never), naming the cause with its rates and what would help."""
    if not stall_timeout_s or c.state != "stalled" or now - c.since < stall_timeout_s:
        return None
    mb = 1e6
    if not c.fits:
        return (f"Migration cannot converge: after the last byte the destination needs "
                f"{c.fixed_ms:.0f} ms (device load and preparation, return path), more than "
                f"downtime-limit {c.limit_ms} ms; for {(now - c.since) * 1000:.0f} ms "
                f"(x-stall-timeout {stall_timeout_s * 1000:.0f} ms). Enable switchover-ack "
                "(the device then prepares while the guest runs) or raise downtime-limit")
    if c.dirty_rate >= c.bandwidth:
        cause = (f"the guest dirties memory at {c.dirty_rate / mb:.0f} MB/s, faster than "
                 f"the migration sends it ({c.bandwidth / mb:.0f} MB/s)")
    else:
        cause = (f"{_mib(c.remaining)} remain after each pass, above the "
                 f"{_mib(c.threshold)} that fit in downtime-limit at "
                 f"{c.bandwidth / mb:.0f} MB/s (the guest re-dirties "
                 f"{c.dirty_rate / mb:.0f} MB/s of what was sent)")
    return (f"Migration cannot converge: {cause}; no progress for "
            f"{(now - c.low_at) * 1000:.0f} ms (x-stall-timeout {stall_timeout_s * 1000:.0f} "
            "ms). Enable auto-converge or postcopy-ram, or raise downtime-limit or "
            "max-bandwidth")


@dataclass(frozen=True)
class ThrottleParams:
    """QEMU's auto-converge parameters (percentages)."""

    initial: int = 20            # cpu-throttle-initial
    increment: int = 10          # cpu-throttle-increment
    tailslow: bool = False       # cpu-throttle-tailslow
    maximum: int = 99            # max-cpu-throttle
    trigger_threshold: int = 50  # throttle-trigger-threshold


@dataclass(frozen=True)
class ThrottleState:
    pct: int = 0                 # cpu-throttle-percentage
    high_count: int = 0          # periods the guest dirtied too much since the last step


def migration_trigger_throttle(t: ThrottleState, *, dirty_bytes: int, xfer_bytes: int,
                               p: ThrottleParams) -> ThrottleState:
    """One dirty-rate period (>= 1 s) for auto-converge, QEMU's rule: the guest
    dirtied more than ``throttle-trigger-threshold`` % of what was sent, twice
    -> throttle it down (:func:`mig_throttle_guest_down`)."""
    threshold_bytes = xfer_bytes * p.trigger_threshold / 100
    if dirty_bytes <= threshold_bytes:
        return t
    if t.high_count + 1 < 2:
        return ThrottleState(t.pct, t.high_count + 1)
    return ThrottleState(mig_throttle_guest_down(t.pct, dirty_bytes, threshold_bytes, p), 0)


def mig_throttle_guest_down(now: int, dirty_bytes: float, threshold_bytes: float,
                            p: ThrottleParams) -> int:
    """The next throttle. ``needed`` is the throttle at which the guest would
    dirty only ``threshold_bytes`` per period at its measured rate (QEMU's
    ``cpu_ideal``). QEMU steps ``initial`` then ``increment`` at a time and
    uses ``needed`` only to slow the tail; livemig goes straight to what the
    rates say is needed (never less than QEMU's step), so a guest that needs
    90% gets it at the first trigger, not after seven more."""
    cpu_now = 100 - now
    needed = math.ceil(100 - cpu_now * threshold_bytes / dirty_bytes)
    if now == 0:
        new = max(p.initial, needed)
    elif p.tailslow:
        new = now + max(1, min(p.increment, needed - now))
    else:
        new = max(now + p.increment, needed)
    return min(new, p.maximum)


@dataclass(frozen=True)
class IterationStats:
    """What the decision looks at, read once per step. Units: bytes, seconds."""

    now: float                   # the migration thread's clock
    window_start: float          # when the current 100 ms window began
    pending: int                 # bytes the iterable handlers hold
    pending_exact: bool          # ``pending`` is after a dirty-log sync this pass
    threshold: int               # bytes that may remain at switchover
    can_switchover: bool         # switchover.can_switchover() now
    rate_exceeded: bool          # this window's budget is spent
    convergence: Convergence = Convergence()
    stall_timeout_s: float = 0.0  # x-stall-timeout; 0: never fail a stall
    fits: bool = True             # the fixed switchover costs stay under downtime-limit
    start_postcopy: bool = False  # migrate-start-postcopy was asked
    must_precopy: int = 0         # of ``pending``, what postcopy cannot move (not RAM)


@dataclass(frozen=True)
class Sync:
    """Sync the dirty log, then decide again with the exact figure."""


@dataclass(frozen=True)
class Complete:
    """Stop the guest and send what is left (migration_completion)."""


@dataclass(frozen=True)
class StartPostcopy:
    """Stop the guest, send the device state, run it on the destination; RAM
    follows on demand (postcopy_start)."""


@dataclass(frozen=True)
class Iterate:
    """Send one round (qemu_savevm_state_iterate)."""


@dataclass(frozen=True)
class Idle:
    """Nothing may be sent in this window: skip to the pass's end."""


@dataclass(frozen=True)
class Fail:
    """The migration cannot converge: fail it (the guest keeps running)."""

    desc: str


@dataclass(frozen=True)
class CloseWindow:
    """The window is over: measure bandwidth, recompute the threshold."""


@dataclass(frozen=True)
class Wait:
    """Sleep until woken (ACK, cancel, continue) or ``seconds`` passed."""

    seconds: float
    reason: str                  # "rate-limit" or "switchover-ack"


IterationAction = Sync | Complete | StartPostcopy | Fail | Iterate | Idle
PassEndAction = CloseWindow | Wait | None


def held_back(s: IterationStats) -> str | None:
    """What, besides pending bytes, keeps the switchover back: the destination's
    ACK, or fixed costs over downtime-limit (the downtime contract). Then the
    loop waits between passes instead of spinning."""
    if waiting_for_ack(s):
        return "switchover-ack"
    if not s.fits and s.pending <= s.threshold:
        return "downtime-contract"
    return None


def waiting_for_ack(s: IterationStats) -> bool:
    """Only the destination's ACK holds switchover back."""
    return not s.can_switchover and s.pending < s.threshold


def migration_iteration_run(s: IterationStats) -> IterationAction:
    """One pass's decision (QEMU 10.0's migration_iteration_run).

    The costly exact sync only when the estimate is at or under the
    threshold (QEMU's ``must_precopy <= threshold_size``); completion when
    what is pending fits (or nothing is) and switchover is allowed."""
    if not s.pending_exact and switchover.should_sync_exact(s.pending, s.threshold):
        return Sync()
    if s.fits and switchover.complete_ready(s.pending, s.threshold, s.can_switchover):
        return Complete()
    if s.start_postcopy and s.must_precopy <= s.threshold and s.can_switchover:
        return StartPostcopy()
    verdict = stall_verdict(s.convergence, s.now, s.stall_timeout_s)
    if verdict is not None:
        return Fail(verdict)
    if s.rate_exceeded:
        return Idle()
    return Iterate()


def migration_rate_limit(s: IterationStats, *, waited_for_ack: bool | str | None
                         ) -> PassEndAction:
    """After a pass (QEMU's migration_rate_limit, plus the ACK wait).

    ``waited_for_ack``: the pass began with only the ACK missing (or what
    :func:`held_back` names). Then the
    loop waits for the ACK instead of spinning (QEMU 10.0 ran ~165,000
    passes there), bounded so dirtied pages keep flowing."""
    window_ms = (s.now - s.window_start) * 1000
    # A microsecond short counts as over: otherwise float rounding can leave a
    # wait of 1e-17 s that moves no clock (found by the virtual-time tests).
    if window_ms >= switchover.BUFFER_DELAY_MS - WINDOW_SLACK_MS:
        return CloseWindow()
    left_ms = switchover.BUFFER_DELAY_MS - window_ms
    if s.rate_exceeded:
        return Wait(left_ms / 1000, "rate-limit")
    if waited_for_ack:
        reason = waited_for_ack if isinstance(waited_for_ack, str) else "switchover-ack"
        return Wait(switchover.ack_wait_seconds(left_ms), reason)
    return None


class IterationEngine(Protocol):
    """What :func:`migration_iterate_until_complete` drives: the migration
    thread (``MigrationState``) in production, a model in virtual time in
    the tests. Every method but the stats may block or raise (cancel, a
    failed channel)."""

    def now(self) -> float: ...

    def check(self) -> None:
        """Raise if the migration was cancelled or failed meanwhile."""

    def iteration_stats(self, window_start: float, pending: int | None = None
                        ) -> IterationStats:
        """The snapshot; ``pending`` given: an exact figure from :meth:`pending_exact`."""

    def pending_exact(self) -> int:
        """Sync the dirty log; the bytes pending after it."""

    def iterate(self) -> None:
        """Send one round."""

    def complete(self) -> None:
        """Stop the guest, send the rest, wait for the destination."""

    def postcopy_start(self) -> None:
        """Switch to postcopy and carry it to its end."""

    def fail(self, desc: str) -> None:
        """Give up: the migration fails with ``desc``, the guest runs on."""

    def pass_done(self) -> None:
        """Count a pass."""

    def close_window(self, window_start: float) -> float:
        """Account the window that began at ``window_start``; the next one's start."""

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; an ACK, cancel or continue ends it early."""


def migration_iterate_until_complete(e: IterationEngine) -> None:
    """The precopy loop (QEMU's migration_thread body): each pass asks the
    policy, then does what it said. Returns once :meth:`~IterationEngine.complete` did."""
    window_start = e.now()
    while True:
        e.check()
        s = e.iteration_stats(window_start)
        action = migration_iteration_run(s)
        if isinstance(action, Sync):
            s = e.iteration_stats(window_start, e.pending_exact())
            action = migration_iteration_run(s)
        if isinstance(action, Complete):
            e.complete()
            return
        if isinstance(action, StartPostcopy):
            e.postcopy_start()
            return
        if isinstance(action, Fail):
            e.fail(action.desc)
            return
        waited_for_ack = held_back(s)
        if isinstance(action, Iterate):
            e.iterate()
        e.pass_done()
        end = migration_rate_limit(e.iteration_stats(window_start, s.pending),
                                   waited_for_ack=waited_for_ack)
        if isinstance(end, CloseWindow):
            window_start = e.close_window(window_start)
        elif isinstance(end, Wait):
            e.wait(end.seconds)
