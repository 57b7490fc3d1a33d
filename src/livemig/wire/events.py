"""Events the stream decoder returns, one per ``StreamDecoder.next_event()`` call.

Order in a well-formed precopy stream (QEMU 10.0)::

    Header, Configuration,
    (Command | section)*, Eof, [VmDescription], [Closed]

    section := SectionStart|SectionPart|SectionEnd|SectionFull,
               payload events, SectionFooter

Payload events depend on the section's ``PayloadKind``: RAM gives
``RamBlockList | RamPages | RamZeroPages`` then ``RamEos``; TAGGED gives
``TaggedData*`` then ``TaggedEnd``; BLOB gives one ``Blob``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from .constants import MigCmd, VfioMigFlag
from .global_state import GlobalStateRecord  # noqa: F401 - a payload event too


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (h11's idiom)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by ``next_event()`` when the bytes so far hold no complete event.

Not an error: feed more bytes and ask again. Once the peer's end of data has
been reported (``receive_data(b"")``), a stream that stops mid-record raises
instead."""

NeedDataT: TypeAlias = Literal[NeedData.NEED_DATA]


# --- top level --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """Magic and version were valid (version is always 3)."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """QEMU_VM_CONFIGURATION: the source's machine type (aliases resolved, e.g.
    ``pc-q35-10.0``) and the optional ``configuration/uuid`` subsection."""

    machine_type: str
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """QEMU_VM_COMMAND; ``payload`` length is already checked against QEMU's table."""

    cmd: MigCmd
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class SectionStart:
    """QEMU_VM_SECTION_START: setup data of an iterative handler (``ram``) follows."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    """QEMU_VM_SECTION_PART: one iteration; ``idstr`` resolved from the START."""

    section_id: int
    idstr: str


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """QEMU_VM_SECTION_END: the final (stop-copy) data of an iterative handler."""

    section_id: int
    idstr: str


@dataclass(frozen=True, slots=True)
class SectionFull:
    """QEMU_VM_SECTION_FULL: the whole state of a non-iterative device."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """QEMU_VM_SECTION_FOOTER, already checked to match the section's id."""

    section_id: int


@dataclass(frozen=True, slots=True)
class Eof:
    """QEMU_VM_EOF: all device state has been sent."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """QEMU_VM_VMDESCRIPTION after EOF: JSON for tools; QEMU reads and drops it."""

    json_bytes: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer's data ended (``receive_data(b"")``) at a clean point: after
    ``Eof`` or ``VmDescription``. Returned again on every later call."""


# --- RAM payload ("ram" section) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RamBlockList:
    """RAM_SAVE_FLAG_MEM_SIZE record: the source's migratable RAM blocks.

    ``total_bytes`` is the announced sum; ``blocks`` is ``(idstr, used_length)``
    in stream order, lengths in bytes (multiples of 4096, summing to the total).
    """

    total_bytes: int
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True, eq=False)
class RamPages:
    """A batch of consecutive RAM_SAVE_FLAG_PAGE records of one RAM block.

    ``offsets``: int64 byte offsets in the block (page aligned, checked to be
    inside the block's announced length), shape (n,). ``data``: uint8, shape
    (n, 4096), read-only. ``data`` is usually a strided *view into the decoder's
    receive buffer*: it is valid only until the next call into the decoder
    (``next_event``, ``receive_data``, ``get_buffer``, ``buffer_updated``).
    Copy it out (e.g. ``block_pages[offsets // 4096] = data``) before then.
    """

    block: str
    offsets: npt.NDArray[np.int64]
    data: npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True, eq=False)
class RamZeroPages:
    """A batch of consecutive RAM_SAVE_FLAG_ZERO records: these pages are zero.

    ``offsets``: int64 byte offsets in the block, shape (n,); an owned array.
    """

    block: str
    offsets: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RamEos:
    """RAM_SAVE_FLAG_EOS: end of this RAM section's payload."""


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: every multifd channel has a SYNC packet
    queued up to here; the destination waits for all of them before going on."""


# --- TAGGED payload (VFIO-style) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaggedData:
    """One tag inside a TAGGED payload.

    For ``DEV_DATA_STATE`` ``data`` is the chunk that followed the be64 size.
    ``DEV_CONFIG_STATE`` and ``DEV_SETUP_STATE`` are bare markers in livemig's
    framing (nothing follows them on the wire), reported with ``data == b""``.
    """

    tag: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TaggedEnd:
    """The tag that ends a TAGGED payload: ``END_OF_STATE`` or
    ``DEV_INIT_DATA_SENT`` (the latter: all initial data sent, see switchover-ack)."""

    tag: VfioMigFlag


# --- BLOB payload (livemig's own) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blob:
    """A BLOB payload: the bytes that followed the be32 length."""

    data: bytes


@dataclass(frozen=True, slots=True)
class VMStateRecord:
    """A VMSTATE payload decoded field by field (livemig.wire.vmstate.codec
    values: QEMU's field names, subsections by name)."""

    idstr: str
    version_id: int
    values: dict[str, Any]


StreamEvent: TypeAlias = (
    Header | Configuration | Command | SectionStart | SectionPart | SectionEnd | SectionFull
    | SectionFooter | Eof | VmDescription | Closed | RamBlockList | RamPages | RamZeroPages
    | RamEos | RamMultifdFlush | TaggedData | TaggedEnd | Blob | GlobalStateRecord | VMStateRecord
)
