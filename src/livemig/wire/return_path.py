"""The return path (destination -> source): message encoders and a sans-IO decoder.

Wire: be16 type, be16 payload length, payload (``migrate_send_rp_message``).
The decoder validates exactly as QEMU 10.0's ``source_return_path_thread``
does (types 1..7, fixed lengths from ``rp_cmd_args[]``, payload <= 512 bytes)
with its error texts, plus livemig's own ``MIG_RP_MSG_X_ERROR`` (0x4c01).

Postcopy's messages: ``REQ_PAGES`` (be64 start, be32 length: a page range of
the block last named), ``REQ_PAGES_ID`` (the same, then u8 length and the
block's name), ``RESUME_ACK`` (be32 1) and ``RECV_BITMAP`` (u8 length, block
name), which is followed, outside the message framing, by be64 size (bytes,
a multiple of 8), the block's received bitmap as little-endian 64-bit words
and be64 ``RAMBLOCK_RECV_BITMAP_ENDING`` (``ramblock_recv_bitmap_send``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from .buffer import ReceiveBuffer
from .constants import (
    BE32,
    BE64,
    DEFAULT_MAX_PAYLOAD,
    MIGRATION_RESUME_ACK_VALUE,
    RAMBLOCK_RECV_BITMAP_ENDING,
    RP_CMD_ARGS,
    RP_HEADER,
    RP_MAX_PAYLOAD,
    MigRpMsg,
)
from .errors import ReturnPathError
from .events import NEED_DATA, Closed, NeedDataT

__all__ = [
    "Pong",
    "RecvBitmap",
    "ReqPages",
    "ResumeAck",
    "ReturnPathDecoder",
    "RpEvent",
    "RpMessage",
    "Shut",
    "SwitchoverAck",
    "XError",
    "XLoadCosts",
    "decode_x_load_costs",
    "encode_pong",
    "encode_recv_bitmap_message",
    "encode_req_pages",
    "encode_resume_ack",
    "encode_rp_message",
    "encode_shut",
    "encode_switchover_ack",
    "encode_x_error",
    "encode_x_load_costs",
]

_SIZE_T_MINUS_ONE = (1 << 64) - 1  # QEMU prints (size_t)-1 for "variable" lengths


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shut:
    """MIG_RP_MSG_SHUT: the destination is done; 0 = OK, non-zero = it failed."""

    value: int


@dataclass(frozen=True, slots=True)
class Pong:
    """MIG_RP_MSG_PONG: echo of a MIG_CMD_PING value."""

    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck:
    """MIG_RP_MSG_SWITCHOVER_ACK: the destination approves switchover."""


@dataclass(frozen=True, slots=True)
class XError:
    """livemig's MIG_RP_MSG_X_ERROR: why the destination failed (decoded UTF-8,
    undecodable bytes replaced)."""

    text: str


@dataclass(frozen=True, slots=True)
class XLoadCosts:
    """livemig's MIG_RP_MSG_X_LOAD_COSTS: what loading costs the destination.
    Units in the names: ``ram-load-bytes-per-s``, ``device-load-ms``,
    ``post-load-ms``; unknown keys are kept (newer destinations)."""

    costs: dict[str, float]


@dataclass(frozen=True, slots=True)
class ReqPages:
    """REQ_PAGES (``block`` None: the block of the last REQ_PAGES_ID) or
    REQ_PAGES_ID: the destination faulted on [start, start+length) of ``block``."""

    start: int
    length: int
    block: str | None = None


@dataclass(frozen=True, slots=True)
class ResumeAck:
    """RESUME_ACK: the destination is ready to go on after a postcopy recovery."""

    value: int


@dataclass(frozen=True, slots=True)
class RecvBitmap:
    """RECV_BITMAP with the bitmap that followed it: one bit per target page of
    ``block`` that the destination has (little-endian 64-bit words, as sent)."""

    block: str
    bitmap: bytes

    def received(self, npages: int) -> np.ndarray:
        """One bool per page (the first ``npages`` bits)."""
        bits = np.unpackbits(np.frombuffer(self.bitmap, dtype=np.uint8), bitorder="little")
        return bits[:npages].astype(bool)


@dataclass(frozen=True, slots=True)
class RpMessage:
    """Any other valid message, undecoded."""

    type: MigRpMsg
    payload: bytes


RpEvent: TypeAlias = (Shut | Pong | SwitchoverAck | XError | XLoadCosts | ReqPages | ResumeAck
                      | RecvBitmap | RpMessage | Closed)


# --- encoders -------------------------------------------------------------------------


def encode_rp_message(msg_type: MigRpMsg | int, payload: bytes = b"") -> bytes:
    """be16 type, be16 length, payload; fixed lengths and the 512-byte cap enforced."""
    try:
        msg = MigRpMsg(msg_type)
    except ValueError:
        raise ValueError(f"unknown return-path message type {msg_type}") from None
    if msg in (MigRpMsg.INVALID, MigRpMsg.MAX):
        raise ValueError(f"MIG_RP_MSG_{msg.name} cannot be sent")
    expected = RP_CMD_ARGS[msg].len
    if expected is not None and len(payload) != expected:
        raise ValueError(f"{msg.name} takes {expected} payload bytes, not {len(payload)}")
    if len(payload) > RP_MAX_PAYLOAD:
        raise ValueError(f"return-path payload longer than {RP_MAX_PAYLOAD} bytes")
    return RP_HEADER.pack(msg, len(payload)) + bytes(payload)


def encode_shut(value: int) -> bytes:
    """SHUT with be32 ``value`` (0 = success)."""
    return encode_rp_message(MigRpMsg.SHUT, BE32.pack(value))


def encode_pong(value: int) -> bytes:
    """PONG echoing a PING's be32 ``value``."""
    return encode_rp_message(MigRpMsg.PONG, BE32.pack(value))


def encode_switchover_ack() -> bytes:
    """SWITCHOVER_ACK (no payload)."""
    return encode_rp_message(MigRpMsg.SWITCHOVER_ACK)


def encode_req_pages(start: int, length: int, block: str | None = None) -> bytes:
    """REQ_PAGES, or REQ_PAGES_ID when ``block`` is named (the first request, or
    the first after a request for another block)."""
    head = BE64.pack(start) + BE32.pack(length)
    if block is None:
        return encode_rp_message(MigRpMsg.REQ_PAGES, head)
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    return encode_rp_message(MigRpMsg.REQ_PAGES_ID, head + bytes((len(name),)) + name)


def encode_resume_ack(value: int = MIGRATION_RESUME_ACK_VALUE) -> bytes:
    return encode_rp_message(MigRpMsg.RESUME_ACK, BE32.pack(value))


def encode_recv_bitmap_message(block: str, received: np.ndarray) -> bytes:
    """RECV_BITMAP for ``block`` and its bitmap (``received``: one bool per
    page), padded to whole 64-bit words, and the end mark."""
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    bits = np.packbits(np.asarray(received, dtype=bool), bitorder="little").tobytes()
    size = -(-len(bits) // 8) * 8
    bitmap = bits.ljust(size, b"\0")
    return (encode_rp_message(MigRpMsg.RECV_BITMAP, bytes((len(name),)) + name)
            + BE64.pack(size) + bitmap + BE64.pack(RAMBLOCK_RECV_BITMAP_ENDING))


def encode_x_load_costs(costs: dict[str, float]) -> bytes:
    """X_LOAD_COSTS: numbers by name, as compact JSON (at most 512 bytes)."""
    payload = json.dumps({k: round(float(v), 3) for k, v in costs.items()},
                         separators=(",", ":")).encode()
    return encode_rp_message(MigRpMsg.X_LOAD_COSTS, payload)


def decode_x_load_costs(payload: bytes) -> XLoadCosts:
    obj = json.loads(payload.decode("utf-8"))
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in obj.items()):
        raise ValueError("X_LOAD_COSTS is not an object of numbers")
    return XLoadCosts({k: float(v) for k, v in obj.items()})


def encode_x_error(text: str) -> bytes:
    """X_ERROR carrying ``text`` as UTF-8, cut to 512 bytes on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) > RP_MAX_PAYLOAD:
        raw = raw[:RP_MAX_PAYLOAD].decode("utf-8", "ignore").encode("utf-8")
    return encode_rp_message(MigRpMsg.X_ERROR, raw)


# --- decoder --------------------------------------------------------------------------


class ReturnPathDecoder:
    """Sans-IO decoder of return-path messages (source side).

    Same feeding interface as ``StreamDecoder`` (``receive_data`` with ``b""``
    for end of data, or ``get_buffer``/``buffer_updated``). ``next_event()``
    returns ``Shut | Pong | SwitchoverAck | XError | XLoadCosts | RpMessage``, ``NEED_DATA``,
    or ``Closed`` once data ended between messages; it raises only
    ``ReturnPathError`` (again on every later call). ``accept_x_error=False``
    behaves exactly like a QEMU source, rejecting 0x4c01 and 0x4c02 as invalid.
    """

    def __init__(self, *, accept_x_error: bool = True, buffer_size: int = 4096,
                 max_bitmap: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._accept_x_error = accept_x_error
        self._max_bitmap = max_bitmap              # bytes: cap on a RECV_BITMAP's size
        self._bitmap_block: str | None = None      # a RECV_BITMAP's bitmap comes next
        self._rb = ReceiveBuffer(buffer_size)
        self._error: ReturnPathError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes (copied); ``b""`` means the peer's data ended."""
        self._rb.append(data)

    def get_buffer(self, min_size: int = 1) -> memoryview:
        """Writable free space to ``recv_into``; then call ``buffer_updated``."""
        return self._rb.reserve(min_size)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` written into the last ``get_buffer`` view; 0 = end of data."""
        self._rb.commit(nbytes)

    @property
    def offset(self) -> int:
        """Absolute offset (bytes) of the first byte not yet decoded."""
        return self._rb.offset(self._rb.start)

    def next_event(self) -> RpEvent | NeedDataT:
        """The next message, ``NEED_DATA`` or ``Closed``; raises ``ReturnPathError`` only."""
        if self._error is not None:
            raise self._error
        try:
            return self._read()
        except ReturnPathError as exc:
            self._error = exc
            raise
        except (IndexError, ValueError, TypeError, OverflowError, struct.error) as exc:
            err = ReturnPathError(f"Malformed return path message: {type(exc).__name__}: {exc}",
                                  self.offset)
            self._error = err
            raise err from exc

    def _read(self) -> RpEvent | NeedDataT:
        if self._bitmap_block is not None:
            return self._read_bitmap(self._bitmap_block)
        rb = self._rb
        p = rb.start
        if not rb.has(p, RP_HEADER.size):
            if rb.eof:
                if len(rb) == 0:
                    return Closed()
                raise ReturnPathError(f"Failed reading return path message header: read "
                                      f"{len(rb)} expected {RP_HEADER.size}", rb.offset(p))
            return NEED_DATA
        msg_type, ln = rb.unpack(RP_HEADER, p)
        valid = (MigRpMsg.INVALID < msg_type < MigRpMsg.MAX
                 or (self._accept_x_error
                     and msg_type in (MigRpMsg.X_ERROR, MigRpMsg.X_LOAD_COSTS)))
        if not valid:
            raise ReturnPathError(f"Received invalid message 0x{msg_type:04x} "
                                  f"length 0x{ln:04x}", rb.offset(p))
        msg = MigRpMsg(msg_type)
        args = RP_CMD_ARGS[msg]
        if (args.len is not None and ln != args.len) or ln > RP_MAX_PAYLOAD:
            expecting = args.len if args.len is not None else _SIZE_T_MINUS_ONE
            # "withincorrect" (sic): QEMU 10.0's text, split string literal.
            raise ReturnPathError(f"Received '{args.name}' message (0x{msg_type:04x}) with"
                                  f"incorrect length {ln} expecting {expecting}",
                                  rb.offset(p + 2))
        q = p + RP_HEADER.size
        if not rb.has(q, ln):
            if rb.eof:
                raise ReturnPathError(f"Failed reading data for message 0x{msg_type:04x} "
                                      f"read {rb.end - q} expected {ln}", rb.offset(q))
            return NEED_DATA
        payload = rb.bytes(q, ln)
        rb.start = q + ln
        if msg == MigRpMsg.SHUT:
            return Shut(BE32.unpack(payload)[0])
        if msg == MigRpMsg.PONG:
            return Pong(BE32.unpack(payload)[0])
        if msg == MigRpMsg.SWITCHOVER_ACK:
            return SwitchoverAck()
        if msg == MigRpMsg.X_ERROR:
            return XError(payload.decode("utf-8", "replace"))
        if msg in (MigRpMsg.REQ_PAGES, MigRpMsg.REQ_PAGES_ID):
            return self._req_pages(msg, payload, ln, q)
        if msg == MigRpMsg.RESUME_ACK:
            return ResumeAck(BE32.unpack(payload)[0])
        if msg == MigRpMsg.RECV_BITMAP:
            if ln < 1:
                raise ReturnPathError("MIG_RP_MSG_RECV_BITMAP missing block name", rb.offset(q))
            self._bitmap_block = payload[1:1 + payload[0]].decode("utf-8", "replace")
            return self._read_bitmap(self._bitmap_block)
        if msg == MigRpMsg.X_LOAD_COSTS:
            try:
                return decode_x_load_costs(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ReturnPathError(f"Malformed X_LOAD_COSTS message: {exc}",
                                      rb.offset(q)) from None
        return RpMessage(msg, payload)

    def _req_pages(self, msg: MigRpMsg, payload: bytes, ln: int, q: int) -> ReqPages:
        start, = BE64.unpack_from(payload, 0)
        length, = BE32.unpack_from(payload, 8)
        if msg == MigRpMsg.REQ_PAGES:
            return ReqPages(start, length)
        expected = 12 + 1
        if ln >= expected:
            expected += payload[12]
        if ln != expected:
            raise ReturnPathError(f"Req_Page_id with length {ln} expecting {expected}",
                                  self._rb.offset(q))
        return ReqPages(start, length, payload[13:].decode("utf-8", "replace"))

    def _read_bitmap(self, block: str) -> RecvBitmap | NeedDataT:
        """be64 size, the bitmap, be64 end mark (ram_dirty_bitmap_reload's checks)."""
        rb = self._rb
        p = rb.start
        if not rb.has(p, BE64.size):
            if rb.eof:
                raise ReturnPathError(f"ramblock '{block}' bitmap truncated", rb.offset(p))
            return NEED_DATA
        size = rb.unpack(BE64, p)[0]
        if size % 8 or size > self._max_bitmap:
            raise ReturnPathError(f"ramblock '{block}' bitmap size 0x{size:x} is invalid",
                                  rb.offset(p))
        if not rb.has(p, 2 * BE64.size + size):
            if rb.eof:
                raise ReturnPathError(f"ramblock '{block}' bitmap truncated", rb.offset(p))
            return NEED_DATA
        bitmap = rb.bytes(p + BE64.size, size)
        end = rb.unpack(BE64, p + BE64.size + size)[0]
        if end != RAMBLOCK_RECV_BITMAP_ENDING:
            raise ReturnPathError(f"ram_dirty_bitmap_reload: ramblock '{block}' end mark "
                                  f"incorrect: 0x{end:x}", rb.offset(p + BE64.size + size))
        rb.start = p + 2 * BE64.size + size
        self._bitmap_block = None
        return RecvBitmap(block, bitmap)
