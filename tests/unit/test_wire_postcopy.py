"""Postcopy's stream commands and return-path messages: round trips (hypothesis)
and QEMU 10.0's checks with its texts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.wire import (
    NEED_DATA,
    Command,
    MigCmd,
    PayloadKind,
    ReturnPathDecoder,
    ReturnPathError,
    SectionType,
    StreamDecoder,
    StreamError,
    encode_blob,
    encode_command,
    encode_footer,
    encode_ping,
    encode_rp_message,
    encode_section_header,
)
from livemig.wire.constants import MigRpMsg
from livemig.wire.postcopy import (
    MAX_DISCARDS_PER_COMMAND,
    PostcopyAdvise,
    RamDiscard,
    decode_postcopy_advise,
    decode_postcopy_ram_discard,
    decode_recv_bitmap,
    encode_packaged,
    encode_postcopy_advise,
    encode_postcopy_listen,
    encode_postcopy_ram_discard,
    encode_postcopy_ram_discards,
    encode_postcopy_resume,
    encode_postcopy_run,
    encode_recv_bitmap,
)
from livemig.wire.return_path import RecvBitmap, ReqPages, encode_recv_bitmap_message

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streams import preamble  # noqa: E402

pytestmark = pytest.mark.timeout(60)
u64 = st.integers(0, 2**64 - 1)
names = st.text("abcdefghijklmnopqrstuvwxyz.-_0123456789/", min_size=1, max_size=255)


def _commands(raw: bytes) -> list[object]:
    """Decode ``preamble() + raw`` and return what follows the configuration."""
    dec = StreamDecoder({"cpu": PayloadKind.BLOB})
    dec.receive_data(preamble() + raw)
    out = []
    while (ev := dec.next_event()) is not NEED_DATA:
        out.append(ev)
    return out[2:]


@given(u64, u64)
def test_advise_round_trip(summary, tps):
    ev, = _commands(encode_postcopy_advise(summary, tps))
    assert ev == Command(MigCmd.POSTCOPY_ADVISE, ev.payload)
    assert decode_postcopy_advise(ev.payload, postcopy_ram=True) == PostcopyAdvise(summary, tps)


def test_advise_length_against_the_capability():
    empty = _commands(encode_postcopy_advise(None, 4096))[0].payload
    assert decode_postcopy_advise(empty, postcopy_ram=False) == PostcopyAdvise(None, None)
    with pytest.raises(StreamError, match="RAM postcopy is enabled but have 0 byte advise"):
        decode_postcopy_advise(empty, postcopy_ram=True)
    with pytest.raises(StreamError, match="RAM postcopy is disabled but have 16 byte advise"):
        decode_postcopy_advise(bytes(16), postcopy_ram=False)
    with pytest.raises(StreamError, match=r"CMD_POSTCOPY_ADVISE invalid length \(8\)"):
        decode_postcopy_advise(bytes(8), postcopy_ram=True)


@given(names, st.lists(st.tuples(u64, u64), min_size=1, max_size=MAX_DISCARDS_PER_COMMAND))
def test_discard_round_trip(name, ranges):
    starts = [s for s, _ in ranges]
    lengths = [n for _, n in ranges]
    ev, = _commands(encode_postcopy_ram_discard(name, starts, lengths))
    assert ev.cmd == MigCmd.POSTCOPY_RAM_DISCARD
    d = decode_postcopy_ram_discard(ev.payload)
    assert d == RamDiscard(name, np.array(starts, np.uint64), np.array(lengths, np.uint64))


def test_discard_layout_is_qemus():
    raw = encode_postcopy_ram_discard("pc.ram", [0x1000], [0x3000])
    # 0x08, cmd 6, len 2+6+1+16; version 0, name length, name, NUL, be64 pairs
    assert raw == (bytes([0x08, 0, 6, 0, 25, 0, 6]) + b"pc.ram\0"
                   + (0x1000).to_bytes(8, "big") + (0x3000).to_bytes(8, "big"))


@settings(deadline=None)
@given(st.lists(st.tuples(u64, u64), min_size=1, max_size=100))
def test_many_ranges_go_twelve_to_a_command(ranges):
    starts = np.array([s for s, _ in ranges], np.uint64)
    lengths = np.array([n for _, n in ranges], np.uint64)
    evs = _commands(encode_postcopy_ram_discards("pc.ram", starts, lengths))
    assert len(evs) == -(-len(ranges) // MAX_DISCARDS_PER_COMMAND)
    got = [decode_postcopy_ram_discard(e.payload) for e in evs]
    assert np.array_equal(np.concatenate([g.starts for g in got]), starts)
    assert np.array_equal(np.concatenate([g.lengths for g in got]), lengths)


@pytest.mark.parametrize("payload, text", [
    (bytes(19), "CMD_POSTCOPY_RAM_DISCARD invalid length (19)"),
    (b"\1\2ab\0" + bytes(16), "CMD_POSTCOPY_RAM_DISCARD invalid version (1)"),
    (b"\0\2abX" + bytes(16), "CMD_POSTCOPY_RAM_DISCARD missing nil (88)"),
    (b"\0\2ab\0" + bytes(17), "CMD_POSTCOPY_RAM_DISCARD invalid length (17)"),
    (b"\0\xffab\0" + bytes(16), "CMD_POSTCOPY_RAM_DISCARD Failed to read RAMBlock ID"),
])
def test_discard_checks_in_qemus_words(payload, text):
    with pytest.raises(StreamError) as exc:
        decode_postcopy_ram_discard(payload)
    assert exc.value.message == text


def _device_state() -> bytes:
    return (encode_section_header(SectionType.SECTION_FULL, 1, "cpu", 0, 1)
            + encode_blob(b"state") + encode_footer(1))


def test_packaged_records_decode_in_line_and_end_at_its_end():
    blob = encode_postcopy_listen() + _device_state() + encode_ping(3) + encode_postcopy_run()
    raw = encode_packaged(blob) + encode_ping(4)
    dec = StreamDecoder({"cpu": PayloadKind.BLOB})
    dec.receive_data(preamble() + raw)
    seen = []
    while (ev := dec.next_event()) is not NEED_DATA:
        seen.append((type(ev).__name__, getattr(ev, "cmd", None), dec.in_package))
    cmds = [(c, inside) for name, c, inside in seen if name == "Command"]
    assert cmds == [(MigCmd.PACKAGED, True), (MigCmd.POSTCOPY_LISTEN, True),
                    (MigCmd.PING, True), (MigCmd.POSTCOPY_RUN, True), (MigCmd.PING, False)]
    assert not dec.in_package


def test_a_record_past_the_package_end_is_refused():
    blob = encode_postcopy_listen() + encode_ping(3)      # the length says 2 bytes less
    raw = encode_command(MigCmd.PACKAGED, (len(blob) - 2).to_bytes(4, "big")) + blob
    with pytest.raises(StreamError, match="runs 2 bytes past the end of the package"):
        _commands(raw + encode_ping(5))


def test_oversize_package_in_qemus_words():
    with pytest.raises(StreamError, match="Unreasonably large packaged state: 16777217"):
        _commands(encode_command(MigCmd.PACKAGED, (1 + (1 << 24)).to_bytes(4, "big")))
    with pytest.raises(ValueError, match="Unreasonably large packaged state"):
        encode_packaged(bytes((1 << 24) + 1))


def test_no_payload_commands_and_recv_bitmap():
    evs = _commands(encode_postcopy_listen() + encode_postcopy_run() + encode_postcopy_resume()
                    + encode_recv_bitmap("pc.ram"))
    assert [e.cmd for e in evs] == [MigCmd.POSTCOPY_LISTEN, MigCmd.POSTCOPY_RUN,
                                    MigCmd.POSTCOPY_RESUME, MigCmd.RECV_BITMAP]
    assert decode_recv_bitmap(evs[3].payload) == "pc.ram"
    with pytest.raises(StreamError, match="invalid length"):
        decode_recv_bitmap(b"\x05ab")


def _rp(raw: bytes) -> list[object]:
    dec = ReturnPathDecoder()
    dec.receive_data(raw)
    out = []
    while (ev := dec.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_req_pages_layouts():
    raw = encode_rp_message(MigRpMsg.REQ_PAGES_ID, (0x5000).to_bytes(8, "big")
                            + (4096).to_bytes(4, "big") + b"\x06pc.ram")
    raw += encode_rp_message(MigRpMsg.REQ_PAGES, (0x9000).to_bytes(8, "big")
                             + (8192).to_bytes(4, "big"))
    assert _rp(raw) == [ReqPages(0x5000, 4096, "pc.ram"), ReqPages(0x9000, 8192)]


def test_req_pages_id_bad_length_in_qemus_words():
    raw = encode_rp_message(MigRpMsg.REQ_PAGES_ID, bytes(12) + b"\x09pc.ram")
    with pytest.raises(ReturnPathError) as exc:
        _rp(raw)
    assert exc.value.message == "Req_Page_id with length 19 expecting 22"


@given(st.lists(st.booleans(), min_size=1, max_size=2000))
def test_recv_bitmap_round_trip(bits):
    received = np.array(bits, dtype=bool)
    ev, = _rp(encode_recv_bitmap_message("pc.ram", received))
    assert isinstance(ev, RecvBitmap) and ev.block == "pc.ram"
    assert len(ev.bitmap) % 8 == 0
    assert np.array_equal(ev.received(len(bits)), received)


def test_recv_bitmap_end_mark_and_size_are_checked():
    raw = bytearray(encode_recv_bitmap_message("pc.ram", np.ones(64, dtype=bool)))
    raw[-1] ^= 1
    with pytest.raises(ReturnPathError, match="ramblock 'pc.ram' end mark incorrect"):
        _rp(bytes(raw))
    head = encode_rp_message(MigRpMsg.RECV_BITMAP, b"\x06pc.ram")
    with pytest.raises(ReturnPathError, match="bitmap size 0x7 is invalid"):
        _rp(head + (7).to_bytes(8, "big"))
    with pytest.raises(ReturnPathError, match="missing block name"):
        _rp(encode_rp_message(MigRpMsg.RECV_BITMAP, b""))


def test_resume_goes_on_at_a_record_without_a_header():
    """Postcopy recovery: the old channel broke inside a section; the new one
    starts with commands and PART sections of the ids announced before."""
    from livemig.wire import SectionPart, encode_blob
    dec = StreamDecoder({"cpu": PayloadKind.BLOB})
    full = encode_section_header(SectionType.SECTION_START, 1, "cpu", 0, 1) + \
        encode_blob(b"abc") + encode_footer(1)
    dec.receive_data(preamble() + full + encode_section_header(SectionType.SECTION_PART, 1))
    dec.receive_data(b"")
    with pytest.raises(StreamError, match="Truncated"):
        while dec.next_event() is not NEED_DATA:
            pass
    dec.resume()
    dec.receive_data(encode_recv_bitmap("pc.ram") + encode_postcopy_resume()
                     + encode_section_header(SectionType.SECTION_PART, 1) + encode_blob(b"d")
                     + encode_footer(1))
    evs = []
    while (ev := dec.next_event()) is not NEED_DATA:
        evs.append(ev)
    assert [e.cmd for e in evs[:2]] == [MigCmd.RECV_BITMAP, MigCmd.POSTCOPY_RESUME]
    assert isinstance(evs[2], SectionPart) and evs[2].section_id == 1
