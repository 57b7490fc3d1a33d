"""Return path: encoders <-> ReturnPathDecoder, and QEMU 10.0's source-side checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.wire import (
    NEED_DATA,
    Closed,
    MigRpMsg,
    Pong,
    ReturnPathDecoder,
    ReturnPathError,
    Shut,
    SwitchoverAck,
    XError,
    encode_pong,
    encode_rp_message,
    encode_shut,
    encode_switchover_ack,
    encode_x_error,
)
from livemig.wire.return_path import (
    RecvBitmap,
    ReqPages,
    ResumeAck,
    encode_recv_bitmap_message,
    encode_req_pages,
    encode_resume_ack,
)

pytestmark = pytest.mark.timeout(60)


def _bitmap_bytes(bits: list[bool]) -> bytes:
    """Little-endian 64-bit words: bit i of the map is bit i%8 of byte i//8."""
    out = bytearray(-(-len(bits) // 64) * 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)

INTERNAL = "Malformed return path message"


def decode(chunks: list[bytes], *, use_get_buffer: bool = False, **options) -> list[object]:
    dec = ReturnPathDecoder(**options)
    out: list[object] = []
    for chunk in chunks:
        if not chunk:
            continue
        if use_get_buffer:
            view = dec.get_buffer(len(chunk))
            view[:len(chunk)] = chunk
            dec.buffer_updated(len(chunk))
        else:
            dec.receive_data(chunk)
        while (ev := dec.next_event()) is not NEED_DATA:
            out.append(ev)
    dec.buffer_updated(0) if use_get_buffer else dec.receive_data(b"")
    out.append(dec.next_event())
    assert dec.next_event() == Closed()
    return out


u32 = st.integers(0, 2**32 - 1)
messages = st.one_of(
    u32.map(lambda v: (encode_shut(v), Shut(v))),
    u32.map(lambda v: (encode_pong(v), Pong(v))),
    st.just((encode_switchover_ack(), SwitchoverAck())),
    st.text(max_size=100).map(lambda t: (encode_x_error(t), XError(t))),
    st.binary(min_size=12, max_size=12).map(
        lambda p: (encode_rp_message(MigRpMsg.REQ_PAGES, p),
                   ReqPages(int.from_bytes(p[:8], "big"), int.from_bytes(p[8:], "big")))),
    st.tuples(st.integers(0, 2**64 - 1), u32, st.text("abcz.-_", max_size=255)).map(
        lambda a: (encode_req_pages(a[0], a[1], a[2]), ReqPages(a[0], a[1], a[2]))),
    u32.map(lambda v: (encode_resume_ack(v), ResumeAck(v))),
    st.tuples(st.text("abc.", max_size=40), st.lists(st.booleans(), max_size=300)).map(
        lambda a: (encode_recv_bitmap_message(a[0], np.array(a[1], dtype=bool)),
                   RecvBitmap(a[0], _bitmap_bytes(a[1])))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=8), st.data())
def test_round_trip_under_random_chunking(msgs, data):
    raw = b"".join(m for m, _ in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    points = [0, *cuts, len(raw)]
    chunks = [raw[a:b] for a, b in zip(points, points[1:], strict=False)]
    got = decode(chunks, use_get_buffer=data.draw(st.booleans()), buffer_size=16)
    assert got == [ev for _, ev in msgs] + [Closed()]


def test_split_at_every_boundary():
    raw = encode_switchover_ack() + encode_pong(1) + encode_x_error("boom") + encode_shut(0)
    expected = [SwitchoverAck(), Pong(1), XError("boom"), Shut(0), Closed()]
    for k in range(len(raw) + 1):
        assert decode([raw[:k], raw[k:]]) == expected


def test_x_error_is_cut_to_512_bytes_on_a_character_boundary():
    raw = encode_x_error("é" * 400)  # 800 bytes of UTF-8
    assert int.from_bytes(raw[2:4], "big") == 512
    (ev, _) = decode([raw])
    assert ev == XError("é" * 256)
    assert decode([encode_rp_message(MigRpMsg.X_ERROR, b"bad \xff")])[0] == XError("bad \ufffd")


def test_encoder_rejects_what_qemu_would_reject():
    with pytest.raises(ValueError):
        encode_rp_message(MigRpMsg.SWITCHOVER_ACK, b"\0\0\0\0")
    with pytest.raises(ValueError):
        encode_rp_message(MigRpMsg.RECV_BITMAP, bytes(513))
    with pytest.raises(ValueError):
        encode_rp_message(MigRpMsg.INVALID)
    with pytest.raises(ValueError):
        encode_rp_message(99)


# --- QEMU's source-side errors --------------------------------------------------------


def error_of(raw: bytes, eof: bool = False, **options) -> ReturnPathError:
    dec = ReturnPathDecoder(**options)
    dec.receive_data(raw)
    if eof:
        dec.receive_data(b"")
    with pytest.raises(ReturnPathError) as info:
        while dec.next_event() is not NEED_DATA:
            pass
    with pytest.raises(ReturnPathError) as again:
        dec.next_event()
    assert again.value is info.value
    return info.value


def test_switchover_ack_with_length_4_observed_text():
    """Observed on 10.0.2: SWITCHOVER_ACK sent with length 4."""
    err = error_of(encode_pong(1) + b"\x00\x07\x00\x04\0\0\0\0")
    assert err.message == ("Received 'SWITCHOVER_ACK' message (0x0007) withincorrect length 4 "
                           "expecting 0")
    assert err.offset == 8 + 2


@pytest.mark.parametrize(("msg_type", "length"), [(0, 0), (8, 4), (0x1234, 0x10)])
def test_invalid_message_type(msg_type, length):
    err = error_of(msg_type.to_bytes(2, "big") + length.to_bytes(2, "big"))
    assert err.message == f"Received invalid message 0x{msg_type:04x} length 0x{length:04x}"
    assert err.offset == 0


def test_x_error_is_invalid_for_a_qemu_like_source():
    err = error_of(encode_x_error("x"), accept_x_error=False)
    assert err.message == "Received invalid message 0x4c01 length 0x0001"


def test_variable_length_over_512():
    err = error_of(b"\x00\x03\x02\x01")
    assert err.message == ("Received 'REQ_PAGES_ID' message (0x0003) withincorrect length 513 "
                           "expecting 18446744073709551615")


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x00\x01\x00\x04\0\0", "Failed reading data for message 0x0001 read 2 expected 4"),
    (b"\x00\x02\x00", "Failed reading return path message header: read 3 expected 4"),
])
def test_truncated_messages_at_end_of_data(raw, message):
    dec = ReturnPathDecoder()
    dec.receive_data(raw)
    assert dec.next_event() is NEED_DATA  # not an error until the data ends
    assert error_of(raw, eof=True).message == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.lists(st.integers(0, 100), max_size=4))
def test_random_bytes_raise_only_return_path_error(raw, cuts):
    dec = ReturnPathDecoder()
    points = [0, *sorted(c for c in cuts if c <= len(raw)), len(raw)]
    try:
        for a, b in zip(points, points[1:], strict=False):
            if b > a:
                dec.receive_data(raw[a:b])
                while dec.next_event() is not NEED_DATA:
                    pass
        dec.receive_data(b"")
        while not isinstance(dec.next_event(), Closed):
            pass
    except ReturnPathError as exc:
        assert 0 <= exc.offset <= len(raw)
        assert not exc.message.startswith(INTERNAL)


def test_x_load_costs_round_trip_and_a_qemu_source_refuses_it():
    from livemig.wire import ReturnPathDecoder, ReturnPathError, XLoadCosts, encode_x_load_costs
    raw = encode_x_load_costs({"ram-load-bytes-per-s": 1.5e9, "device-load-ms": 400})
    dec = ReturnPathDecoder()
    dec.receive_data(raw)
    assert dec.next_event() == XLoadCosts({"ram-load-bytes-per-s": 1.5e9,
                                           "device-load-ms": 400.0})
    qemu = ReturnPathDecoder(accept_x_error=False)
    qemu.receive_data(raw)
    with pytest.raises(ReturnPathError, match="Received invalid message 0x4c02"):
        qemu.next_event()


def test_malformed_x_load_costs_is_a_clear_error():
    from livemig.wire import MigRpMsg, ReturnPathDecoder, ReturnPathError, encode_rp_message
    dec = ReturnPathDecoder()
    dec.receive_data(encode_rp_message(MigRpMsg.X_LOAD_COSTS, b'{"a": "x"}'))
    with pytest.raises(ReturnPathError, match="Malformed X_LOAD_COSTS"):
        dec.next_event()
