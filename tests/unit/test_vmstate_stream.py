"""The stream decoder walks QEMU's device sections field by field
(PayloadKind.VMSTATE with livemig.wire.vmstate descriptions): a microvm-shaped
stream built with the codecs, fed whole and a few bytes at a time; hostile
payloads fail with QEMU's words. QEMU's own streams: tests/e2e/test_microvm_sections.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streams import preamble, section  # noqa: E402

from livemig.wire import (  # noqa: E402
    NEED_DATA,
    Closed,
    Eof,
    PayloadKind,
    SectionType,
    StreamDecoder,
    StreamError,
    VMStateRecord,
    encode_eof,
    encode_footer,
)
from livemig.wire.vmstate.codec import default_values, encode  # noqa: E402
from livemig.wire.vmstate.microvm import (  # noqa: E402
    DEFAULT_CONFIG,
    MICROVM_SECTION_ORDER,
    MICROVM_SECTIONS,
)

KINDS = {name: PayloadKind.VMSTATE for name in MICROVM_SECTIONS}


def values_for(idstr: str) -> dict:
    values = default_values(MICROVM_SECTIONS[idstr])
    if idstr == "cpu":
        values["cpu/tsc_khz"] = {"env.tsc_khz": 2_600_000}
        values["env.regs"] = [0x0505_0505 * (i + 1) for i in range(16)]  # 0x05 bytes inside
    return values


def microvm_stream() -> tuple[bytes, list[tuple[str, dict]]]:
    out, sent = bytearray(preamble("microvm")), []
    for sid, (idstr, instance) in enumerate(MICROVM_SECTION_ORDER):
        desc = MICROVM_SECTIONS[idstr]
        values = values_for(idstr)
        out += section(SectionType.SECTION_FULL, sid, idstr, desc.version_id, instance)
        out += encode(desc, values, DEFAULT_CONFIG) + encode_footer(sid)
        sent.append((idstr, values))
    return bytes(out + encode_eof()), sent


def drain(dec: StreamDecoder, events: list) -> None:
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, Closed):
            return


def records(events: list) -> list[tuple[str, dict]]:
    return [(e.idstr, e.values) for e in events if isinstance(e, VMStateRecord)]


def test_a_microvm_stream_decodes_section_by_section():
    data, sent = microvm_stream()
    dec, events = StreamDecoder(KINDS, vmstate=MICROVM_SECTIONS), []
    dec.receive_data(data)
    drain(dec, events)
    dec.receive_data(b"")
    drain(dec, events)
    got = records(events)
    assert [g[0] for g in got] == [i for i, _ in sent]
    for (idstr, values), (_, want) in zip(got, sent, strict=True):
        main = {k: v for k, v in values.items() if "/" not in k and k in want}
        assert main == {k: v for k, v in want.items() if "/" not in k}, idstr
    assert got[3][1]["env.regs"] == sent[3][1]["env.regs"]
    assert got[3][1]["cpu/tsc_khz"] == {"env.tsc_khz": 2_600_000}
    assert any(isinstance(e, Eof) for e in events)


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(1, 97))
def test_any_chunking_gives_the_same_records(chunk):
    data, _ = microvm_stream()
    whole = StreamDecoder(KINDS, vmstate=MICROVM_SECTIONS)
    want: list = []
    whole.receive_data(data)
    drain(whole, want)
    dec, events = StreamDecoder(KINDS, vmstate=MICROVM_SECTIONS), []
    for i in range(0, len(data), chunk):
        dec.receive_data(data[i:i + chunk])
        drain(dec, events)
    assert records(events) == records(want)


def test_an_unknown_subsection_fails_with_its_name():
    head = preamble("microvm") + section(SectionType.SECTION_FULL, 0, "kvmclock", 1)
    payload = encode(MICROVM_SECTIONS["kvmclock"], values_for("kvmclock"), DEFAULT_CONFIG)
    bogus = payload[:8] + b"\x05\x0ekvmclock/bogus" + bytes(4) + encode_footer(0)
    dec = StreamDecoder(KINDS, vmstate=MICROVM_SECTIONS)
    dec.receive_data(head + bogus)
    with pytest.raises(StreamError, match="kvmclock: unknown subsection 'kvmclock/bogus'") as e:
        drain(dec, [])
    assert e.value.section == "kvmclock"
    assert e.value.offset == len(head) + 8


def test_a_payload_cut_by_the_end_of_data_is_truncated():
    data, _ = microvm_stream()
    cut = data.index(b"\x03cpu\x00\x00\x00\x00") + 100      # inside the cpu section
    dec = StreamDecoder(KINDS, vmstate=MICROVM_SECTIONS)
    dec.receive_data(data[:cut])
    drain(dec, [])
    dec.receive_data(b"")
    with pytest.raises(StreamError, match="Truncated migration stream: data ended inside a "
                                          "section payload"):
        drain(dec, [])


def test_a_vmstate_kind_needs_its_description():
    with pytest.raises(TypeError, match="needs its VMState description"):
        StreamDecoder({"cpu": PayloadKind.VMSTATE})
