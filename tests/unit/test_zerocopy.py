"""MSG_ZEROCOPY's error-queue notifications: parsing with QEMU 10.0's checks and
texts, and the send/finish bookkeeping behind ``dirty-sync-missed-zero-copy``."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.cli.driver import QEMU_BINARY, qemu_available
from livemig.transport import TransportError
from livemig.transport import zerocopy as zc
from livemig.transport.zerocopy import (
    CMSGHDR,
    IP_RECVERR,
    IPV6_RECVERR,
    SO_EE_CODE_ZEROCOPY_COPIED,
    SO_EE_ORIGIN_ZEROCOPY,
    SOCK_EXTENDED_ERR,
    SOL_IP,
    SOL_IPV6,
    ZerocopyCompletion,
    ZerocopyTracker,
    parse_errqueue_control,
)

SO_EE_ORIGIN_LOCAL, SO_EE_ORIGIN_ICMP = 1, 2


def control(info: int, data: int, *, code: int = 0, origin: int = SO_EE_ORIGIN_ZEROCOPY,
            ee_errno: int = 0, level: int = SOL_IP, type_: int = IP_RECVERR) -> bytes:
    """What the kernel puts in msg_control: one cmsghdr, one sock_extended_err."""
    err = SOCK_EXTENDED_ERR.pack(ee_errno, origin, 0, code, 0, info, data)
    return CMSGHDR.pack(CMSGHDR.size + len(err), level, type_) + err


def test_layouts_are_the_kernels() -> None:
    assert CMSGHDR.size == 16              # x86-64: size_t len, int level, int type
    assert SOCK_EXTENDED_ERR.size == 16


@pytest.mark.parametrize(("level", "type_"), [(SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)])
def test_a_range_of_finished_sends(level: int, type_: int) -> None:
    c = parse_errqueue_control(control(7, 11, level=level, type_=type_))
    assert c == ZerocopyCompletion(7, 11, copied=False)
    assert c.count == 5
    copied = parse_errqueue_control(control(0, 0, code=SO_EE_CODE_ZEROCOPY_COPIED))
    assert copied.copied and copied.count == 1


def test_ids_wrap_at_32_bits() -> None:
    assert ZerocopyCompletion(0xFFFFFFFE, 0xFFFFFFFF, False).count == 2


@pytest.mark.parametrize(("ctl", "text"), [
    (control(0, 0, level=SOL_IP, type_=99),
     f"Wrong cmsg in errqueue: {os.strerror(errno.EPROTOTYPE)}"),
    (b"\0" * 8, f"Wrong cmsg in errqueue: {os.strerror(errno.EPROTOTYPE)}"),
    (control(0, 0, ee_errno=111), f"Error on socket: {os.strerror(111)}"),
    # QEMU hands ee_origin to error_setg_errno: strerror of the origin's number
    (control(0, 0, origin=SO_EE_ORIGIN_ICMP), f"Error not from zero copy: {os.strerror(2)}"),
    (control(5, 4), f"Wrong notification bounds: {os.strerror(SO_EE_ORIGIN_ZEROCOPY)}"),
])
def test_bad_notifications_fail_in_qemus_words(ctl: bytes, text: str) -> None:
    with pytest.raises(TransportError) as exc:
        parse_errqueue_control(ctl)
    assert exc.value.desc == text


@pytest.mark.skipif(qemu_available() is None, reason=f"{QEMU_BINARY} is not installed")
def test_texts_are_in_qemus_binary() -> None:
    with open(qemu_available() or "", "rb") as f:
        binary = f.read()
    for text in ("Wrong cmsg in errqueue", "Error not from zero copy", "Unable to read errqueue",
                 "Wrong notification bounds", "Error on socket", zc.CANNOT_LOCK,
                 zc.FEATURE_NOT_DETECTED, zc.FEATURE_NOT_AVAILABLE):
        assert text.encode() + b"\0" in binary, text


def test_nothing_sent_flushes_to_zero() -> None:
    t = ZerocopyTracker()
    assert t.pending == 0 and t.flush_result() == 0


def test_held_buffers_go_when_their_sends_finish() -> None:
    t = ZerocopyTracker()
    a, b = object(), object()
    t.sent()
    t.hold(a)
    t.sent()
    t.sent()
    t.hold(b)
    assert [k for _, k in t._kept] == [a, b]
    t.completed(ZerocopyCompletion(0, 0, copied=True))
    assert [k for _, k in t._kept] == [b]          # a needed only the first send
    t.completed(ZerocopyCompletion(1, 1, copied=True))
    assert [k for _, k in t._kept] == [b] and t.pending == 1   # b needs the third too
    t.completed(ZerocopyCompletion(2, 2, copied=True))
    assert not t._kept and t.pending == 0
    assert t.flush_result() == 1           # every send copied: QEMU counts a missed sync
    assert t.flush_result() == 0           # and a new period begins


def test_more_finished_than_sent_is_refused() -> None:
    t = ZerocopyTracker()
    t.sent()
    with pytest.raises(TransportError, match="^Wrong notification bounds"):
        t.completed(ZerocopyCompletion(0, 1, copied=False))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=30),
       st.data())
def test_flush_result_is_one_only_when_every_send_was_copied(rounds, data) -> None:
    """Sends in order, completions as the kernel gives them (consecutive ranges,
    merged arbitrarily): everything finishes, and the flush says 1 exactly when
    no range was really zero-copy."""
    t = ZerocopyTracker()
    nsent = sum(n for n, _ in rounds)
    for n, _ in rounds:
        for _ in range(n):
            t.sent(keep=object())
    lo, any_real = 0, False
    copied_of = [c for n, c in rounds for _ in range(n)]
    while lo < nsent:
        hi = data.draw(st.integers(lo, nsent - 1))
        # the kernel marks a merged range by its first notification's code
        copied = copied_of[lo]
        any_real |= not copied
        t.completed(ZerocopyCompletion(lo, hi, copied))
        lo = hi + 1
    assert t.pending == 0 and not t._kept
    assert t.flush_result() == (0 if any_real else 1)
