"""VM run states (QEMU's ``RunState``) and who may go where.

Only the states livemig reaches are listed; names are QEMU's, as
``query-status`` reports them.
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"

    @property
    def running(self) -> bool:
        return self is RunState.RUNNING


# Transitions as data (h11's rule 1): from-state -> allowed to-states.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PRELAUNCH: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE,
                                   RunState.INMIGRATE, RunState.SHUTDOWN, RunState.PAUSED}),
    RunState.INMIGRATE: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.SHUTDOWN,
                                   RunState.FINISH_MIGRATE, RunState.PRELAUNCH}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.FINISH_MIGRATE, RunState.SHUTDOWN}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE, RunState.SHUTDOWN,
                                RunState.POSTMIGRATE}),
    RunState.FINISH_MIGRATE: frozenset({RunState.RUNNING, RunState.PAUSED,
                                        RunState.POSTMIGRATE, RunState.SHUTDOWN,
                                        RunState.PRELAUNCH}),
    RunState.POSTMIGRATE: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE,
                                     RunState.SHUTDOWN, RunState.PAUSED}),
    RunState.SHUTDOWN: frozenset(),
}


class RunStateError(Exception):
    pass


def check_transition(old: RunState, new: RunState) -> None:
    if old is not new and new not in TRANSITIONS[old]:
        raise RunStateError(f"invalid runstate transition: '{old.value}' -> '{new.value}'")
