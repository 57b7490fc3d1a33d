"""Numbers of QEMU 10.0's migration stream and return path, with QEMU's names.

All multi-byte integers on the wire are big-endian. Sources (QEMU v10.0.0):
``migration/savevm.[ch]`` (file header, section types, MIG_CMD_*),
``migration/ram.h`` (RAM_SAVE_FLAG_*), ``migration/migration.c`` (MIG_RP_MSG_*),
``include/hw/vfio/vfio-common.h`` (VFIO_MIG_FLAG_*). The struct formats below
are the fixed-size parts of each wire record; ``tests/unit/test_wire_structs.py``
checks their sizes against the spec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

# --- file header (migration/savevm.h) ------------------------------------------------

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT: Final = 0x00000002  # rejected: "SaveVM v2 format is obsolete"
QEMU_VM_FILE_VERSION: Final = 0x00000003


class SectionType(IntEnum):
    """The type byte that starts every top-level record (``QEMU_VM_*``)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


QEMU_VM_EOF: Final = SectionType.EOF
QEMU_VM_SECTION_START: Final = SectionType.SECTION_START
QEMU_VM_SECTION_PART: Final = SectionType.SECTION_PART
QEMU_VM_SECTION_END: Final = SectionType.SECTION_END
QEMU_VM_SECTION_FULL: Final = SectionType.SECTION_FULL
QEMU_VM_SUBSECTION: Final = SectionType.SUBSECTION
QEMU_VM_VMDESCRIPTION: Final = SectionType.VMDESCRIPTION
QEMU_VM_CONFIGURATION: Final = SectionType.CONFIGURATION
QEMU_VM_COMMAND: Final = SectionType.COMMAND
QEMU_VM_SECTION_FOOTER: Final = SectionType.SECTION_FOOTER

# Name of the configuration vmstate and its subsections (migration/savevm.c).
CONFIGURATION_VMSD_NAME: Final = "configuration"
CONFIGURATION_UUID_SUBSECTION: Final = "configuration/uuid"
CONFIGURATION_UUID_VERSION: Final = 1
UUID_BYTES: Final = 16

# --- QEMU_VM_COMMAND sub-commands (enum qemu_vm_cmd, mig_cmd_args[]) ---------------


class MigCmd(IntEnum):
    """``MIG_CMD_*``: the be16 command number of a QEMU_VM_COMMAND record."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11
    MAX = 12


MIG_CMD_INVALID: Final = MigCmd.INVALID
MIG_CMD_OPEN_RETURN_PATH: Final = MigCmd.OPEN_RETURN_PATH
MIG_CMD_PING: Final = MigCmd.PING
MIG_CMD_POSTCOPY_ADVISE: Final = MigCmd.POSTCOPY_ADVISE
MIG_CMD_POSTCOPY_LISTEN: Final = MigCmd.POSTCOPY_LISTEN
MIG_CMD_POSTCOPY_RUN: Final = MigCmd.POSTCOPY_RUN
MIG_CMD_POSTCOPY_RAM_DISCARD: Final = MigCmd.POSTCOPY_RAM_DISCARD
MIG_CMD_PACKAGED: Final = MigCmd.PACKAGED
MIG_CMD_ENABLE_COLO: Final = MigCmd.ENABLE_COLO
MIG_CMD_POSTCOPY_RESUME: Final = MigCmd.POSTCOPY_RESUME
MIG_CMD_RECV_BITMAP: Final = MigCmd.RECV_BITMAP
MIG_CMD_SWITCHOVER_START: Final = MigCmd.SWITCHOVER_START
MIG_CMD_MAX: Final = MigCmd.MAX


@dataclass(frozen=True)
class CmdArgs:
    """One row of QEMU's ``mig_cmd_args[]`` / ``rp_cmd_args[]``: payload length
    in bytes (``None`` = variable, QEMU's -1) and the name used in error texts."""

    len: int | None
    name: str


# QEMU's table; ENABLE_COLO has no entry there (so its length is 0 by zero-init).
MIG_CMD_ARGS: Final[dict[MigCmd, CmdArgs]] = {
    MigCmd.INVALID: CmdArgs(None, "INVALID"),
    MigCmd.OPEN_RETURN_PATH: CmdArgs(0, "OPEN_RETURN_PATH"),
    MigCmd.PING: CmdArgs(4, "PING"),
    MigCmd.POSTCOPY_ADVISE: CmdArgs(None, "POSTCOPY_ADVISE"),
    MigCmd.POSTCOPY_LISTEN: CmdArgs(0, "POSTCOPY_LISTEN"),
    MigCmd.POSTCOPY_RUN: CmdArgs(0, "POSTCOPY_RUN"),
    MigCmd.POSTCOPY_RAM_DISCARD: CmdArgs(None, "POSTCOPY_RAM_DISCARD"),
    MigCmd.PACKAGED: CmdArgs(4, "PACKAGED"),
    MigCmd.ENABLE_COLO: CmdArgs(0, "ENABLE_COLO"),
    MigCmd.POSTCOPY_RESUME: CmdArgs(0, "POSTCOPY_RESUME"),
    MigCmd.RECV_BITMAP: CmdArgs(None, "RECV_BITMAP"),
    MigCmd.SWITCHOVER_START: CmdArgs(0, "SWITCHOVER_START"),
    MigCmd.MAX: CmdArgs(None, "MAX"),
}

# PACKAGED carries at most this many bytes of stream (MAX_VM_CMD_PACKAGED_SIZE).
MAX_VM_CMD_PACKAGED_SIZE: Final = 1 << 24
# A RECV_BITMAP's bitmap ends with this be64 (RAMBLOCK_RECV_BITMAP_ENDING, ram.c).
RAMBLOCK_RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF
# RESUME_ACK's value (MIGRATION_RESUME_ACK_VALUE, migration.h).
MIGRATION_RESUME_ACK_VALUE: Final = 1

# --- RAM section ("ram", instance 0, version 4; migration/ram.[ch]) ----------------

TARGET_PAGE_BITS: Final = 12
TARGET_PAGE_SIZE: Final = 1 << TARGET_PAGE_BITS  # bytes (x86)
TARGET_PAGE_MASK: Final = ~(TARGET_PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF  # as a u64
RAM_FLAGS_MASK: Final = TARGET_PAGE_SIZE - 1  # flags live in the low bits of the address

RAM_SAVE_FLAG_FULL: Final = 0x001  # obsolete since 2009
RAM_SAVE_FLAG_ZERO: Final = 0x002
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x004
RAM_SAVE_FLAG_PAGE: Final = 0x008
RAM_SAVE_FLAG_EOS: Final = 0x010
RAM_SAVE_FLAG_CONTINUE: Final = 0x020
RAM_SAVE_FLAG_XBZRLE: Final = 0x040
RAM_SAVE_FLAG_HOOK: Final = 0x080  # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100  # removed in 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200

RAM_SECTION_IDSTR: Final = "ram"
RAM_SECTION_VERSION: Final = 4
RAM_BLOCK_NAME_MAX: Final = 255  # u8 length prefix

# --- VFIO-style tagged payload (include/hw/vfio/vfio-common.h, 10.0) ---------------


class VfioMigFlag(IntEnum):
    """``VFIO_MIG_FLAG_*``: be64 tags of a TAGGED section payload."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005


VFIO_MIG_FLAG_END_OF_STATE: Final = VfioMigFlag.END_OF_STATE
VFIO_MIG_FLAG_DEV_CONFIG_STATE: Final = VfioMigFlag.DEV_CONFIG_STATE
VFIO_MIG_FLAG_DEV_SETUP_STATE: Final = VfioMigFlag.DEV_SETUP_STATE
VFIO_MIG_FLAG_DEV_DATA_STATE: Final = VfioMigFlag.DEV_DATA_STATE
VFIO_MIG_FLAG_DEV_INIT_DATA_SENT: Final = VfioMigFlag.DEV_INIT_DATA_SENT

# --- return path (enum mig_rp_message_type, rp_cmd_args[]; migration/migration.c) ---


class MigRpMsg(IntEnum):
    """``MIG_RP_MSG_*``: be16 type of a return-path message."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7
    MAX = 8
    # livemig's own, never sent by QEMU (a QEMU source would reject it as
    # invalid): UTF-8 text of at most 512 bytes saying why the destination failed.
    X_ERROR = 0x4C01
    # livemig's own: what loading costs the destination (JSON, at most 512 bytes),
    # sent only to a source that said hello (MIG_CMD_PING LIVEMIG_HELLO).
    X_LOAD_COSTS = 0x4C02


MIG_RP_MSG_INVALID: Final = MigRpMsg.INVALID
MIG_RP_MSG_SHUT: Final = MigRpMsg.SHUT
MIG_RP_MSG_PONG: Final = MigRpMsg.PONG
MIG_RP_MSG_REQ_PAGES_ID: Final = MigRpMsg.REQ_PAGES_ID
MIG_RP_MSG_REQ_PAGES: Final = MigRpMsg.REQ_PAGES
MIG_RP_MSG_RECV_BITMAP: Final = MigRpMsg.RECV_BITMAP
MIG_RP_MSG_RESUME_ACK: Final = MigRpMsg.RESUME_ACK
MIG_RP_MSG_SWITCHOVER_ACK: Final = MigRpMsg.SWITCHOVER_ACK
MIG_RP_MSG_MAX: Final = MigRpMsg.MAX
MIG_RP_MSG_X_ERROR: Final = MigRpMsg.X_ERROR
MIG_RP_MSG_X_LOAD_COSTS: Final = MigRpMsg.X_LOAD_COSTS
# A livemig source's MIG_CMD_PING value after its first ping: "I read livemig's
# return-path messages". A QEMU destination only echoes it as a PONG; a
# livemig destination then may send X_ERROR and X_LOAD_COSTS. 'LMIG'.
LIVEMIG_HELLO: Final = 0x4C4D4947

RP_MAX_PAYLOAD: Final = 512  # bytes: the source's receive buffer (uint8_t buf[512])

RP_CMD_ARGS: Final[dict[MigRpMsg, CmdArgs]] = {
    MigRpMsg.INVALID: CmdArgs(None, "INVALID"),
    MigRpMsg.SHUT: CmdArgs(4, "SHUT"),
    MigRpMsg.PONG: CmdArgs(4, "PONG"),
    MigRpMsg.REQ_PAGES: CmdArgs(12, "REQ_PAGES"),
    MigRpMsg.REQ_PAGES_ID: CmdArgs(None, "REQ_PAGES_ID"),
    MigRpMsg.RECV_BITMAP: CmdArgs(None, "RECV_BITMAP"),
    MigRpMsg.RESUME_ACK: CmdArgs(4, "RESUME_ACK"),
    MigRpMsg.SWITCHOVER_ACK: CmdArgs(0, "SWITCHOVER_ACK"),
    MigRpMsg.MAX: CmdArgs(None, "MAX"),
    MigRpMsg.X_ERROR: CmdArgs(None, "X_ERROR"),
    MigRpMsg.X_LOAD_COSTS: CmdArgs(None, "X_LOAD_COSTS"),
}

# --- fixed-size wire structs ---------------------------------------------------------

FILE_HEADER: Final = struct.Struct(">II")  # magic, version
SECTION_SHORT_HEADER: Final = struct.Struct(">BI")  # type, section_id (PART/END)
SECTION_FULL_HEADER_HEAD: Final = struct.Struct(">BIB")  # type, section_id, idstr len
SECTION_FULL_HEADER_TAIL: Final = struct.Struct(">II")  # instance_id, version_id
SECTION_FOOTER: Final = struct.Struct(">BI")  # 0x7e, section_id
COMMAND_HEADER: Final = struct.Struct(">BHH")  # 0x08, cmd, len
CONFIGURATION_HEADER: Final = struct.Struct(">BI")  # 0x07, name len
SUBSECTION_HEAD: Final = struct.Struct(">BB")  # 0x05, name len
VMDESC_HEADER: Final = struct.Struct(">BI")  # 0x06, json len
BE16: Final = struct.Struct(">H")
BE32: Final = struct.Struct(">I")
BE64: Final = struct.Struct(">Q")
RAM_ADDR: Final = BE64  # offset | flags
RAM_PAGE_STRIDE: Final = RAM_ADDR.size + TARGET_PAGE_SIZE  # 4104: one PAGE|CONTINUE record
RAM_ZERO_STRIDE: Final = RAM_ADDR.size + 1  # 9: one ZERO|CONTINUE record
TAGGED_DATA_HEADER: Final = struct.Struct(">QQ")  # DEV_DATA_STATE, size
BLOB_HEADER: Final = BE32  # livemig's own framing: be32 length
RP_HEADER: Final = struct.Struct(">HH")  # type, len

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024  # bytes: cap on any length read from the wire
