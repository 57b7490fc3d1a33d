"""The return path (destination -> source): message encoders and a sans-IO decoder.

Wire: be16 type, be16 payload length, payload (``migrate_send_rp_message``).
The decoder validates exactly as QEMU 10.0's ``source_return_path_thread``
does (types 1..7, fixed lengths from ``rp_cmd_args[]``, payload <= 512 bytes)
with its error texts, plus livemig's own ``MIG_RP_MSG_X_ERROR`` (0x4c01).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TypeAlias

from .buffer import ReceiveBuffer
from .constants import BE32, RP_CMD_ARGS, RP_HEADER, RP_MAX_PAYLOAD, MigRpMsg
from .errors import ReturnPathError
from .events import NEED_DATA, Closed, NeedDataT

__all__ = [
    "Pong",
    "ReturnPathDecoder",
    "RpEvent",
    "RpMessage",
    "Shut",
    "SwitchoverAck",
    "XError",
    "XLoadCosts",
    "decode_x_load_costs",
    "encode_pong",
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
class RpMessage:
    """Any other valid message (postcopy: REQ_PAGES, REQ_PAGES_ID, RECV_BITMAP,
    RESUME_ACK), undecoded."""

    type: MigRpMsg
    payload: bytes


RpEvent: TypeAlias = Shut | Pong | SwitchoverAck | XError | XLoadCosts | RpMessage | Closed


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

    def __init__(self, *, accept_x_error: bool = True, buffer_size: int = 4096) -> None:
        self._accept_x_error = accept_x_error
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
        if msg == MigRpMsg.X_LOAD_COSTS:
            try:
                return decode_x_load_costs(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ReturnPathError(f"Malformed X_LOAD_COSTS message: {exc}",
                                      rb.offset(q)) from None
        return RpMessage(msg, payload)
