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
                       S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
                       S.POSTCOPY_RECOVER}


def test_postcopy_pauses_and_recovers_but_never_goes_back_to_precopy():
    sm = StatusMachine()
    for old, new in ((S.NONE, S.SETUP), (S.SETUP, S.ACTIVE), (S.ACTIVE, S.POSTCOPY_ACTIVE),
                     (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
                     (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP),
                     (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER),
                     (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)):
        assert sm.set(old, new)
    for bad in (S.ACTIVE, S.DEVICE, S.CANCELLING):
        with pytest.raises(IllegalTransition):
            sm.set(S.POSTCOPY_ACTIVE, bad)
    assert sm.set(S.POSTCOPY_ACTIVE, S.COMPLETED)
