"""MigrationStatus transitions: one table, illegal moves refused."""

import pytest

from livemig.migration.status import RUNNING, IllegalTransition, StatusMachine
from livemig.migration.status import MigrationStatus as S


def test_qemu_order_has_15_states():
    assert [s.value for s in S][:5] == ["none", "setup", "cancelling", "cancelled", "active"]
    assert len(S) == 15


def test_happy_path_and_cas():
    sm = StatusMachine()
    assert sm.set(S.NONE, S.SETUP)
    assert not sm.set(S.NONE, S.SETUP)          # not in NONE any more
    assert sm.set(S.SETUP, S.ACTIVE)
    assert sm.set(S.ACTIVE, S.DEVICE)
    assert sm.set(S.DEVICE, S.COMPLETED)
    assert sm.is_done() and not sm.is_running()


def test_illegal_transition_raises():
    sm = StatusMachine()
    with pytest.raises(IllegalTransition):
        sm.set(S.NONE, S.COMPLETED)


def test_cancelling_only_ends_cancelled():
    sm = StatusMachine()
    sm.set(S.NONE, S.SETUP)
    sm.set(S.SETUP, S.CANCELLING)
    with pytest.raises(IllegalTransition):
        sm.set(S.CANCELLING, S.FAILED)
    assert sm.set(S.CANCELLING, S.CANCELLED)


def test_running_set_matches_qemu_precopy_subset():
    assert RUNNING == {S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.CANCELLING,
                       S.POSTCOPY_ACTIVE}
