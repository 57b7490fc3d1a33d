"""The source's handling of postcopy's return-path messages (pure): page
requests checked in QEMU's words and queued, the recovery bitmap and ACK."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.migration.errors import MigrationError
from livemig.migration.postcopy import PostcopySource
from livemig.wire.return_path import RecvBitmap, ReqPages, ResumeAck

pytestmark = pytest.mark.timeout(30)
MIB = 1 << 20


def source() -> PostcopySource:
    return PostcopySource("pc.ram", 64 * MIB)


def test_requests_queue_in_order_and_are_taken_once():
    pc = source()
    pc.on_rp_message(ReqPages(0x5000, 4096, "pc.ram"))
    pc.on_rp_message(ReqPages(0x10000, 3 * 4096))
    assert pc.requests == 2 and pc.wake.is_set()
    assert pc.take().tolist() == [5, 16, 17, 18]
    assert pc.take().size == 0


@pytest.mark.parametrize("ev, text", [
    (ReqPages(0, 4096), "MIG_RP_MSG_REQ_PAGES has no previous block"),
    (ReqPages(0, 4096, "other"), "MIG_RP_MSG_REQ_PAGES has no block 'other'"),
    (ReqPages(0x123, 4096, "pc.ram"),
     "MIG_RP_MSG_REQ_PAGES: Misaligned page request, start: 123 len: 4096"),
    (ReqPages(64 * MIB, 4096, "pc.ram"),
     "MIG_RP_MSG_REQ_PAGES request overrun, start=0x4000000 len=0x1000 blocklen=0x4000000"),
])
def test_bad_requests_fail_in_qemus_words(ev, text):
    with pytest.raises(MigrationError) as exc:
        source().on_rp_message(ev)
    assert exc.value.desc == text


def test_recv_bitmap_is_checked_and_kept():
    pc = source()
    npages = 64 * MIB // 4096
    received = np.zeros(npages, dtype=bool)
    received[::3] = True
    bitmap = np.packbits(received, bitorder="little").tobytes()
    pc.on_rp_message(RecvBitmap("pc.ram", bitmap))
    assert pc.recv_bitmap is not None
    assert np.array_equal(pc.recv_bitmap.received(npages), received)
    with pytest.raises(MigrationError, match="bitmap size mismatch"):
        pc.on_rp_message(RecvBitmap("pc.ram", bitmap[:-8]))
    with pytest.raises(MigrationError, match="ramblock 'x' not found"):
        pc.on_rp_message(RecvBitmap("x", bitmap))


def test_resume_ack_value():
    pc = source()
    with pytest.raises(MigrationError, match="illegal resume_ack value 2"):
        pc.on_rp_message(ResumeAck(2))
    assert not pc.resume_ack.is_set()
    pc.on_rp_message(ResumeAck(1))
    assert pc.resume_ack.is_set()
