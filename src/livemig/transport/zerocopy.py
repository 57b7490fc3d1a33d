"""MSG_ZEROCOPY's completion notifications (sans-IO): QEMU's ``zero-copy-send``.

A ``sendmsg(..., MSG_ZEROCOPY)`` on a socket with ``SO_ZEROCOPY`` set pins the
pages it sends instead of copying them, so they must not be reused until
the kernel says it is done with them: each successful call gets the next
32-bit id, and the kernel queues on the socket's error queue (read with
``recvmsg(MSG_ERRQUEUE)``) one ``sock_extended_err`` per range of finished
ids (``ee_info`` .. ``ee_data``, merged when consecutive), with origin
``SO_EE_ORIGIN_ZEROCOPY`` and code ``SO_EE_CODE_ZEROCOPY_COPIED`` when the
kernel copied after all (always on loopback).

``parse_errqueue_control`` reads one such message's control data with QEMU
10.0's checks and texts (io/channel-socket.c ``qio_channel_socket_flush``);
``ZerocopyTracker`` counts ids sent against ids finished, holds the buffers
each send still needs, and gives QEMU's flush result: 1 when every send
since the last flush was copied (what ``dirty-sync-missed-zero-copy``
counts), else 0.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from livemig.transport.errors import TransportError

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
MSG_ERRQUEUE = 0x2000
MSG_DONTWAIT = 0x40
SOL_IP, IP_RECVERR = 0, 11
SOL_IPV6, IPV6_RECVERR = 41, 25
SO_EE_ORIGIN_NONE = 0
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1

# struct cmsghdr (x86-64: size_t len, int level, int type) and struct
# sock_extended_err (u32 errno, u8 origin, type, code, pad, u32 info, data).
CMSGHDR = struct.Struct("=Qii")
SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
# CMSG_SPACE(sizeof(struct sock_extended_err)) plus room for an offender address.
ERRQUEUE_CONTROL_BYTES = 128

# QEMU 10.0's texts (error_setg_errno: "<text>: <strerror>").
FEATURE_NOT_DETECTED = "Zero copy send feature not detected in host kernel"
FEATURE_NOT_AVAILABLE = "Requested Zero Copy feature is not available"
CANNOT_LOCK = "Process can't lock enough memory for using MSG_ZEROCOPY"


def _qemu_errno_text(text: str, code: int) -> str:
    return f"{text}: {os.strerror(code)}"


@dataclass(frozen=True)
class ZerocopyCompletion:
    """Sends ``first`` .. ``last`` (ids, inclusive, mod 2**32) are finished;
    ``copied``: the kernel copied their data after all."""

    first: int
    last: int
    copied: bool

    @property
    def count(self) -> int:
        return ((self.last - self.first) & 0xFFFFFFFF) + 1


def parse_errqueue_control(control: bytes) -> ZerocopyCompletion:
    """One error-queue message's control data (its first cmsg) as a completion;
    anything else fails as QEMU's flush fails, in its words."""
    if len(control) < CMSGHDR.size + SOCK_EXTENDED_ERR.size:
        raise TransportError(_qemu_errno_text("Wrong cmsg in errqueue", errno.EPROTOTYPE),
                             errno.EPROTOTYPE)
    length, level, type_ = CMSGHDR.unpack_from(control)
    if (level, type_) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)) or \
            length < CMSGHDR.size + SOCK_EXTENDED_ERR.size:
        raise TransportError(_qemu_errno_text("Wrong cmsg in errqueue", errno.EPROTOTYPE),
                             errno.EPROTOTYPE)
    ee_errno, origin, _type, code, _pad, info, data = SOCK_EXTENDED_ERR.unpack_from(
        control, CMSGHDR.size)
    # QEMU hands ee_errno, and then ee_origin, to error_setg_errno: the texts
    # name strerror of those numbers.
    if ee_errno != 0:
        raise TransportError(_qemu_errno_text("Error on socket", ee_errno), ee_errno)
    if origin != SO_EE_ORIGIN_ZEROCOPY:
        raise TransportError(_qemu_errno_text("Error not from zero copy", origin), origin)
    if data < info:
        raise TransportError(_qemu_errno_text("Wrong notification bounds", origin), origin)
    return ZerocopyCompletion(info, data, bool(code & SO_EE_CODE_ZEROCOPY_COPIED))


class ZerocopyTracker:
    """One socket's zero-copy sends: ids queued and finished, the buffers the
    unfinished ones still read, and QEMU's flush result. One thread (the
    channel's writer) uses it."""

    def __init__(self) -> None:
        self.queued = 0          # successful MSG_ZEROCOPY sendmsg calls
        self.finished = 0        # ids the kernel reported done
        self._kept: deque[tuple[int, Any]] = deque()   # (queued after it, buffer)
        self._since_flush = False   # a send finished or queued since the last flush
        self._all_copied = True     # ... and every one of them was copied

    @property
    def pending(self) -> int:
        return self.queued - self.finished

    def sent(self, keep: Any = None) -> None:
        """One more zero-copy send; ``keep`` (any object) is held until it is finished."""
        self.queued += 1
        self._since_flush = True
        if keep is not None:
            self._kept.append((self.queued, keep))

    def hold(self, keep: Any) -> None:
        """Hold ``keep`` until every send queued so far is finished (a buffer
        several sends of one write read)."""
        if self.pending:
            self._kept.append((self.queued, keep))

    def completed(self, c: ZerocopyCompletion) -> None:
        self.finished += c.count
        if self.finished > self.queued:
            raise TransportError(_qemu_errno_text("Wrong notification bounds",
                                                  SO_EE_ORIGIN_ZEROCOPY), SO_EE_ORIGIN_ZEROCOPY)
        if not c.copied:
            self._all_copied = False
        while self._kept and self._kept[0][0] <= self.finished:
            self._kept.popleft()

    def flush_result(self) -> int:
        """After every send finished: QEMU's ``qio_channel_flush`` value (1 when
        there were sends since the last flush and the kernel copied them all,
        else 0), and a new flush period begins."""
        assert not self.pending
        result = 1 if self._since_flush and self._all_copied else 0
        self._since_flush, self._all_copied = False, True
        return result
