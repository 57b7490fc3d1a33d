"""The receive buffer under both decoders: zero-copy feeding, compaction, growth,
and exact absolute offsets across all of them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.wire import (
    NEED_DATA,
    Blob,
    PayloadKind,
    SectionType,
    StreamDecoder,
    StreamError,
    encode_blob,
    encode_footer,
    encode_section_header,
)
from livemig.wire.buffer import ReceiveBuffer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: streams.py
from streams import preamble  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=50), st.integers(0, 60), st.booleans()),
                max_size=30),
       st.integers(1, 64))
def test_bytes_survive_any_sequence_of_feeds_and_consumes(ops, capacity):
    """Model check: the unread window always equals the model's unread bytes,
    and base + index is the absolute offset."""
    rb = ReceiveBuffer(capacity)
    model = b""  # all bytes ever received
    consumed = 0
    for data, consume, zero_copy in ops:
        if data:
            if zero_copy:
                view = rb.reserve(len(data))
                assert len(view) >= len(data)
                view[:len(data)] = data
                rb.commit(len(data))
            else:
                rb.append(data)
            model += data
        k = min(consume, len(rb))
        rb.start += k
        consumed += k
        assert rb.bytes(rb.start, len(rb)) == model[consumed:]
        assert rb.offset(rb.start) == consumed


def test_commit_checks_the_lent_size_and_zero_means_end_of_data():
    rb = ReceiveBuffer(8)
    view = rb.reserve(4)
    with pytest.raises(ValueError):
        rb.commit(len(view) + 1)
    rb.reserve(1)
    rb.commit(0)
    assert rb.eof
    with pytest.raises(RuntimeError):
        rb.reserve(1)


def test_buffer_grows_for_a_large_item_fed_in_small_pieces():
    blob = bytes(range(256)) * 4096  # 1 MiB
    raw = (preamble("m")
           + encode_section_header(SectionType.SECTION_FULL, 1, "dev", 0, 1)
           + encode_blob(blob) + encode_footer(1)
           + encode_section_header(SectionType.SECTION_FULL, 2, "dev", 0, 1)
           + encode_blob(b"small") + encode_footer(2))
    dec = StreamDecoder({"dev": PayloadKind.BLOB}, buffer_size=4096)
    events = []
    pos = 0
    while pos < len(raw):
        view = dec.get_buffer(1000)
        n = min(len(view), len(raw) - pos, 1000)
        view[:n] = raw[pos:pos + n]
        dec.buffer_updated(n)
        pos += n
        while (ev := dec.next_event()) is not NEED_DATA:
            events.append(ev)
    assert Blob(blob) in events and events[-2] == Blob(b"small")


def test_capacity_returns_to_the_initial_size_after_a_large_item():
    rb = ReceiveBuffer(4096)
    rb.append(bytes(1 << 20))
    assert len(rb.buf) >= 1 << 20
    rb.start = rb.end  # the large item was decoded
    for _ in range(2000):  # small traffic wraps the buffer once
        rb.append(bytes(1000))
        rb.start = rb.end
    assert len(rb.buf) == 4096
    assert rb.offset(rb.start) == (1 << 20) + 2000 * 1000


def test_error_offsets_are_absolute_after_compaction():
    body = b"".join(encode_section_header(SectionType.SECTION_FULL, i, "dev", 0, 1)
                    + encode_blob(bytes(100)) + encode_footer(i) for i in range(200))
    raw = preamble("m") + body
    dec = StreamDecoder({"dev": PayloadKind.BLOB}, buffer_size=256)
    for i in range(0, len(raw), 77):
        dec.receive_data(raw[i:i + 77])
        while dec.next_event() is not NEED_DATA:
            pass
    dec.receive_data(b"\x09")
    with pytest.raises(StreamError) as info:
        dec.next_event()
    assert info.value.offset == len(raw)
    assert info.value.message == "Unknown savevm section type 9"
