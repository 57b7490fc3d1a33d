"""Hostile and broken migration streams: StreamError with QEMU's text and an offset.

Two kinds of test: one per error condition (exact message, offset, section),
and properties over random / mutated bytes asserting that nothing but
StreamError ever escapes, that it carries an offset inside the data, and that
the decoder's safety net for its own bugs never fires.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.wire import (
    NEED_DATA,
    Closed,
    MigCmd,
    PayloadKind,
    SectionType,
    StreamDecoder,
    StreamError,
    VfioMigFlag,
    WireError,
    encode_blob,
    encode_command,
    encode_configuration,
    encode_eof,
    encode_footer,
    encode_ping,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_section_header,
    encode_tagged_data,
    encode_tagged_end,
    encode_vmdesc,
)
from livemig.wire.constants import BE32, BE64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: streams.py
from streams import preamble, ram_section_start  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PAGE = 4096
KINDS = {"ram": PayloadKind.RAM, "vfio": PayloadKind.TAGGED, "serial": PayloadKind.BLOB}
BLOCKS = [("pc.ram", 16 * PAGE), ("pc.bios", 2 * PAGE)]
PRE = preamble("pc-q35-10.0")
RAM_START = ram_section_start(1, BLOCKS)
INTERNAL = "Malformed migration stream (decoder"


def first_error(raw: bytes, *, eof: bool = False, **options) -> StreamError:
    """Decode ``raw``; return the StreamError, checking it is raised again after."""
    dec = StreamDecoder(KINDS, **options)
    dec.receive_data(raw)
    if eof:
        dec.receive_data(b"")
    try:
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA or isinstance(ev, Closed):
                break
    except StreamError as exc:
        with pytest.raises(StreamError) as again:
            dec.next_event()
        assert again.value is exc
        assert not exc.message.startswith(INTERNAL)
        return exc
    pytest.fail("no StreamError")


def sample_stream() -> bytes:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (3, PAGE), dtype=np.uint8)
    return b"".join([
        PRE, encode_command(MigCmd.OPEN_RETURN_PATH), encode_ping(1),
        RAM_START, encode_ram_eos(), encode_footer(1),
        encode_section_header(SectionType.SECTION_PART, 1),
        bytes(encode_ram_zero_pages("pc.ram", [0, PAGE, 3 * PAGE], first_has_block_name=True)),
        bytes(encode_ram_pages("pc.ram", [2 * PAGE, 5 * PAGE], pages[:2],
                               first_has_block_name=False)),
        bytes(encode_ram_pages("pc.bios", [PAGE], pages[2:], first_has_block_name=True)),
        encode_ram_eos(), encode_footer(1),
        encode_section_header(SectionType.SECTION_START, 2, "vfio", 0, 1),
        encode_tagged_data(b"state"), encode_tagged_end(), encode_footer(2),
        encode_command(MigCmd.SWITCHOVER_START),
        encode_section_header(SectionType.SECTION_FULL, 3, "serial", 0, 1),
        encode_blob(b"uart"), encode_footer(3),
        encode_eof(), encode_vmdesc(b"{}"),
    ])


# --- header ---------------------------------------------------------------------------


def test_bad_magic():
    err = first_error(b"QEVX\0\0\0\3")
    assert (err.message, err.offset, err.section) == ("Not a migration stream", 0, None)


def test_v2_stream():
    err = first_error(b"QEVM\0\0\0\2")
    assert err.message == "SaveVM v2 format is obsolete and don't work anymore"
    assert err.offset == 4


def test_unknown_version():
    err = first_error(b"QEVM\0\0\0\4")
    assert (err.message, err.offset) == ("Unsupported migration stream version", 4)


def test_configuration_missing():
    err = first_error(preamble(None) + encode_eof())
    assert (err.message, err.offset) == ("Configuration section missing", 8)


def test_oversized_machine_type_is_refused_before_its_bytes_arrive():
    err = first_error(preamble(None) + b"\x07" + BE32.pack(0xFFFFFFFF))
    assert "exceeds the limit" in err.message and err.offset == 9


def test_unknown_configuration_subsection():
    raw = preamble("m") + b"\x05\x1econfiguration/target-page-bits"
    err = first_error(raw + BE32.pack(1) + BE32.pack(12))
    assert err.message == ("VM subsection 'configuration/target-page-bits' in 'configuration' "
                           "does not exist")
    assert err.offset == len(preamble("m"))


def test_uuid_subsection_version_too_new():
    raw = encode_configuration("m", bytes(16))
    raw = raw[:-20] + BE32.pack(2) + raw[-16:]
    err = first_error(preamble(None) + raw)
    assert err.message == ("configuration/uuid: incoming version_id 2 is too new for local "
                           "version_id 1")


# --- records and sections -------------------------------------------------------------


@pytest.mark.parametrize("type_byte", [5, 6, 7, 9, 0x7E, 0xFF])
def test_unknown_section_type(type_byte):
    raw = PRE + encode_command(MigCmd.OPEN_RETURN_PATH)  # 0x05 right after PRE: a subsection
    err = first_error(raw + bytes([type_byte]))
    assert (err.message, err.offset) == (f"Unknown savevm section type {type_byte}", len(raw))


def test_unknown_idstr():
    err = first_error(PRE + encode_section_header(SectionType.SECTION_FULL, 3, "floppy", 2, 1))
    assert err.message == ("Unknown savevm section or instance 'floppy' 2. Make sure that your "
                           "current VM setup matches your saved VM setup, including any "
                           "hotplugged devices")
    assert (err.offset, err.section) == (len(PRE), "floppy")


def test_idstr_not_utf8():
    raw = PRE + b"\x04\0\0\0\x03\x02\xff\xfe" + bytes(8)
    err = first_error(raw)
    assert err.message == "Unable to read ID string for section 3"


def test_part_with_unknown_section_id():
    err = first_error(PRE + encode_section_header(SectionType.SECTION_PART, 7))
    assert (err.message, err.offset) == ("Unknown savevm section 7", len(PRE) + 1)


def test_missing_footer():
    raw = (PRE + encode_section_header(SectionType.SECTION_FULL, 3, "serial", 0, 1)
           + encode_blob(b""))
    err = first_error(raw + encode_eof())
    assert (err.message, err.offset, err.section) == (
        "Missing section footer for serial", len(raw), "serial")


def test_mismatched_footer():
    raw = (PRE + encode_section_header(SectionType.SECTION_FULL, 3, "serial", 0, 1)
           + encode_blob(b""))
    err = first_error(raw + encode_footer(0x15))
    assert err.message == "Mismatched section id in footer for serial - read 0x15 expected 0x3"
    assert err.offset == len(raw) + 1


@pytest.mark.parametrize(("cmd", "length"), [(0, 0), (12, 0), (0x4C01, 4)])
def test_unknown_command(cmd, length):
    err = first_error(PRE + b"\x08" + cmd.to_bytes(2, "big") + length.to_bytes(2, "big"))
    assert err.message == f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})"
    assert err.offset == len(PRE) + 1


@pytest.mark.parametrize(("cmd", "name", "expected", "length"), [
    (MigCmd.PING, "PING", 4, 3),
    (MigCmd.OPEN_RETURN_PATH, "OPEN_RETURN_PATH", 0, 1),
    (MigCmd.SWITCHOVER_START, "SWITCHOVER_START", 0, 4),
    (MigCmd.PACKAGED, "PACKAGED", 4, 0),
])
def test_command_with_bad_length(cmd, name, expected, length):
    err = first_error(PRE + b"\x08" + int(cmd).to_bytes(2, "big") + length.to_bytes(2, "big"))
    assert err.message == f"{name} received with bad length - expecting {expected}, got {length}"


def test_blob_over_max_payload_is_refused_before_its_bytes_arrive():
    raw = PRE + encode_section_header(SectionType.SECTION_FULL, 3, "serial", 0, 1)
    err = first_error(raw + BE32.pack(1 << 20), max_payload=1 << 19)
    assert err.message == "Blob of 1048576 bytes exceeds the limit of 524288 bytes"
    assert (err.offset, err.section) == (len(raw), "serial")
    assert first_error(raw + BE32.pack(0xFFFFFFFF)).offset == len(raw)  # default 256 MiB


def test_tagged_chunk_over_max_payload():
    raw = PRE + encode_section_header(SectionType.SECTION_START, 2, "vfio", 0, 1)
    err = first_error(raw + BE64.pack(VfioMigFlag.DEV_DATA_STATE) + BE64.pack(1 << 62))
    assert "exceeds the limit" in err.message and err.offset == len(raw) + 8


def test_unknown_tag():
    raw = PRE + encode_section_header(SectionType.SECTION_START, 2, "vfio", 0, 1)
    err = first_error(raw + BE64.pack(0xFFFFFFFFEF100009))
    assert (err.message, err.offset) == ("vfio: Unknown tag 0xffffffffef100009", len(raw))


def test_vmdesc_over_max_payload_and_wrong_type_after_eof():
    raw = PRE + encode_eof()
    assert "exceeds the limit" in first_error(raw + b"\x06" + BE32.pack(1 << 30)).message
    err = first_error(raw + b"\x01")
    assert (err.message, err.offset) == ("Expected vmdescription section, but got 1", len(raw))


def test_data_after_the_end():
    raw = PRE + encode_eof() + encode_vmdesc(b"{}")
    err = first_error(raw + b"\0")
    assert err.message == "Unexpected data after the end of the migration stream"
    assert err.offset == len(raw)


def test_data_after_eof_reported_is_a_caller_bug():
    dec = StreamDecoder(KINDS)
    dec.receive_data(b"")
    with pytest.raises(RuntimeError):
        dec.receive_data(b"x")


# --- RAM ------------------------------------------------------------------------------


def ram(body: bytes) -> bytes:
    return PRE + RAM_START + body


def test_continue_without_a_previous_block():
    body = bytes(encode_ram_zero_pages("pc.ram", [0], first_has_block_name=False))
    err = first_error(ram(body))
    assert (err.message, err.offset, err.section) == (
        "Ack, bad migration stream!", len(ram(b"")), "ram")


def test_zero_page_with_a_value():
    body = bytearray(encode_ram_zero_pages("pc.ram", [0, PAGE, 2 * PAGE],
                                           first_has_block_name=True))
    body[-10] = 7  # the second record's byte
    raw = ram(bytes(body))
    dec = StreamDecoder(KINDS)
    dec.receive_data(raw)
    while (ev := dec.next_event()).__class__.__name__ != "RamZeroPages":
        pass
    assert ev.offsets.tolist() == [0]  # the valid prefix comes first
    with pytest.raises(StreamError) as info:
        dec.next_event()
    assert info.value.message == "Found a zero page with value 7"
    assert info.value.offset == len(raw) - 10
    err = first_error(ram(b"\0" * 7 + b"\x02\x06pc.ram\x09"))
    assert err.message == "Found a zero page with value 9"


def test_unknown_block():
    body = bytes(encode_ram_zero_pages("pc.rom", [0], first_has_block_name=True))
    assert first_error(ram(body)).message == "Can't find block pc.rom"


def test_page_before_any_block_list():
    body = bytes(encode_ram_zero_pages("pc.ram", [0], first_has_block_name=True))
    raw = PRE + encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4) + body
    assert first_error(raw).message == "Can't find block pc.ram"


@pytest.mark.parametrize("zero", [True, False])
def test_offset_outside_the_block(zero):
    pages = np.zeros((2, PAGE), dtype=np.uint8)
    if zero:
        body = encode_ram_zero_pages("pc.bios", [0, 2 * PAGE], first_has_block_name=True)
    else:
        body = encode_ram_pages("pc.bios", [PAGE, 2 * PAGE], pages, first_has_block_name=True)
    raw = ram(bytes(body))
    dec = StreamDecoder(KINDS)
    dec.receive_data(raw)
    with pytest.raises(StreamError) as info:
        while True:
            dec.next_event()
    assert info.value.message == "Illegal RAM offset 2000"
    stride = 9 if zero else 4104
    assert info.value.offset == len(raw) - stride


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x0A, 0x0C, 0x100, 0x400, 0x800])
def test_unknown_flag_combinations(flags):
    err = first_error(ram(BE64.pack(flags)))
    assert err.message == f"Unknown combination of migration flags: 0x{flags:x}"
    assert err.offset == len(ram(b""))


@pytest.mark.parametrize("flags", [0x40, 0x80, 0x60])
def test_xbzrle_and_rdma_records_are_refused(flags):
    assert "not supported" in first_error(ram(BE64.pack(flags))).message


def test_block_list_overrunning_its_total():
    raw = PRE + encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4)
    body = BE64.pack(PAGE | 4) + b"\x06pc.ram" + BE64.pack(2 * PAGE)
    assert "overruns the announced total" in first_error(raw + body).message


def test_block_list_with_unaligned_or_duplicate_entries():
    raw = PRE + encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4)
    unaligned = BE64.pack(2 * PAGE | 4) + b"\x01a" + BE64.pack(100)
    assert "not a multiple of the target page size" in first_error(raw + unaligned).message
    twice = BE64.pack(2 * PAGE | 4) + (b"\x01a" + BE64.pack(PAGE)) * 2
    assert first_error(raw + twice).message == "RAM block a listed twice"


def test_many_empty_blocks_are_bounded():
    raw = PRE + encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4)
    body = BE64.pack(PAGE | 4) + b"".join(b"\x04" + b"%04x" % i + BE64.pack(0)
                                          for i in range(5000))
    assert first_error(raw + body).message == "More than 4096 RAM blocks"


# --- properties -----------------------------------------------------------------------


def run_hostile(raw: bytes, cuts: list[int], **options) -> StreamError | None:
    """Feed ``raw`` in pieces; only StreamError may escape, with a sane offset."""
    dec = StreamDecoder(KINDS, **options)
    points = [0, *sorted(set(cuts)), len(raw)]
    try:
        for a, b in zip(points, points[1:], strict=False):
            if b > a:
                dec.receive_data(raw[a:b])
                while dec.next_event() is not NEED_DATA:
                    pass
        dec.receive_data(b"")
        for _ in range(10 * len(raw) + 10):
            ev = dec.next_event()
            assert ev is not NEED_DATA  # after the end of data: an event or an error
            if isinstance(ev, Closed):
                return None
        pytest.fail("decoder did not finish")
    except StreamError as exc:
        assert isinstance(exc.offset, int) and 0 <= exc.offset <= len(raw)
        assert exc.section is None or isinstance(exc.section, str)
        assert not exc.message.startswith(INTERNAL), exc.message
        assert str(exc)
        return exc
    return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_raise_only_stream_error(raw, cuts):
    run_hostile(raw, cuts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_after_a_valid_preamble(raw, cuts):
    prefix = PRE + RAM_START
    run_hostile(prefix + raw, [c + len(prefix) for c in cuts])


SAMPLE = sample_stream()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255)),
                min_size=1, max_size=4),
       st.lists(st.integers(0, len(SAMPLE)), max_size=4))
def test_flipped_bytes_raise_only_stream_error(flips, cuts):
    raw = bytearray(SAMPLE)
    for pos, xor in flips:
        raw[pos] ^= xor
    run_hostile(bytes(raw), cuts, buffer_size=4096)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SAMPLE)), st.binary(min_size=1, max_size=16),
       st.integers(0, len(SAMPLE)))
def test_inserted_or_cut_bytes_raise_only_stream_error(pos, junk, cut_len):
    run_hostile(SAMPLE[:pos] + junk + SAMPLE[pos:], [pos])
    run_hostile(SAMPLE[:pos] + SAMPLE[pos + cut_len // 8:], [])


def test_every_truncation_of_the_sample_raises_truncated():
    for k in range(0, len(SAMPLE), 7):
        err = run_hostile(SAMPLE[:k], [k // 2])
        assert err is not None and err.message.startswith("Truncated migration stream")


def test_the_sample_itself_is_valid():
    assert run_hostile(SAMPLE, []) is None


def test_errors_are_wire_errors_and_picklable():
    import pickle

    err = first_error(b"QEVX\0\0\0\3")
    assert isinstance(err, WireError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.message, copy.offset, copy.section) == (err.message, err.offset, err.section)
    assert "at stream offset 0" in str(err)
