"""MigrationStatus and its transitions, as one table (h11's rule 1).

Names and order are QEMU 10.0's (``qapi/migration.json``). Every status
change on either side goes through :class:`StatusMachine`, which refuses an
illegal transition and tells the caller whether a ``MIGRATION`` event is due.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livemig.qapi.capabilities import Capabilities


class MigrationStatus(StrEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus
_DONE = (S.COMPLETED, S.FAILED, S.CANCELLED)

# Source transitions; the destination uses the subset it reaches.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING, S.CANCELLED}),
    S.ACTIVE: frozenset({S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED, S.FAILED, S.CANCELLING,
                         S.POSTCOPY_ACTIVE}),
    # postcopy (migration/postcopy.py): once the destination runs the guest there
    # is no going back to the source; without recovery a failure is final.
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED}),
    # recovery: a broken channel pauses; migrate resume=true / migrate-recover
    # set up a new one, the handshake (RECV_BITMAP, POSTCOPY_RESUME) resumes.
    # (QEMU's destination goes from paused to recover directly, at the accept.)
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER_SETUP: frozenset({S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.POSTCOPY_ACTIVE}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}

# migration_is_running() in QEMU (the subset livemig reaches).
RUNNING = frozenset({S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.CANCELLING,
                     S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
                     S.POSTCOPY_RECOVER})


class IllegalTransition(Exception):
    pass


class StatusMachine:
    """Thread-safe holder of one side's status with compare-and-swap changes."""

    def __init__(self) -> None:
        self._status = S.NONE
        self._cond = threading.Condition()

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def set(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """QEMU's migrate_set_state: change only if still ``old``; True if changed."""
        with self._cond:
            if self._status is not old:
                return False
            if new not in TRANSITIONS.get(old, frozenset()):
                raise IllegalTransition(f"migration status '{old.value}' -> '{new.value}'")
            self._status = new
            self._cond.notify_all()
            return True

    def force(self, new: MigrationStatus) -> MigrationStatus:
        """Move to ``new`` from wherever we are if the table allows; return the old status."""
        with self._cond:
            old = self._status
            if new not in TRANSITIONS.get(old, frozenset()):
                raise IllegalTransition(f"migration status '{old.value}' -> '{new.value}'")
            self._status = new
            self._cond.notify_all()
            return old

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._status), timeout)

    def is_running(self) -> bool:
        return self._status in RUNNING

    def is_done(self) -> bool:
        return self._status in _DONE


class AnnouncesStatus:
    """Mixin for the two sides (``sm``, ``caps``, ``emit`` attributes): every
    status change is a ``MIGRATION`` event when the ``events`` capability is on
    (QEMU's migrate_set_state with migrate_generate_event)."""

    sm: StatusMachine
    caps: Capabilities
    emit: Callable[[str, dict | None], None]

    @property
    def status(self) -> MigrationStatus:
        return self.sm.status

    def _set(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        if self.sm.set(old, new):
            if self.caps.events:
                self.emit("MIGRATION", {"status": new.value})
            return True
        return False
