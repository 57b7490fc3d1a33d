"""globalstate in QEMU 10.0's VMState layout: the codec and the decoder path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.migration.global_state import GlobalStateHandler, global_state_vmdesc
from livemig.wire import (
    GLOBAL_STATE_SIZE,
    GlobalStateRecord,
    PayloadKind,
    SectionType,
    StreamDecoder,
    StreamError,
    decode_global_state,
    encode_configuration,
    encode_footer,
    encode_global_state,
    encode_header,
    encode_section_header,
)

# The globalstate payload of a real QEMU 10.0.2 stream (q35, stopped guest).
QEMU_PAUSED = (b"\x00\x00\x00\x07" + b"paused".ljust(32, b"\0") + b"\x01\x00" + bytes(66))

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=31)


def test_layout_is_qemus_byte_for_byte():
    assert GLOBAL_STATE_SIZE == 104
    assert encode_global_state("paused", False) == QEMU_PAUSED
    assert decode_global_state(QEMU_PAUSED) == GlobalStateRecord("paused", False)


@given(names, st.sampled_from([None, False, True]))
def test_round_trip(name, suspended):
    raw = encode_global_state(name, suspended)
    assert len(raw) == GLOBAL_STATE_SIZE
    assert int.from_bytes(raw[:4], "big") == len(name) + 1
    assert decode_global_state(raw) == GlobalStateRecord(name, suspended)


@given(st.binary(min_size=GLOBAL_STATE_SIZE, max_size=GLOBAL_STATE_SIZE))
def test_garbage_is_refused_or_decoded_never_crashes(raw):
    try:
        rec = decode_global_state(raw)
    except ValueError as exc:
        assert str(exc).startswith("globalstate:")
    else:
        assert encode_global_state(rec.runstate, rec.vm_was_suspended)[:38] == raw[:38]


@pytest.mark.parametrize("raw, msg", [
    (b"\x00\x00\x00\x40" + bytes(100), "bad run state size 64"),
    (b"\x00\x00\x00\x03" + b"abcd".ljust(32, b"\0") + bytes(68), "not one NUL-terminated"),
    (b"\x00\x00\x00\x03" + b"\xff\xfe".ljust(32, b"\0") + bytes(68), "not ASCII"),
    (QEMU_PAUSED[:36] + b"\x07\x00" + bytes(66), "vm_was_suspended flags"),
    (QEMU_PAUSED[:-1], "record is 103 bytes"),
])
def test_bad_records(raw, msg):
    with pytest.raises(ValueError, match=msg):
        decode_global_state(raw)


def test_encode_refuses_what_does_not_fit():
    for bad in ("", "x" * 32, "a\0b"):
        with pytest.raises(ValueError):
            encode_global_state(bad)


def _stream(payload: bytes) -> bytes:
    return (encode_header() + encode_configuration("pc")
            + encode_section_header(SectionType.SECTION_FULL, 0, "globalstate", 0, 1)
            + payload + encode_footer(0))


def _events(raw: bytes):
    dec = StreamDecoder({"globalstate": PayloadKind.GLOBALSTATE})
    dec.receive_data(raw)
    out = []
    while True:
        ev = dec.next_event()
        if ev.__class__.__name__ == "NeedData":
            return out
        out.append(ev)


def test_decoder_yields_the_record_then_the_footer():
    evs = _events(_stream(encode_global_state("running")))
    assert GlobalStateRecord("running", False) in evs
    assert type(evs[-1]).__name__ == "SectionFooter"


def test_decoder_refuses_an_oversize_name_before_the_rest_arrives():
    with pytest.raises(StreamError, match="bad run state size 4294967295") as ei:
        _events(_stream(b"\xff\xff\xff\xff"))
    assert ei.value.section == "globalstate"


def test_handler_round_trip_and_refusal():
    class Out:
        def __init__(self):
            self.data = b""

        def write(self, b):
            self.data += bytes(b)
    src, dst = GlobalStateHandler(), GlobalStateHandler()
    src.runstate = "running"
    out = Out()
    src.save_state(out)
    assert out.data == encode_global_state("running", False)
    dst.load_event(decode_global_state(out.data))
    assert dst.runstate == "running"
    with pytest.raises(ValueError, match="globalstate: bad run state"):
        dst.load_event(GlobalStateRecord("run;ning"))
    desc = src.vmstate_description()
    assert desc == global_state_vmdesc()
    assert sum(f["size"] for f in desc["fields"]) == GLOBAL_STATE_SIZE
