"""livemig.wire: QEMU 10.0's migration stream and return path, sans-IO.

Bytes in, objects out (``StreamDecoder``, ``ReturnPathDecoder``); objects in,
bytes out (``encode_*``). No sockets, threads or files here: the transport
layer feeds these from its own threads. Modules:

* ``constants``: QEMU's numbers and names (section types, MIG_CMD_*,
  RAM_SAVE_FLAG_*, MIG_RP_MSG_*, VFIO tags) and the fixed wire structs.
* ``errors``: ``WireError`` > ``StreamError`` / ``ReturnPathError``.
* ``events``: what ``StreamDecoder.next_event()`` returns, and ``NEED_DATA``.
* ``stream``: top-level record encoders and ``StreamDecoder``.
* ``ram``: RAM record encoders (vectorised) and the page-run scanner.
* ``payloads``: ``PayloadKind`` and the TAGGED / BLOB framings.
* ``return_path``: return-path encoders, events and ``ReturnPathDecoder``.
* ``buffer``: the receive buffer both decoders share.
"""

from .constants import (
    MIG_RP_MSG_X_ERROR,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    TARGET_PAGE_SIZE,
    MigCmd,
    MigRpMsg,
    SectionType,
    VfioMigFlag,
)
from .errors import ReturnPathError, StreamError, WireError
from .events import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    Configuration,
    Eof,
    Header,
    NeedData,
    RamBlockList,
    RamEos,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamEvent,
    TaggedData,
    TaggedEnd,
    VmDescription,
)
from .payloads import (
    PayloadKind,
    encode_blob,
    encode_tagged_data,
    encode_tagged_end,
    encode_tagged_marker,
)
from .ram import (
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
)
from .return_path import (
    Pong,
    ReturnPathDecoder,
    RpEvent,
    RpMessage,
    Shut,
    SwitchoverAck,
    XError,
    encode_pong,
    encode_rp_message,
    encode_shut,
    encode_switchover_ack,
    encode_x_error,
)
from .stream import (
    StreamDecoder,
    encode_command,
    encode_configuration,
    encode_eof,
    encode_footer,
    encode_header,
    encode_ping,
    encode_section_header,
    encode_vmdesc,
)

__all__ = [
    "MIG_RP_MSG_X_ERROR",
    "NEED_DATA",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "TARGET_PAGE_SIZE",
    "Blob",
    "Closed",
    "Command",
    "Configuration",
    "Eof",
    "Header",
    "MigCmd",
    "MigRpMsg",
    "NeedData",
    "PayloadKind",
    "Pong",
    "RamBlockList",
    "RamEos",
    "RamPages",
    "RamZeroPages",
    "ReturnPathDecoder",
    "ReturnPathError",
    "RpEvent",
    "RpMessage",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "SectionType",
    "Shut",
    "StreamDecoder",
    "StreamError",
    "StreamEvent",
    "SwitchoverAck",
    "TaggedData",
    "TaggedEnd",
    "VfioMigFlag",
    "VmDescription",
    "WireError",
    "XError",
    "encode_blob",
    "encode_command",
    "encode_configuration",
    "encode_eof",
    "encode_footer",
    "encode_header",
    "encode_ping",
    "encode_pong",
    "encode_ram_block_list",
    "encode_ram_eos",
    "encode_ram_pages",
    "encode_ram_zero_pages",
    "encode_rp_message",
    "encode_section_header",
    "encode_shut",
    "encode_switchover_ack",
    "encode_tagged_data",
    "encode_tagged_end",
    "encode_tagged_marker",
    "encode_vmdesc",
    "encode_x_error",
]
