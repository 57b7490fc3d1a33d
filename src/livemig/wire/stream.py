"""The main migration stream (source -> destination): encoders and a sans-IO decoder.

Encoders return the exact bytes QEMU 10.0 puts on the wire for each record;
the caller concatenates and sends them. ``StreamDecoder`` is h11-style: it owns
no socket; feed it bytes (``receive_data`` or ``get_buffer``/``buffer_updated``)
and pull events (``next_event``) until ``NEED_DATA``. Everything it does on the
destination's "load" side mirrors ``qemu_loadvm_state`` and ``ram_load_precopy``
closely enough that error texts are QEMU's.

RAM records are re-exported from ``livemig.wire.ram``; TAGGED and BLOB framings
from ``livemig.wire.payloads``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .buffer import DEFAULT_CAPACITY, ReceiveBuffer
from .constants import (
    BE32,
    BE64,
    COMMAND_HEADER,
    CONFIGURATION_HEADER,
    CONFIGURATION_UUID_SUBSECTION,
    CONFIGURATION_UUID_VERSION,
    CONFIGURATION_VMSD_NAME,
    DEFAULT_MAX_PAYLOAD,
    FILE_HEADER,
    MAX_VM_CMD_PACKAGED_SIZE,
    MIG_CMD_ARGS,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_ADDR,
    RAM_FLAGS_MASK,
    RAM_PAGE_STRIDE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RAM_ZERO_STRIDE,
    SECTION_FOOTER,
    SECTION_FULL_HEADER_HEAD,
    SECTION_FULL_HEADER_TAIL,
    SECTION_SHORT_HEADER,
    SUBSECTION_HEAD,
    TAGGED_DATA_HEADER,
    TARGET_PAGE_MASK,
    TARGET_PAGE_SIZE,
    UUID_BYTES,
    VMDESC_HEADER,
    MigCmd,
    SectionType,
    VfioMigFlag,
)
from .errors import StreamError, unknown_section_text
from .events import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    Configuration,
    Eof,
    Header,
    NeedDataT,
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
    StreamEvent,
    TaggedData,
    TaggedEnd,
    VmDescription,
    VMStateRecord,
)
from .global_state import GLOBAL_STATE_SIZE, decode_global_state
from .payloads import (
    TAGGED_END_TAGS,
    TAGGED_MARKER_TAGS,
    PayloadKind,
    encode_blob,
    encode_tagged_data,
    encode_tagged_end,
    encode_tagged_marker,
)
from .ram import (
    PAGE_CONTINUE,
    RAM_OFFSET_LIMIT,
    ZERO_CONTINUE,
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_pages,
    encode_ram_zero_pages,
    scan_continue_run,
)
from .vmstate.codec import VMStateDescription, VMStateError, VMStateTruncated
from .vmstate.codec import decode as decode_vmstate

__all__ = [
    "StreamDecoder",
    "encode_blob",
    "encode_command",
    "encode_configuration",
    "encode_eof",
    "encode_footer",
    "encode_header",
    "encode_ping",
    "encode_ram_block_list",
    "encode_ram_eos",
    "encode_ram_pages",
    "encode_ram_zero_pages",
    "encode_section_header",
    "encode_tagged_data",
    "encode_tagged_end",
    "encode_tagged_marker",
    "encode_vmdesc",
]

RAM_BLOCKS_MAX = 4096  # far above any real machine (q35: 6); bounds decoder memory

# --- encoders -------------------------------------------------------------------------


def encode_header() -> bytes:
    """Magic "QEVM" and version 3."""
    return FILE_HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def encode_configuration(machine_type: str, uuid: bytes | None = None) -> bytes:
    """QEMU_VM_CONFIGURATION: be32 len, machine type name; with ``uuid`` (16
    raw bytes) also the ``configuration/uuid`` subsection (version 1)."""
    name = machine_type.encode("utf-8")
    out = CONFIGURATION_HEADER.pack(SectionType.CONFIGURATION, len(name)) + name
    if uuid is not None:
        if len(uuid) != UUID_BYTES:
            raise ValueError(f"uuid must be {UUID_BYTES} bytes")
        sub = CONFIGURATION_UUID_SUBSECTION.encode()
        out += (SUBSECTION_HEAD.pack(SectionType.SUBSECTION, len(sub)) + sub
                + BE32.pack(CONFIGURATION_UUID_VERSION) + bytes(uuid))
    return out


def encode_command(cmd: MigCmd | int, payload: bytes = b"") -> bytes:
    """QEMU_VM_COMMAND: be16 cmd, be16 len, payload; fixed lengths are enforced."""
    try:
        cmd = MigCmd(cmd)
    except ValueError:
        raise ValueError(f"unknown MIG_CMD {cmd}") from None
    if cmd in (MigCmd.INVALID, MigCmd.MAX):
        raise ValueError(f"MIG_CMD {cmd.name} cannot be sent")
    expected = MIG_CMD_ARGS[cmd].len
    if expected is not None and len(payload) != expected:
        raise ValueError(f"{cmd.name} takes {expected} payload bytes, not {len(payload)}")
    if len(payload) > 0xFFFF:
        raise ValueError("command payload longer than 65535 bytes")
    return COMMAND_HEADER.pack(SectionType.COMMAND, cmd, len(payload)) + bytes(payload)


def encode_ping(value: int) -> bytes:
    """MIG_CMD_PING with its be32 value (QEMU's source sends 1 after OPEN_RETURN_PATH)."""
    return encode_command(MigCmd.PING, BE32.pack(value))


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{what} must fit in 32 bits, got {value}")


def encode_section_header(type: SectionType | int, section_id: int, idstr: str | None = None,
                          instance_id: int = 0, version_id: int = 0) -> bytes:
    """Full header for START/FULL (type, be32 id, u8 len, idstr, be32 instance,
    be32 version); short header for PART/END (type, be32 id)."""
    type = SectionType(type)
    _check_u32(section_id, "section_id")
    if type in (SectionType.SECTION_PART, SectionType.SECTION_END):
        return SECTION_SHORT_HEADER.pack(type, section_id)
    if type not in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        raise ValueError(f"{type.name} is not a section type")
    if idstr is None:
        raise ValueError(f"{type.name} needs an idstr")
    raw = idstr.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"idstr longer than 255 bytes: {idstr!r}")
    _check_u32(instance_id, "instance_id")
    _check_u32(version_id, "version_id")
    return (SECTION_FULL_HEADER_HEAD.pack(type, section_id, len(raw)) + raw
            + SECTION_FULL_HEADER_TAIL.pack(instance_id, version_id))


def encode_footer(section_id: int) -> bytes:
    """QEMU_VM_SECTION_FOOTER and the section's id."""
    _check_u32(section_id, "section_id")
    return SECTION_FOOTER.pack(SectionType.SECTION_FOOTER, section_id)


def encode_eof() -> bytes:
    """QEMU_VM_EOF: end of device state."""
    return bytes([SectionType.EOF])


def encode_vmdesc(json_bytes: bytes) -> bytes:
    """QEMU_VM_VMDESCRIPTION, be32 length, JSON (sent after EOF)."""
    if len(json_bytes) > 0xFFFF_FFFF:
        raise ValueError("VM description longer than 4 GiB")
    return VMDESC_HEADER.pack(SectionType.VMDESCRIPTION, len(json_bytes)) + bytes(json_bytes)


# --- decoder --------------------------------------------------------------------------


class _State(enum.Enum):
    HEADER = "header"
    CONFIGURATION = "configuration"
    RECORD = "record"  # expecting a top-level type byte
    PAYLOAD = "payload"  # inside a section, framing by PayloadKind
    FOOTER = "footer"
    AFTER_EOF = "after-eof"  # expecting QEMU_VM_VMDESCRIPTION
    DONE = "done"
    ERROR = "error"


# Where the peer's data ended, for the truncation error.
_TRUNCATED_WHERE = {
    _State.HEADER: "in the file header",
    _State.CONFIGURATION: "in the configuration section",
    _State.RECORD: "inside a record",
    _State.PAYLOAD: "inside a section payload",
    _State.FOOTER: "before the section footer",
    _State.AFTER_EOF: "inside the VM description",
    _State.DONE: "after the VM description",
}

_INTERNAL = "Malformed migration stream (decoder could not parse it)"


@dataclass
class _Section:
    section_id: int
    idstr: str
    kind: PayloadKind
    version_id: int = 0


@dataclass
class _RamListProgress:
    """A MEM_SIZE record being read, entry by entry (each entry is committed)."""

    total: int
    remaining: int
    blocks: list[tuple[str, int]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


_Result = StreamEvent | NeedDataT | None  # None: consumed bytes, keep going


class StreamDecoder:
    """Sans-IO decoder of a QEMU 10.0 migration stream (destination side).

    ``payload_kinds`` maps each section idstr the destination accepts to its
    framing; a START/FULL for any other idstr is refused the way QEMU refuses
    an unknown device. Options: ``max_payload`` caps every length read from
    the wire (BLOB, TAGGED chunk, machine type, VM description; bytes), so
    hostile input cannot make the decoder allocate without bound;
    ``expect_configuration`` and ``section_footers`` mirror QEMU's machine
    properties ``send-configuration`` and ``send-section-footer`` (both on for
    10.0 machine types); ``buffer_size`` is the initial receive buffer (bytes).

    Feeding: ``receive_data(data)`` copies; for the zero-copy path call
    ``get_buffer(min_size)``, ``sock.recv_into()`` it, then
    ``buffer_updated(nbytes)``. ``receive_data(b"")`` / ``buffer_updated(0)``
    report the end of the peer's data. Give it big reads (>= 1 MiB): a batch of
    pages never spans more than what is buffered.

    ``next_event()`` returns one event or ``NEED_DATA``; on a protocol
    violation it raises ``StreamError`` (and raises it again on every later
    call). It raises nothing else on any input. ``RamPages.data`` is a view
    into the receive buffer, valid only until the next call into the decoder.

    RAM: the "last block" for CONTINUE persists across sections, as QEMU's
    ``last_recv_block``. Page and zero records are checked against the block
    list of the latest MEM_SIZE record (unknown block -> ``Can't find block``,
    offset past the block's length -> ``Illegal RAM offset``), so consumers may
    index their RAM with the offsets directly. Assumes the capabilities that
    change RAM framing are off (postcopy-ram page sizes, x-ignore-shared,
    mapped-ram, xbzrle, rdma); MULTIFD_FLUSH records come out as ``RamMultifdFlush`` (ignore them
    without multifd, as QEMU does). Section versions are reported, not checked.
    """

    def __init__(self, payload_kinds: Mapping[str, PayloadKind], *,
                 vmstate: Mapping[str, VMStateDescription] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD,
                 expect_configuration: bool = True,
                 section_footers: bool = True,
                 buffer_size: int = DEFAULT_CAPACITY) -> None:
        self._kinds = dict(payload_kinds)
        self._vmstate = dict(vmstate or {})
        for idstr, kind in self._kinds.items():
            if not isinstance(kind, PayloadKind):
                raise TypeError(f"payload kind for {idstr!r} must be a PayloadKind")
            if kind is PayloadKind.VMSTATE and idstr not in self._vmstate:
                raise TypeError(f"VMSTATE section {idstr!r} needs its VMState description")
        self._max_payload = max_payload
        self._expect_configuration = expect_configuration
        self._section_footers = section_footers
        self._rb = ReceiveBuffer(buffer_size)
        self._buffer_size = buffer_size
        self._state = _State.HEADER
        self._error: StreamError | None = None
        self._versions: dict[int, int] = {}  # stream section id -> its version_id
        self._sections: dict[int, tuple[str, PayloadKind]] = {}  # stream section id ->
        self._section: _Section | None = None
        self._ram_blocks: dict[str, int] = {}  # idstr -> used_length (bytes)
        self._last_block: str | None = None
        self._ram_list: _RamListProgress | None = None
        self._package_end: int | None = None   # stream offset where a PACKAGED ends
        # Offset of the page after the last PAGE record decoded, while the next
        # record may continue that run (see ram_run_point).
        self._next_page: int | None = None
        # Transitions are data: each state has one reader.
        self._readers: dict[_State, Callable[[], _Result]] = {
            _State.HEADER: self._read_header,
            _State.CONFIGURATION: self._read_configuration,
            _State.RECORD: self._read_record,
            _State.PAYLOAD: self._read_payload,
            _State.FOOTER: self._read_footer,
            _State.AFTER_EOF: self._read_vmdesc,
            _State.DONE: self._read_after_end,
        }
        self._payload_readers: dict[PayloadKind, Callable[[], _Result]] = {
            PayloadKind.RAM: self._read_ram,
            PayloadKind.TAGGED: self._read_tagged,
            PayloadKind.BLOB: self._read_blob,
            PayloadKind.GLOBALSTATE: self._read_global_state,
            PayloadKind.VMSTATE: self._read_vmstate,
        }

    # --- feeding ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append the peer's bytes (copied); ``b""`` means the peer's data ended."""
        self._rb.append(data)

    def get_buffer(self, min_size: int = 1) -> memoryview:
        """A writable view of free buffer space (>= ``min_size`` bytes) to
        ``recv_into``; report what was written with ``buffer_updated``."""
        return self._rb.reserve(min_size)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer`` view; 0 = end of data."""
        self._rb.commit(nbytes)

    @property
    def offset(self) -> int:
        """Absolute stream offset (bytes) of the first byte not yet decoded."""
        return self._rb.offset(self._rb.start)

    @property
    def ram_blocks(self) -> Mapping[str, int]:
        """RAM blocks of the latest MEM_SIZE record: idstr -> used_length (bytes)."""
        return dict(self._ram_blocks)

    # --- RAM pages placed by the caller (the destination's direct reads) -----------------

    def _in_ram_records(self) -> bool:
        return (self._state is _State.PAYLOAD and self._section is not None
                and self._section.kind is PayloadKind.RAM and self._ram_list is None
                and self._package_end is None and self._error is None and not self._rb.eof)

    def ram_run_point(self) -> tuple[str, int] | None:
        """(block, offset) when every byte received is decoded, the next byte
        begins a RAM record, and a ``PAGE|CONTINUE`` record for ``offset`` (the
        page after the last one decoded) would continue the run: where a
        caller may read the next records itself, page data straight into
        RAM, then report them with ``ram_pages_placed``. None otherwise."""
        if self._next_page is None or len(self._rb) or not self._in_ram_records():
            return None
        assert self._last_block is not None
        return self._last_block, self._next_page

    def ram_pages_placed(self, n: int) -> None:
        """The caller consumed the next ``n`` records itself, each checked to be
        ``PAGE|CONTINUE`` for the pages from ``ram_run_point()``'s offset on."""
        point = self.ram_run_point()
        if point is None or n <= 0:
            raise ValueError("ram_pages_placed without a run point")
        block, offset = point
        end = offset + n * TARGET_PAGE_SIZE
        if end > self._ram_blocks[block]:
            raise ValueError("ram_pages_placed past the end of the block")
        self._rb.base += n * RAM_PAGE_STRIDE    # consumed outside the buffer
        self._next_page = end if end < self._ram_blocks[block] else None

    def partial_page_record(self) -> tuple[int, int] | None:
        """(bytes missing, offset after it) when the undecoded bytes are the
        beginning of one ``PAGE|CONTINUE`` record: reading exactly the missing
        bytes ends the buffer on a record boundary. None otherwise."""
        rb = self._rb
        have = len(rb)
        if not 8 <= have < RAM_PAGE_STRIDE or not self._in_ram_records() \
                or self._last_block is None:
            return None
        addr = rb.unpack(RAM_ADDR, rb.start)[0]
        offset = addr & TARGET_PAGE_MASK
        if addr & RAM_FLAGS_MASK != RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE or \
                offset + TARGET_PAGE_SIZE > self._ram_blocks[self._last_block]:
            return None
        return RAM_PAGE_STRIDE - have, offset + TARGET_PAGE_SIZE

    # --- events -------------------------------------------------------------------------

    def next_event(self) -> StreamEvent | NeedDataT:
        """The next event, or ``NEED_DATA``; raises ``StreamError`` only."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                result = self._readers[self._state]()
                if result is None:
                    continue
                if result is NEED_DATA and self._rb.eof:
                    return self._end_of_data()
                return result
        except StreamError as exc:
            self._fail(exc)
            raise
        except (IndexError, ValueError, TypeError, OverflowError, KeyError,
                struct.error, UnicodeError) as exc:
            # Safety net: a decoder bug must still surface as the one error type.
            err = StreamError(f"{_INTERNAL}: {type(exc).__name__}: {exc}",
                              self.offset, self._section_name())
            self._fail(err)
            raise err from exc

    def _fail(self, exc: StreamError) -> None:
        self._error = exc
        self._state = _State.ERROR

    def _end_of_data(self) -> Closed:
        rb = self._rb
        if self._state in (_State.AFTER_EOF, _State.DONE) and len(rb) == 0:
            return Closed()
        raise self._err(f"Truncated migration stream: data ended "
                        f"{_TRUNCATED_WHERE.get(self._state, '')} "
                        f"({len(rb)} undecoded bytes)", rb.end)

    def _section_name(self) -> str | None:
        return self._section.idstr if self._section is not None else None

    def _err(self, message: str, pos: int, section: str | None = None) -> StreamError:
        """A StreamError at buffer index ``pos`` (converted to a stream offset)."""
        if section is None:
            section = self._section_name()
        return StreamError(message, self._rb.offset(pos), section)

    def _check_len(self, n: int, pos: int, what: str) -> None:
        if n > self._max_payload:
            raise self._err(f"{what} of {n} bytes exceeds the limit of "
                            f"{self._max_payload} bytes", pos)

    # --- top level ----------------------------------------------------------------------

    def _read_header(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, BE32.size):
            return NEED_DATA
        if rb.unpack(BE32, p)[0] != QEMU_VM_FILE_MAGIC:
            raise self._err("Not a migration stream", p)
        if not rb.has(p, FILE_HEADER.size):
            return NEED_DATA
        version = rb.unpack(BE32, p + 4)[0]
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise self._err("SaveVM v2 format is obsolete and don't work anymore", p + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise self._err("Unsupported migration stream version", p + 4)
        rb.start = p + FILE_HEADER.size
        self._state = _State.CONFIGURATION if self._expect_configuration else _State.RECORD
        return Header(version)

    def _read_configuration(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, 1):
            return NEED_DATA
        if rb.u8(p) != SectionType.CONFIGURATION:
            raise self._err("Configuration section missing", p)
        if not rb.has(p, CONFIGURATION_HEADER.size):
            return NEED_DATA
        n = rb.unpack(CONFIGURATION_HEADER, p)[1]
        self._check_len(n, p + 1, "Machine type name")
        q = p + CONFIGURATION_HEADER.size
        if not rb.has(q, n):
            return NEED_DATA
        try:
            machine_type = rb.bytes(q, n).decode("utf-8")
        except UnicodeDecodeError:
            raise self._err("Machine type name is not valid UTF-8", q) from None
        q += n
        uuid: bytes | None = None
        # Subsections follow while the next byte is QEMU_VM_SUBSECTION (a peek,
        # as vmstate_subsection_load does): the event waits for that byte.
        while True:
            if not rb.has(q, 1):
                return NEED_DATA
            if rb.u8(q) != SectionType.SUBSECTION:
                break
            if not rb.has(q, SUBSECTION_HEAD.size):
                return NEED_DATA
            ln = rb.u8(q + 1)
            r = q + SUBSECTION_HEAD.size
            if not rb.has(r, ln + BE32.size):
                return NEED_DATA
            name = rb.bytes(r, ln).decode("utf-8", "backslashreplace")
            version = rb.unpack(BE32, r + ln)[0]
            if name != CONFIGURATION_UUID_SUBSECTION or uuid is not None:
                raise self._err(f"VM subsection '{name}' in '{CONFIGURATION_VMSD_NAME}' "
                                "does not exist", q)
            if version > CONFIGURATION_UUID_VERSION:
                raise self._err(f"{name}: incoming version_id {version} is too new for local "
                                f"version_id {CONFIGURATION_UUID_VERSION}", r + ln)
            if version < CONFIGURATION_UUID_VERSION:
                raise self._err(f"{name}: incoming version_id {version} is too old for local "
                                f"minimum version_id  {CONFIGURATION_UUID_VERSION}", r + ln)
            r += ln + BE32.size
            if not rb.has(r, UUID_BYTES):
                return NEED_DATA
            uuid = rb.bytes(r, UUID_BYTES)
            q = r + UUID_BYTES
        rb.start = q
        self._state = _State.RECORD
        return Configuration(machine_type, uuid)

    def _read_record(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, 1):
            return NEED_DATA
        if self._package_end is not None:
            self._leave_package(p)
        t = rb.u8(p)
        if t == SectionType.EOF:
            if self._package_end is not None:
                raise self._err("CMD_PACKAGED: QEMU_VM_EOF inside the package", p)
            rb.start = p + 1
            self._state = _State.AFTER_EOF
            return Eof()
        if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            return self._read_full_header(p, t)
        if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
            return self._read_short_header(p, t)
        if t == SectionType.COMMAND:
            return self._read_command(p)
        raise self._err(f"Unknown savevm section type {t}", p)

    def _read_full_header(self, p: int, t: int) -> _Result:
        rb = self._rb
        head = SECTION_FULL_HEADER_HEAD
        if not rb.has(p, head.size):
            return NEED_DATA
        _, section_id, ln = rb.unpack(head, p)
        if not rb.has(p + head.size, ln + SECTION_FULL_HEADER_TAIL.size):
            return NEED_DATA
        try:
            idstr = rb.bytes(p + head.size, ln).decode("utf-8")
        except UnicodeDecodeError:
            raise self._err(f"Unable to read ID string for section {section_id}",
                            p + head.size - 1) from None
        instance_id, version_id = rb.unpack(SECTION_FULL_HEADER_TAIL, p + head.size + ln)
        kind = self._kinds.get(idstr)
        if kind is None:
            raise self._err(unknown_section_text(idstr, instance_id), p, idstr)
        self._sections[section_id] = (idstr, kind)
        self._versions[section_id] = version_id
        self._enter_section(section_id, idstr, kind)
        rb.start = p + head.size + ln + SECTION_FULL_HEADER_TAIL.size
        if t == SectionType.SECTION_START:
            return SectionStart(section_id, idstr, instance_id, version_id)
        return SectionFull(section_id, idstr, instance_id, version_id)

    def _read_short_header(self, p: int, t: int) -> _Result:
        rb = self._rb
        if not rb.has(p, SECTION_SHORT_HEADER.size):
            return NEED_DATA
        section_id = rb.unpack(SECTION_SHORT_HEADER, p)[1]
        entry = self._sections.get(section_id)
        if entry is None:
            raise self._err(f"Unknown savevm section {section_id}", p + 1)
        idstr, kind = entry
        self._enter_section(section_id, idstr, kind)
        rb.start = p + SECTION_SHORT_HEADER.size
        if t == SectionType.SECTION_PART:
            return SectionPart(section_id, idstr)
        return SectionEnd(section_id, idstr)

    def _enter_section(self, section_id: int, idstr: str, kind: PayloadKind) -> None:
        self._section = _Section(section_id, idstr, kind, self._versions.get(section_id, 0))
        self._state = _State.PAYLOAD

    def _read_command(self, p: int) -> _Result:
        rb = self._rb
        if not rb.has(p, COMMAND_HEADER.size):
            return NEED_DATA
        _, cmd, ln = rb.unpack(COMMAND_HEADER, p)
        if cmd == MigCmd.INVALID or cmd >= MigCmd.MAX:
            raise self._err(f"MIG_CMD 0x{cmd:x} unknown (len 0x{ln:x})", p + 1)
        mig_cmd = MigCmd(cmd)
        args = MIG_CMD_ARGS[mig_cmd]
        if args.len is not None and ln != args.len:
            raise self._err(f"{args.name} received with bad length - expecting {args.len}, "
                            f"got {ln}", p + 3)
        q = p + COMMAND_HEADER.size
        if not rb.has(q, ln):
            return NEED_DATA
        payload = rb.bytes(q, ln)
        if mig_cmd == MigCmd.PACKAGED:
            self._enter_package(p, payload)
        rb.start = q + ln
        return Command(mig_cmd, payload)

    def _enter_package(self, p: int, payload: bytes) -> None:
        """PACKAGED's be32 length: the records that follow, up to that many bytes,
        are the package (decoded in line; they must end exactly at its end)."""
        (length,) = BE32.unpack(payload)
        if length > MAX_VM_CMD_PACKAGED_SIZE:
            raise self._err(f"Unreasonably large packaged state: {length}", p + 5)
        if self._package_end is not None:
            raise self._err("CMD_PACKAGED inside a package", p)
        self._package_end = self._rb.offset(p + COMMAND_HEADER.size + BE32.size) + length

    def resume(self) -> None:
        """Postcopy recovery: a new channel goes on where the source resumes, at
        a record boundary and without a file header (QEMU's resumed stream).
        What the old channel left half-decoded is dropped (its pages are not
        received and come again); sections, RAM blocks and errors are reset,
        the section ids already announced are kept."""
        self._rb = ReceiveBuffer(self._buffer_size)
        self._error = None
        self._state = _State.RECORD
        self._section = None
        self._ram_list = None
        self._package_end = None

    @property
    def in_package(self) -> bool:
        """True while the records decoded come from a PACKAGED command."""
        return self._package_end is not None

    def _leave_package(self, p: int) -> None:
        end = self._package_end
        assert end is not None
        pos = self._rb.offset(p)
        if pos > end:
            raise self._err(f"CMD_PACKAGED: a record runs {pos - end} bytes past the "
                            "end of the package", p)
        if pos == end:
            self._package_end = None

    def _read_footer(self) -> _Result:
        sec = self._section
        assert sec is not None
        if not self._section_footers:
            self._section = None
            self._state = _State.RECORD
            return None
        rb = self._rb
        p = rb.start
        if not rb.has(p, 1):
            return NEED_DATA
        if rb.u8(p) != SectionType.SECTION_FOOTER:
            raise self._err(f"Missing section footer for {sec.idstr}", p)
        if not rb.has(p, SECTION_FOOTER.size):
            return NEED_DATA
        read_id = rb.unpack(SECTION_FOOTER, p)[1]
        if read_id != sec.section_id:
            raise self._err(f"Mismatched section id in footer for {sec.idstr} - "
                            f"read 0x{read_id:x} expected 0x{sec.section_id:x}", p + 1)
        rb.start = p + SECTION_FOOTER.size
        self._section = None
        self._state = _State.RECORD
        return SectionFooter(read_id)

    def _read_vmdesc(self) -> _Result:
        # QEMU only warns here (the device state is complete); we raise, and the
        # caller, having seen Eof, may choose to ignore it.
        rb = self._rb
        p = rb.start
        if not rb.has(p, 1):
            return NEED_DATA
        t = rb.u8(p)
        if t != SectionType.VMDESCRIPTION:
            raise self._err(f"Expected vmdescription section, but got {t}", p)
        if not rb.has(p, VMDESC_HEADER.size):
            return NEED_DATA
        n = rb.unpack(VMDESC_HEADER, p)[1]
        self._check_len(n, p + 1, "VM description")
        q = p + VMDESC_HEADER.size
        if not rb.has(q, n):
            return NEED_DATA
        data = rb.bytes(q, n)
        rb.start = q + n
        self._state = _State.DONE
        return VmDescription(data)

    def _read_after_end(self) -> _Result:
        if len(self._rb):
            raise self._err("Unexpected data after the end of the migration stream",
                            self._rb.start)
        return NEED_DATA

    # --- section payloads ---------------------------------------------------------------

    def _read_payload(self) -> _Result:
        assert self._section is not None
        return self._payload_readers[self._section.kind]()

    def _payload_done(self) -> None:
        self._state = _State.FOOTER
        self._next_page = None

    def _read_blob(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, BE32.size):
            return NEED_DATA
        n = rb.unpack(BE32, p)[0]
        self._check_len(n, p, "Blob")
        q = p + BE32.size
        if not rb.has(q, n):
            return NEED_DATA
        data = rb.bytes(q, n)
        rb.start = q + n
        self._payload_done()
        return Blob(data)

    def _read_global_state(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, 4):
            return NEED_DATA
        size = rb.unpack(BE32, p)[0]
        if size > 32:   # refused before the rest arrives
            raise self._err(f"globalstate: bad run state size {size} (1 < size <= 32)", p)
        if not rb.has(p, GLOBAL_STATE_SIZE):
            return NEED_DATA
        try:
            record = decode_global_state(rb.bytes(p, GLOBAL_STATE_SIZE))
        except ValueError as exc:
            raise self._err(str(exc), p) from None
        rb.start = p + GLOBAL_STATE_SIZE
        self._payload_done()
        return record

    def _read_vmstate(self) -> _Result:
        """A device's fields and subsections (wire.vmstate.codec); where they end
        shows only once the byte after them is here (or the data ended)."""
        assert self._section is not None
        sec, rb = self._section, self._rb
        try:
            values, end = decode_vmstate(self._vmstate[sec.idstr], rb.view[:rb.end], rb.start,
                                         sec.version_id, complete=rb.eof)
        except VMStateTruncated:
            return NEED_DATA        # at the end of data: the truncation error of next_event
        except VMStateError as exc:
            raise self._err(exc.message, exc.offset) from None
        rb.start = end
        self._payload_done()
        return VMStateRecord(sec.idstr, sec.version_id, values)

    def _read_tagged(self) -> _Result:
        rb = self._rb
        p = rb.start
        if not rb.has(p, BE64.size):
            return NEED_DATA
        tag = rb.unpack(BE64, p)[0]
        if tag == VfioMigFlag.DEV_DATA_STATE:
            if not rb.has(p, TAGGED_DATA_HEADER.size):
                return NEED_DATA
            n = rb.unpack(TAGGED_DATA_HEADER, p)[1]
            self._check_len(n, p + BE64.size, "Device state chunk")
            q = p + TAGGED_DATA_HEADER.size
            if not rb.has(q, n):
                return NEED_DATA
            data = rb.bytes(q, n)
            rb.start = q + n
            return TaggedData(VfioMigFlag.DEV_DATA_STATE, data)
        if tag in TAGGED_END_TAGS:
            rb.start = p + BE64.size
            self._payload_done()
            return TaggedEnd(VfioMigFlag(tag))
        if tag in TAGGED_MARKER_TAGS:
            rb.start = p + BE64.size
            return TaggedData(VfioMigFlag(tag), b"")
        raise self._err(f"{self._section_name()}: Unknown tag 0x{tag:x}", p)

    # --- RAM ----------------------------------------------------------------------------

    def _read_ram(self) -> _Result:
        if self._ram_list is not None:
            return self._read_ram_block_list()
        rb = self._rb
        p = rb.start
        if not rb.has(p, RAM_ADDR.size):
            return NEED_DATA
        addr = rb.unpack(RAM_ADDR, p)[0]
        flags = addr & RAM_FLAGS_MASK
        offset = addr & TARGET_PAGE_MASK
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind == RAM_SAVE_FLAG_PAGE:
            return self._read_ram_pages(p, offset, flags)
        self._next_page = None
        if kind == RAM_SAVE_FLAG_ZERO:
            return self._read_ram_zero_pages(p, offset, flags)
        if kind == RAM_SAVE_FLAG_EOS:
            rb.start = p + RAM_ADDR.size
            self._payload_done()
            return RamEos()
        if kind == RAM_SAVE_FLAG_MEM_SIZE:
            if offset >= RAM_OFFSET_LIMIT:
                raise self._err(f"RAM size 0x{offset:x} is too large", p)
            rb.start = p + RAM_ADDR.size
            self._ram_list = _RamListProgress(offset, offset)
            return None
        if kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            rb.start = p + RAM_ADDR.size  # a sync point; a no-op without multifd, as in QEMU
            return RamMultifdFlush()
        if kind in (RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_HOOK):
            raise self._err(f"Unsupported RAM flags 0x{flags:x}: the xbzrle and rdma "
                            "capabilities are not supported", p)
        raise self._err(f"Unknown combination of migration flags: 0x{flags:x}", p)

    def _read_ram_block_list(self) -> _Result:
        """Entries of a MEM_SIZE record (``parse_ramblocks``), committed one by one."""
        rb = self._rb
        lst = self._ram_list
        assert lst is not None
        while lst.remaining:
            p = rb.start
            if not rb.has(p, 1):
                return NEED_DATA
            ln = rb.u8(p)
            if not rb.has(p + 1, ln + BE64.size):
                return NEED_DATA
            raw = rb.bytes(p + 1, ln)
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._err(f"Unknown ramblock \"{raw.decode('utf-8', 'backslashreplace')}\","
                                " cannot accept migration", p) from None
            length = rb.unpack(BE64, p + 1 + ln)[0]
            if length % TARGET_PAGE_SIZE:
                raise self._err(f"Length of RAM block {name} is not a multiple of the "
                                f"target page size: 0x{length:x}", p + 1 + ln)
            if length > lst.remaining:
                raise self._err(f"RAM block {name} of 0x{length:x} bytes overruns the announced "
                                f"total (0x{lst.remaining:x} bytes left)", p + 1 + ln)
            if name in lst.names:
                raise self._err(f"RAM block {name} listed twice", p)
            if len(lst.blocks) >= RAM_BLOCKS_MAX:
                raise self._err(f"More than {RAM_BLOCKS_MAX} RAM blocks", p)
            lst.blocks.append((name, length))
            lst.names.add(name)
            lst.remaining -= length
            rb.start = p + 1 + ln + BE64.size
        self._ram_list = None
        self._ram_blocks = dict(lst.blocks)
        return RamBlockList(lst.total, tuple(lst.blocks))

    def _ram_block_from_stream(self, p: int, flags: int) -> tuple[str, int] | NeedDataT:
        """(block, index after the name) as ``ram_block_from_stream``; ``p`` is
        the record's address word."""
        rb = self._rb
        q = p + RAM_ADDR.size
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if self._last_block is None:
                raise self._err("Ack, bad migration stream!", p)
            name = self._last_block
        else:
            if not rb.has(q, 1):
                return NEED_DATA
            ln = rb.u8(q)
            if not rb.has(q + 1, ln):
                return NEED_DATA
            name = rb.bytes(q + 1, ln).decode("utf-8", "backslashreplace")
            q += 1 + ln
        if name not in self._ram_blocks:
            raise self._err(f"Can't find block {name}", p)
        return name, q

    def _read_ram_pages(self, p: int, offset: int, flags: int) -> _Result:
        found = self._ram_block_from_stream(p, flags)
        if found is NEED_DATA:
            return NEED_DATA
        block, d0 = found
        limit = self._ram_blocks[block]
        if offset >= limit:
            raise self._err(f"Illegal RAM offset {offset:x}", p)
        rb = self._rb
        if not rb.has(d0, TARGET_PAGE_SIZE):
            return NEED_DATA
        # Records after the first: address word i at d0 + 4096 + (i-1) * 4104.
        more = scan_continue_run(rb.buf, d0 + TARGET_PAGE_SIZE, rb.end, RAM_PAGE_STRIDE,
                                 PAGE_CONTINUE, limit)
        n = 1 + more.size
        offsets = np.empty(n, dtype=np.int64)
        offsets[0] = offset
        offsets[1:] = more
        data = np.ndarray((n, TARGET_PAGE_SIZE), dtype=np.uint8, buffer=rb.buf, offset=d0,
                          strides=(RAM_PAGE_STRIDE, 1))
        data.flags.writeable = False
        rb.start = d0 + TARGET_PAGE_SIZE + more.size * RAM_PAGE_STRIDE
        self._last_block = block
        after = int(offsets[-1]) + TARGET_PAGE_SIZE
        self._next_page = after if after < limit else None
        return RamPages(block, offsets, data)

    def _read_ram_zero_pages(self, p: int, offset: int, flags: int) -> _Result:
        found = self._ram_block_from_stream(p, flags)
        if found is NEED_DATA:
            return NEED_DATA
        block, z0 = found
        limit = self._ram_blocks[block]
        if offset >= limit:
            raise self._err(f"Illegal RAM offset {offset:x}", p)
        rb = self._rb
        if not rb.has(z0, 1):
            return NEED_DATA
        ch = rb.u8(z0)
        if ch != 0:
            raise self._err(f"Found a zero page with value {ch}", z0)
        more = scan_continue_run(rb.buf, z0 + 1, rb.end, RAM_ZERO_STRIDE, ZERO_CONTINUE,
                                 limit, zero_byte=True)
        offsets = np.empty(1 + more.size, dtype=np.int64)
        offsets[0] = offset
        offsets[1:] = more
        rb.start = z0 + 1 + more.size * RAM_ZERO_STRIDE
        self._last_block = block
        return RamZeroPages(block, offsets)

