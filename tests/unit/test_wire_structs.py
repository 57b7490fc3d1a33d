"""Wire constants and struct sizes against the spec, and bytes observed from QEMU 10.0.2.

Xen's habit: every fixed-size header's size is asserted against the spec, so
a typo in a struct format cannot hide. Observed bytes are from streams
QEMU 10.0.2 wrote (``migrate file:``) and QEMU's migration/*.c.
"""

from __future__ import annotations

import numpy as np
import pytest

from livemig.wire import (
    Command,
    Configuration,
    Header,
    MigCmd,
    MigRpMsg,
    PayloadKind,
    RamBlockList,
    RamEos,
    RamZeroPages,
    SectionFooter,
    SectionPart,
    SectionStart,
    SectionType,
    StreamDecoder,
    VfioMigFlag,
    encode_command,
    encode_configuration,
    encode_footer,
    encode_header,
    encode_ping,
    encode_pong,
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_zero_pages,
    encode_section_header,
    encode_shut,
    encode_switchover_ack,
)
from livemig.wire import constants as c
from livemig.wire.events import NEED_DATA

pytestmark = pytest.mark.timeout(30)


def hexbytes(text: str) -> bytes:
    """Bytes from the reference's hex notation: hex pairs and "quoted" strings."""
    out = bytearray()
    for token in text.split():
        if token.startswith('"'):
            out += token.strip('"').encode()
        else:
            out += bytes.fromhex(token)
    return bytes(out)


# --- struct sizes (spec section 2, 3) -------------------------------------------------

@pytest.mark.parametrize(("st", "size"), [
    (c.FILE_HEADER, 8),               # be32 magic, be32 version
    (c.SECTION_SHORT_HEADER, 5),      # u8 type, be32 section_id
    (c.SECTION_FULL_HEADER_HEAD, 6),  # u8 type, be32 section_id, u8 idstr len
    (c.SECTION_FULL_HEADER_TAIL, 8),  # be32 instance_id, be32 version_id
    (c.SECTION_FOOTER, 5),            # u8 0x7e, be32 section_id
    (c.COMMAND_HEADER, 5),            # u8 0x08, be16 cmd, be16 len
    (c.CONFIGURATION_HEADER, 5),      # u8 0x07, be32 len
    (c.SUBSECTION_HEAD, 2),           # u8 0x05, u8 name len
    (c.VMDESC_HEADER, 5),             # u8 0x06, be32 len
    (c.RAM_ADDR, 8),                  # be64 offset | flags
    (c.TAGGED_DATA_HEADER, 16),       # be64 DEV_DATA_STATE, be64 size
    (c.BLOB_HEADER, 4),               # be32 length
    (c.RP_HEADER, 4),                 # be16 type, be16 len
])
def test_struct_sizes_match_spec(st, size):
    assert st.size == size
    assert st.format.startswith(">")  # all big-endian, no padding


def test_record_strides():
    assert c.TARGET_PAGE_SIZE == 4096
    assert c.RAM_PAGE_STRIDE == 8 + 4096
    assert c.RAM_ZERO_STRIDE == 8 + 1


def test_constant_values_follow_qemu():
    assert c.QEMU_VM_FILE_MAGIC == 0x5145564D
    assert c.QEMU_VM_FILE_VERSION == 3
    assert [int(t) for t in SectionType] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7E]
    assert c.QEMU_VM_SECTION_FOOTER == 0x7E
    assert MigCmd.OPEN_RETURN_PATH == 1 and MigCmd.PING == 2
    assert MigCmd.SWITCHOVER_START == 11 and MigCmd.MAX == 12
    assert (c.RAM_SAVE_FLAG_ZERO, c.RAM_SAVE_FLAG_MEM_SIZE, c.RAM_SAVE_FLAG_PAGE,
            c.RAM_SAVE_FLAG_EOS, c.RAM_SAVE_FLAG_CONTINUE,
            c.RAM_SAVE_FLAG_MULTIFD_FLUSH) == (2, 4, 8, 0x10, 0x20, 0x200)
    assert MigRpMsg.SHUT == 1 and MigRpMsg.PONG == 2 and MigRpMsg.SWITCHOVER_ACK == 7
    assert MigRpMsg.MAX == 8 and c.MIG_RP_MSG_X_ERROR == 0x4C01
    assert c.RP_MAX_PAYLOAD == 512
    assert VfioMigFlag.END_OF_STATE == 0xFFFFFFFFEF100001
    assert VfioMigFlag.DEV_DATA_STATE == 0xFFFFFFFFEF100004
    assert VfioMigFlag.DEV_INIT_DATA_SENT == 0xFFFFFFFFEF100005


def test_command_and_rp_tables_cover_every_value():
    assert set(c.MIG_CMD_ARGS) == set(MigCmd)
    assert set(c.RP_CMD_ARGS) == set(MigRpMsg)
    fixed = {cmd: a.len for cmd, a in c.MIG_CMD_ARGS.items() if a.len is not None}
    assert fixed[MigCmd.PING] == 4 and fixed[MigCmd.PACKAGED] == 4
    assert fixed[MigCmd.OPEN_RETURN_PATH] == 0 and fixed[MigCmd.SWITCHOVER_START] == 0
    assert c.RP_CMD_ARGS[MigRpMsg.REQ_PAGES].len == 12
    assert c.RP_CMD_ARGS[MigRpMsg.SWITCHOVER_ACK].len == 0


# --- observed bytes (Appendix A) -----------------------------------------------------

APPENDIX_A_HEADER_AND_CONFIGURATION = hexbytes("""
    51 45 56 4d  00 00 00 03
    07 00 00 00 0b 70 63 2d 71 33 35 2d 31 30 2e 30
""")


def test_header_and_configuration_equal_observed_qemu_bytes():
    got = encode_header() + encode_configuration("pc-q35-10.0")
    assert got == APPENDIX_A_HEADER_AND_CONFIGURATION


def test_commands_equal_observed_qemu_bytes():
    assert encode_command(MigCmd.OPEN_RETURN_PATH) == hexbytes("08 00 01 00 00")
    assert encode_ping(1) == hexbytes("08 00 02 00 04 00 00 00 01")
    assert encode_command(MigCmd.PING, b"\0\0\0\1") == encode_ping(1)
    assert encode_command(MigCmd.SWITCHOVER_START) == hexbytes("08 00 0b 00 00")


def test_section_records_equal_observed_qemu_bytes():
    assert encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4) == hexbytes(
        "01 00 00 00 01 03 72 61 6d 00 00 00 00 00 00 00 04")
    assert encode_section_header(SectionType.SECTION_FULL, 0, "timer", 0, 2) == hexbytes(
        '04 00 00 00 00 05 "timer" 00000000 00000002')
    assert encode_section_header(SectionType.SECTION_PART, 1) == hexbytes("02 00 00 00 01")
    assert encode_section_header(SectionType.SECTION_END, 1) == hexbytes("03 00 00 00 01")
    assert encode_footer(1) == hexbytes("7e 00 00 00 01")
    assert encode_ram_eos() == hexbytes("00 00 00 00 00 00 00 10")


Q35_64M_BLOCKS = [
    ("pc.ram", 0x4000000), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000),
    ("pc.rom", 0x20000), ("/rom@etc/table-loader", 0x1000), ("/rom@etc/acpi/rsdp", 0x1000),
]


def test_ram_block_list_equals_observed_qemu_bytes():
    got = encode_ram_block_list(Q35_64M_BLOCKS)
    assert got.startswith(hexbytes('00 00 00 00 04 08 20 04  06 "pc.ram" 00 00 00 00 04 00 00 00'))
    assert sum(length for _, length in Q35_64M_BLOCKS) == 67641344  # ram.total observed


def test_zero_page_records_equal_observed_qemu_bytes():
    """Section 2.8: first PART record: zero pages at 0, 0x1000, 0x2000 of pc.ram."""
    expected = hexbytes('02 00000001  00000000 00000002 06 "pc.ram" 00'
                        '  00000000 00001022 00  00000000 00002022 00')
    got = (encode_section_header(SectionType.SECTION_PART, 1)
           + bytes(encode_ram_zero_pages("pc.ram", [0, 0x1000, 0x2000],
                                         first_has_block_name=True)))
    assert got == expected


def test_return_path_equals_observed_qemu_bytes():
    assert encode_switchover_ack() == hexbytes("00 07 00 00")
    assert encode_pong(1) == hexbytes("00 02 00 04 00 00 00 01")
    assert encode_shut(0) == hexbytes("00 01 00 04 00 00 00 00")


def test_decoder_reads_observed_stream_prefix():
    """The Appendix A source stream up to the first PART, as a QEMU source sends it."""
    stream = (APPENDIX_A_HEADER_AND_CONFIGURATION
              + hexbytes("08 00 01 00 00  08 00 02 00 04 00 00 00 01")
              + hexbytes("01 00 00 00 01 03 72 61 6d 00 00 00 00 00 00 00 04")
              + encode_ram_block_list(Q35_64M_BLOCKS)
              + hexbytes("00 00 00 00 00 00 00 10  7e 00 00 00 01")
              + hexbytes('02 00000001  00000000 00000002 06 "pc.ram" 00'
                         '  00000000 00001022 00  00000000 00002022 00'))
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    dec.receive_data(stream)
    events = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
    assert events[:7] == [
        Header(3), Configuration("pc-q35-10.0", None),
        Command(MigCmd.OPEN_RETURN_PATH, b""), Command(MigCmd.PING, b"\0\0\0\1"),
        SectionStart(1, "ram", 0, 4), RamBlockList(0x4082000, tuple(Q35_64M_BLOCKS)), RamEos(),
    ]
    assert events[7:9] == [SectionFooter(1), SectionPart(1, "ram")]
    zeros = events[9]
    assert isinstance(zeros, RamZeroPages) and zeros.block == "pc.ram"
    assert zeros.offsets.tolist() == [0, 0x1000, 0x2000]
    assert zeros.offsets.dtype == np.int64
    assert len(events) == 10
