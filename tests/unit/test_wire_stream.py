"""Round trips of the migration stream: encoders -> bytes -> StreamDecoder -> events.

The property: for any stream a livemig source may write, cut into any chunks
and fed through either feeding path, the decoder returns exactly the events
the stream was built from. Page batches are compared page by page, since
batch boundaries legitimately depend on the chunking.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.wire import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    Configuration,
    Eof,
    Header,
    MigCmd,
    PayloadKind,
    RamBlockList,
    RamEos,
    RamMultifdFlush,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    SectionType,
    StreamDecoder,
    StreamError,
    TaggedData,
    TaggedEnd,
    VfioMigFlag,
    VmDescription,
    encode_blob,
    encode_command,
    encode_configuration,
    encode_eof,
    encode_footer,
    encode_header,
    encode_ping,
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_section_header,
    encode_tagged_data,
    encode_tagged_end,
    encode_tagged_marker,
    encode_vmdesc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: streams.py
from streams import preamble, ram_stream_start  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PAGE = 4096
KINDS = {"ram": PayloadKind.RAM, "vfio": PayloadKind.TAGGED,
         "serial": PayloadKind.BLOB, "cpu": PayloadKind.BLOB}
BLOCKS = [("pc.ram", 64 * PAGE), ("pc.bios", 4 * PAGE), ("/rom@etc/acpi/tables", 8 * PAGE)]
BLOCK_LEN = dict(BLOCKS)


# --- helpers --------------------------------------------------------------------------


def normalize(ev: object) -> list[tuple]:
    """Events as plain tuples; page batches expanded to one tuple per page."""
    if isinstance(ev, RamPages):
        assert ev.offsets.dtype == np.int64 and ev.data.dtype == np.uint8
        assert ev.data.shape == (len(ev.offsets), PAGE)
        return [("page", ev.block, int(o), ev.data[i].tobytes())
                for i, o in enumerate(ev.offsets)]
    if isinstance(ev, RamZeroPages):
        assert ev.offsets.dtype == np.int64
        return [("zero", ev.block, int(o)) for o in ev.offsets]
    return [(type(ev).__name__, *(getattr(ev, f.name) for f in dataclasses.fields(ev)))]


def drain(dec: StreamDecoder, out: list[tuple]) -> bool:
    """Pull events until NEED_DATA; True once Closed was seen."""
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            return False
        out.extend(normalize(ev))
        if isinstance(ev, Closed):
            return True


def feed(dec: StreamDecoder, chunk: bytes, use_get_buffer: bool) -> None:
    if use_get_buffer:
        view = dec.get_buffer(len(chunk))
        assert len(view) >= len(chunk)
        view[:len(chunk)] = chunk
        dec.buffer_updated(len(chunk))
    else:
        dec.receive_data(chunk)


def decode(chunks: list[bytes], *, use_get_buffer: bool = False, **options) -> list[tuple]:
    dec = StreamDecoder(KINDS, **options)
    out: list[tuple] = []
    for chunk in chunks:
        if chunk:
            feed(dec, chunk, use_get_buffer)
            drain(dec, out)
    dec.receive_data(b"")
    assert drain(dec, out)
    assert dec.next_event() == Closed()  # stays closed
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# --- a model of the streams a livemig source writes -------------------------------------


class StreamBuilder:
    """Builds bytes and the expected normalized events side by side."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.expected: list[tuple] = []
        self.last_block: str | None = None

    def add(self, data: bytes | np.ndarray, *events: tuple) -> None:
        self.parts.append(bytes(data))
        self.expected.extend(events)

    def bytes(self) -> bytes:
        return b"".join(self.parts)

    def preamble(self, machine_type: str = "pc-q35-10.0", uuid: bytes | None = None,
                 return_path: bool = True) -> None:
        self.add(encode_header(), ("Header", 3))
        self.add(encode_configuration(machine_type, uuid), ("Configuration", machine_type, uuid))
        if return_path:
            self.add(encode_command(MigCmd.OPEN_RETURN_PATH),
                     ("Command", MigCmd.OPEN_RETURN_PATH, b""))
            self.add(encode_ping(1), ("Command", MigCmd.PING, b"\0\0\0\1"))

    def ram_start(self, section_id: int) -> None:
        self.add(encode_section_header(SectionType.SECTION_START, section_id, "ram", 0, 4),
                 ("SectionStart", section_id, "ram", 0, 4))
        total = sum(length for _, length in BLOCKS)
        self.add(encode_ram_block_list(BLOCKS), ("RamBlockList", total, tuple(BLOCKS)))
        self.add(encode_ram_eos(), ("RamEos",))
        self.add(encode_footer(section_id), ("SectionFooter", section_id))

    def ram_run(self, zero: bool, block: str, offsets: list[int], name: bool,
                seed: int = 0) -> None:
        name = name or block != self.last_block
        if zero:
            data = encode_ram_zero_pages(block, offsets, first_has_block_name=name)
            self.add(data, *[("zero", block, o) for o in offsets])
        else:
            rng = np.random.default_rng(seed)
            pages = rng.integers(0, 256, (len(offsets), PAGE), dtype=np.uint8)
            data = encode_ram_pages(block, np.array(offsets, dtype=np.int64), pages,
                                    first_has_block_name=name)
            self.add(data, *[("page", block, o, pages[i].tobytes())
                             for i, o in enumerate(offsets)])
        if offsets:
            self.last_block = block

    def section(self, kind: SectionType, section_id: int, idstr: str,
                instance_id: int = 0, version_id: int = 1) -> None:
        header = encode_section_header(kind, section_id, idstr, instance_id, version_id)
        name = {SectionType.SECTION_START: "SectionStart", SectionType.SECTION_FULL: "SectionFull",
                SectionType.SECTION_PART: "SectionPart", SectionType.SECTION_END: "SectionEnd"}
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            self.add(header, (name[kind], section_id, idstr, instance_id, version_id))
        else:
            self.add(header, (name[kind], section_id, idstr))

    def footer(self, section_id: int) -> None:
        self.add(encode_footer(section_id), ("SectionFooter", section_id))

    def end(self, vmdesc: bytes | None = b'{"page_size":4096}') -> None:
        self.add(encode_eof(), ("Eof",))
        if vmdesc is not None:
            self.add(encode_vmdesc(vmdesc), ("VmDescription", vmdesc))
        self.expected.append(("Closed",))


block_names = st.sampled_from([name for name, _ in BLOCKS])


@st.composite
def ram_runs(draw):
    block = draw(block_names)
    npages = BLOCK_LEN[block] // PAGE
    offsets = draw(st.lists(st.integers(0, npages - 1), min_size=1, max_size=6))
    return (draw(st.booleans()), block, [o * PAGE for o in offsets], draw(st.booleans()),
            draw(st.integers(0, 2**32)))


tag_items = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([VfioMigFlag.DEV_CONFIG_STATE, VfioMigFlag.DEV_SETUP_STATE]),
)


@st.composite
def streams(draw) -> StreamBuilder:
    b = StreamBuilder()
    uuid = draw(st.none() | st.binary(min_size=16, max_size=16))
    b.preamble(draw(st.text(max_size=20)), uuid, return_path=draw(st.booleans()))
    ids = draw(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4, unique=True))
    ram_id, vfio_id, serial_id, cpu_id = ids
    b.ram_start(ram_id)
    vfio_started = False
    for item in draw(st.lists(st.sampled_from(["ram", "vfio", "blob", "cmd"]), max_size=6)):
        if item == "ram":
            kind = draw(st.sampled_from([SectionType.SECTION_PART, SectionType.SECTION_END]))
            b.section(kind, ram_id, "ram")
            for run in draw(st.lists(ram_runs(), max_size=4)):
                b.ram_run(*run)
            b.add(encode_ram_eos(), ("RamEos",))
            b.footer(ram_id)
        elif item == "vfio":
            if vfio_started:
                kind = draw(st.sampled_from([SectionType.SECTION_PART, SectionType.SECTION_END]))
            else:
                kind = SectionType.SECTION_START
                vfio_started = True
            b.section(kind, vfio_id, "vfio")
            for thing in draw(st.lists(tag_items, max_size=4)):
                if isinstance(thing, bytes):
                    b.add(encode_tagged_data(thing),
                          ("TaggedData", VfioMigFlag.DEV_DATA_STATE, thing))
                else:
                    b.add(encode_tagged_marker(thing), ("TaggedData", thing, b""))
            end = draw(st.sampled_from([VfioMigFlag.END_OF_STATE,
                                        VfioMigFlag.DEV_INIT_DATA_SENT]))
            b.add(encode_tagged_end(end), ("TaggedEnd", end))
            b.footer(vfio_id)
        elif item == "blob":
            idstr, sid = draw(st.sampled_from([("serial", serial_id), ("cpu", cpu_id)]))
            b.section(SectionType.SECTION_FULL, sid, idstr,
                      draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
            data = draw(st.binary(max_size=100))
            b.add(encode_blob(data), ("Blob", data))
            b.footer(sid)
        else:
            if draw(st.booleans()):
                b.add(encode_command(MigCmd.SWITCHOVER_START),
                      ("Command", MigCmd.SWITCHOVER_START, b""))
            else:
                value = draw(st.integers(0, 2**32 - 1))
                b.add(encode_ping(value), ("Command", MigCmd.PING, value.to_bytes(4, "big")))
    b.end(draw(st.none() | st.binary(max_size=30)))
    return b


# --- round trips ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_random_streams_round_trip_under_random_chunking(builder, data):
    raw = builder.bytes()
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    use_get_buffer = data.draw(st.booleans())
    buffer_size = data.draw(st.sampled_from([64, 4096, 1 << 20]))
    got = decode(split(raw, cuts), use_get_buffer=use_get_buffer, buffer_size=buffer_size)
    assert got == builder.expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_random_streams_round_trip_in_one_chunk(builder):
    assert decode([builder.bytes()]) == builder.expected


def small_stream() -> StreamBuilder:
    """Every record kind once, small enough to split at every byte."""
    b = StreamBuilder()
    b.preamble(uuid=bytes(range(16)))
    b.ram_start(1)
    b.section(SectionType.SECTION_PART, 1, "ram")
    b.ram_run(True, "pc.ram", [0, PAGE, 5 * PAGE], name=True)
    b.ram_run(False, "pc.ram", [2 * PAGE, 3 * PAGE], name=False, seed=7)
    b.ram_run(False, "pc.bios", [PAGE], name=True, seed=8)
    b.add(encode_ram_eos(), ("RamEos",))
    b.footer(1)
    b.section(SectionType.SECTION_START, 2, "vfio")
    b.add(encode_tagged_marker(VfioMigFlag.DEV_SETUP_STATE),
          ("TaggedData", VfioMigFlag.DEV_SETUP_STATE, b""))
    b.add(encode_tagged_data(b"abc"), ("TaggedData", VfioMigFlag.DEV_DATA_STATE, b"abc"))
    b.add(encode_tagged_end(VfioMigFlag.DEV_INIT_DATA_SENT),
          ("TaggedEnd", VfioMigFlag.DEV_INIT_DATA_SENT))
    b.footer(2)
    b.add(encode_command(MigCmd.SWITCHOVER_START), ("Command", MigCmd.SWITCHOVER_START, b""))
    b.section(SectionType.SECTION_END, 1, "ram")
    b.ram_run(False, "pc.bios", [0], name=False, seed=9)
    b.add(encode_ram_eos(), ("RamEos",))
    b.footer(1)
    b.section(SectionType.SECTION_FULL, 3, "serial", 0, 1)
    b.add(encode_blob(b"\x00uart\xff"), ("Blob", b"\x00uart\xff"))
    b.footer(3)
    b.end()
    return b


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_get_buffer", [False, True])
def test_split_at_every_boundary(use_get_buffer):
    b = small_stream()
    raw = b.bytes()
    for k in range(1, len(raw)):
        assert decode([raw[:k], raw[k:]], use_get_buffer=use_get_buffer,
                      buffer_size=4096) == b.expected, k


def test_byte_at_a_time():
    b = small_stream()
    raw = b.bytes()
    assert decode([raw[i:i + 1] for i in range(len(raw))], buffer_size=64) == b.expected


def test_truncated_stream_is_need_data_until_the_end_of_data():
    raw = small_stream().bytes()
    clean_end = len(raw) - len(encode_vmdesc(b'{"page_size":4096}'))  # right after Eof
    ks = [*range(0, 200), *range(200, len(raw), 97), clean_end - 1, len(raw) - 1]
    for k in (k for k in ks if k != clean_end):
        dec = StreamDecoder(KINDS)
        if k:
            dec.receive_data(raw[:k])
        while (ev := dec.next_event()) is not NEED_DATA:
            assert not isinstance(ev, Closed)
        assert dec.next_event() is NEED_DATA  # asking again changes nothing
        dec.receive_data(b"")
        with pytest.raises(StreamError, match="Truncated migration stream") as info:
            dec.next_event()
        assert info.value.offset == k
    dec = StreamDecoder(KINDS)
    dec.receive_data(raw[:clean_end])
    dec.receive_data(b"")
    while not isinstance(dec.next_event(), Eof):
        pass
    assert dec.next_event() == Closed()


def test_end_after_eof_without_vmdesc_is_clean():
    b = StreamBuilder()
    b.preamble()
    b.ram_start(0)
    b.end(vmdesc=None)
    assert decode([b.bytes()]) == b.expected


# --- event types ----------------------------------------------------------------------


def test_events_are_typed_dataclasses():
    b = small_stream()
    dec = StreamDecoder(KINDS)
    dec.receive_data(b.bytes())
    dec.receive_data(b"")
    seen = []
    while not isinstance(ev := dec.next_event(), Closed):
        seen.append(ev)
    types = {type(ev) for ev in seen}
    assert types >= {Header, Configuration, Command, SectionStart, SectionPart, SectionEnd,
                     SectionFull, SectionFooter, RamBlockList, RamPages, RamZeroPages, RamEos,
                     TaggedData, TaggedEnd, Blob, Eof, VmDescription}
    assert seen[1] == Configuration("pc-q35-10.0", bytes(range(16)))
    cmd = next(ev for ev in seen if isinstance(ev, Command))
    assert isinstance(cmd.cmd, MigCmd)
    with pytest.raises(AttributeError):
        seen[0].version = 4  # frozen


def test_offset_property_tracks_decoded_bytes():
    raw = small_stream().bytes()
    dec = StreamDecoder(KINDS, buffer_size=64)
    dec.receive_data(raw)
    assert dec.offset == 0
    assert dec.next_event() == Header(3)
    assert dec.offset == 8
    while not isinstance(dec.next_event(), Eof):
        pass
    assert dec.offset == len(raw) - len(encode_vmdesc(b'{"page_size":4096}'))


def test_section_footers_off():
    raw = (preamble("pc-i440fx-2.3")
           + encode_section_header(SectionType.SECTION_FULL, 4, "serial", 0, 1)
           + encode_blob(b"x") + encode_eof())
    dec = StreamDecoder(KINDS, section_footers=False)
    dec.receive_data(raw)
    dec.receive_data(b"")
    events = []
    while not isinstance(ev := dec.next_event(), Closed):
        events.append(ev)
    assert events[2:] == [SectionFull(4, "serial", 0, 1), Blob(b"x"), Eof()]


def test_without_configuration():
    raw = preamble(None) + encode_eof()
    dec = StreamDecoder(KINDS, expect_configuration=False)
    dec.receive_data(raw)
    assert [dec.next_event(), dec.next_event()] == [Header(3), Eof()]


def test_part_resolves_idstr_from_a_full_section_id():
    """QEMU resolves PART/END by load_section_id, which FULL sets too."""
    raw = (preamble("m")
           + encode_section_header(SectionType.SECTION_FULL, 9, "serial", 1, 1)
           + encode_blob(b"") + encode_footer(9)
           + encode_section_header(SectionType.SECTION_PART, 9) + encode_blob(b"y")
           + encode_footer(9))
    dec = StreamDecoder(KINDS)
    dec.receive_data(raw)
    events = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
    assert events[-3:] == [SectionPart(9, "serial"), Blob(b"y"), SectionFooter(9)]


def test_multifd_flush_record_is_a_sync_event():
    raw = (ram_stream_start(BLOCKS, sid=0, machine_type="m") + (0x200).to_bytes(8, "big")
           + encode_ram_eos() + encode_footer(0))
    dec = StreamDecoder(KINDS)
    dec.receive_data(raw)
    events = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(type(ev))
    assert events == [Header, Configuration, SectionStart, RamBlockList, RamMultifdFlush, RamEos,
                      SectionFooter]


def test_last_block_persists_across_sections():
    b = StreamBuilder()
    b.preamble()
    b.ram_start(1)
    b.section(SectionType.SECTION_PART, 1, "ram")
    b.ram_run(False, "pc.bios", [PAGE], name=True, seed=1)
    b.add(encode_ram_eos(), ("RamEos",))
    b.footer(1)
    b.section(SectionType.SECTION_END, 1, "ram")
    b.ram_run(True, "pc.bios", [0, 2 * PAGE], name=False)  # CONTINUE from the PART
    b.add(encode_ram_eos(), ("RamEos",))
    b.footer(1)
    b.end()
    assert decode([b.bytes()]) == b.expected


# --- vectorisation --------------------------------------------------------------------


def ram_prefix(blocks=BLOCKS) -> bytes:
    return ram_stream_start(blocks, sid=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first_has_block_name", [True, False])
def test_one_chunk_of_1000_page_records_is_one_event(first_has_block_name):
    """The micro check that page decoding is vectorised: 1000 contiguous PAGE
    records in one chunk come back as one RamPages, whose data is a strided
    view into the receive buffer (no per-page copy, no per-page Python)."""
    n = 1000
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    offsets = rng.permutation(n).astype(np.int64) * PAGE
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    records = encode_ram_pages("pc.ram", offsets, pages, first_has_block_name=first_has_block_name)
    lead = b""
    if not first_has_block_name:  # set "last block" with a named zero page first
        lead = bytes(encode_ram_zero_pages("pc.ram", [PAGE * 2000], first_has_block_name=True))
    dec.receive_data(ram_prefix([("pc.ram", 4096 * PAGE)]) + lead + bytes(records)
                     + encode_ram_eos())
    while not isinstance(ev := dec.next_event(), RamBlockList):
        pass
    if lead:
        assert isinstance(dec.next_event(), RamZeroPages)
    ev = dec.next_event()
    assert isinstance(ev, RamPages)
    assert len(ev.offsets) == n
    assert np.array_equal(ev.offsets, offsets)
    assert np.array_equal(ev.data, pages)
    assert ev.data.strides == (PAGE + 8, 1)  # a view over the records, not a copy
    assert not ev.data.flags.writeable
    assert dec.next_event() == RamEos()


@pytest.mark.timeout(30)
def test_one_chunk_of_zero_records_is_one_event():
    n = 10000
    offsets = np.arange(n, dtype=np.int64)[::-1] * PAGE
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    dec.receive_data(ram_prefix([("pc.ram", n * PAGE)])
                     + bytes(encode_ram_zero_pages("pc.ram", offsets, first_has_block_name=True))
                     + encode_ram_eos())
    while not isinstance(dec.next_event(), RamBlockList):
        pass
    ev = dec.next_event()
    assert isinstance(ev, RamZeroPages)
    assert np.array_equal(ev.offsets, offsets)
    assert dec.next_event() == RamEos()


def test_run_stops_at_a_record_that_needs_the_slow_path():
    """A batch is the longest valid prefix: a named record, another block or a
    bad record ends it, and the next call starts exactly there."""
    rng = np.random.default_rng(2)
    pages = rng.integers(0, 256, (6, PAGE), dtype=np.uint8)
    raw = (ram_prefix()
           + bytes(encode_ram_pages("pc.ram", [0, PAGE, 2 * PAGE], pages[:3],
                                    first_has_block_name=True))
           + bytes(encode_ram_pages("pc.ram", [3 * PAGE], pages[3:4], first_has_block_name=True))
           + bytes(encode_ram_pages("pc.bios", [0, PAGE], pages[4:], first_has_block_name=True)))
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    dec.receive_data(raw)
    while not isinstance(dec.next_event(), RamBlockList):
        pass
    sizes = []
    while (ev := dec.next_event()) is not NEED_DATA:
        sizes.append((ev.block, len(ev.offsets)))
    assert sizes == [("pc.ram", 3), ("pc.ram", 1), ("pc.bios", 2)]


def test_page_data_view_is_valid_until_the_next_call():
    """Documented contract: copy RamPages.data out before calling the decoder again."""
    pages = np.full((2, PAGE), 0xAB, dtype=np.uint8)
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    dec.receive_data(ram_prefix() + bytes(encode_ram_pages("pc.ram", [0, PAGE], pages,
                                                           first_has_block_name=True)))
    while not isinstance(ev := dec.next_event(), RamPages):
        pass
    target = np.zeros((64, PAGE), dtype=np.uint8)
    target[ev.offsets // PAGE] = ev.data  # the intended use: one scatter
    assert (target[:2] == 0xAB).all() and not target[2:].any()
