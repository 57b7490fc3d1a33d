"""Postcopy's stream commands, sans-IO, in QEMU 10.0's layouts (migration/savevm.c).

Each ``encode_*`` returns a whole QEMU_VM_COMMAND record; each ``decode_*``
takes the payload of a ``Command`` event (its length already checked against
``MIG_CMD_ARGS``) and raises ``StreamError`` with QEMU's text where QEMU has
one (its offset is within the payload). The return path's postcopy
messages are in ``return_path.py``.

* ``POSTCOPY_ADVISE``: be64 RAM page-size summary, be64 target page size
  (16 bytes) when ``postcopy-ram`` is on, empty otherwise.
* ``POSTCOPY_RAM_DISCARD``: u8 version (0), u8 name length, name, u8 0, then
  (be64 start, be64 length) byte ranges of that RAM block; QEMU's source puts
  at most 12 ranges in one command (``MAX_DISCARDS_PER_COMMAND``).
* ``PACKAGED``: be32 length, then that many bytes of stream (commands and
  sections, no file header): LISTEN, the device state, PING 3, RUN, so the
  destination reads the whole device state before it loads any of it.
  ``StreamDecoder`` decodes the package's records in line and checks its
  length (at most 16 MiB) and that they end exactly at its end.
* ``POSTCOPY_LISTEN``, ``POSTCOPY_RUN``, ``POSTCOPY_RESUME``: no payload.
* ``RECV_BITMAP``: u8 name length, name (the RAM block whose received
  bitmap the destination must send back while recovering).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .constants import BE32, MAX_VM_CMD_PACKAGED_SIZE, MigCmd
from .errors import StreamError
from .stream import encode_command

__all__ = [
    "MAX_DISCARDS_PER_COMMAND",
    "MAX_VM_CMD_PACKAGED_SIZE",
    "POSTCOPY_RAM_DISCARD_VERSION",
    "PostcopyAdvise",
    "RamDiscard",
    "decode_postcopy_advise",
    "decode_postcopy_ram_discard",
    "decode_recv_bitmap",
    "encode_packaged",
    "encode_postcopy_advise",
    "encode_postcopy_listen",
    "encode_postcopy_ram_discard",
    "encode_postcopy_ram_discards",
    "encode_postcopy_resume",
    "encode_postcopy_run",
    "encode_recv_bitmap",
]

POSTCOPY_RAM_DISCARD_VERSION: Final = 0
MAX_DISCARDS_PER_COMMAND: Final = 12
_ADVISE: Final = struct.Struct(">QQ")
_RANGE: Final = np.dtype(">u8")


@dataclass(frozen=True, slots=True)
class PostcopyAdvise:
    """POSTCOPY_ADVISE's payload: ``None`` fields when it came empty (no postcopy-ram)."""

    pagesize_summary: int | None
    target_page_size: int | None


@dataclass(frozen=True, slots=True)
class RamDiscard:
    """One POSTCOPY_RAM_DISCARD: byte ranges (start, length) of RAM block ``block``."""

    block: str
    starts: npt.NDArray[np.uint64]
    lengths: npt.NDArray[np.uint64]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RamDiscard) and self.block == other.block
                and np.array_equal(self.starts, other.starts)
                and np.array_equal(self.lengths, other.lengths))

    def __hash__(self) -> int:
        return hash((self.block, self.starts.tobytes(), self.lengths.tobytes()))


def encode_postcopy_advise(pagesize_summary: int | None, target_page_size: int) -> bytes:
    """ADVISE with the sizes (postcopy-ram on), or empty (``pagesize_summary`` None)."""
    if pagesize_summary is None:
        return encode_command(MigCmd.POSTCOPY_ADVISE)
    return encode_command(MigCmd.POSTCOPY_ADVISE, _ADVISE.pack(pagesize_summary,
                                                               target_page_size))


def decode_postcopy_advise(payload: bytes, *, postcopy_ram: bool) -> PostcopyAdvise:
    """The advise's sizes; its length must agree with this side's ``postcopy-ram``
    (loadvm_postcopy_handle_advise's texts)."""
    if len(payload) == 0:
        if postcopy_ram:
            raise StreamError("RAM postcopy is enabled but have 0 byte advise", 0)
        return PostcopyAdvise(None, None)
    if len(payload) == _ADVISE.size:
        if not postcopy_ram:
            raise StreamError("RAM postcopy is disabled but have 16 byte advise", 0)
        summary, tps = _ADVISE.unpack(payload)
        return PostcopyAdvise(summary, tps)
    raise StreamError(f"CMD_POSTCOPY_ADVISE invalid length ({len(payload)})", 0)


def encode_postcopy_ram_discard(block: str, starts: npt.ArrayLike,
                                lengths: npt.ArrayLike) -> bytes:
    """One DISCARD command for up to 12 byte ranges of ``block``."""
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    s = np.asarray(starts, dtype=np.uint64)
    n = np.asarray(lengths, dtype=np.uint64)
    if s.shape != n.shape or s.ndim != 1 or s.size > MAX_DISCARDS_PER_COMMAND:
        raise ValueError(f"a discard carries 0..{MAX_DISCARDS_PER_COMMAND} ranges, "
                         "starts and lengths alike")
    pairs = np.empty(2 * s.size, dtype=_RANGE)
    pairs[0::2], pairs[1::2] = s, n
    payload = (bytes((POSTCOPY_RAM_DISCARD_VERSION, len(name))) + name + b"\0"
               + pairs.tobytes())
    return encode_command(MigCmd.POSTCOPY_RAM_DISCARD, payload)


def encode_postcopy_ram_discards(block: str, starts: npt.ArrayLike,
                                 lengths: npt.ArrayLike) -> bytes:
    """All the ranges, 12 to a command, as QEMU's source chunks them."""
    s = np.asarray(starts, dtype=np.uint64)
    n = np.asarray(lengths, dtype=np.uint64)
    return b"".join(encode_postcopy_ram_discard(block, s[i:i + MAX_DISCARDS_PER_COMMAND],
                                                n[i:i + MAX_DISCARDS_PER_COMMAND])
                    for i in range(0, s.size, MAX_DISCARDS_PER_COMMAND))


def decode_postcopy_ram_discard(payload: bytes) -> RamDiscard:
    """Checks in QEMU's order with its texts (loadvm_postcopy_ram_handle_discard)."""
    ln = len(payload)
    if ln < 1 + 1 + 1 + 1 + 2 * 8:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({ln})", 0)
    if payload[0] != POSTCOPY_RAM_DISCARD_VERSION:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({payload[0]})", 0)
    name_len = payload[1]
    if 2 + name_len > ln:
        raise StreamError("CMD_POSTCOPY_RAM_DISCARD Failed to read RAMBlock ID", 1)
    name = payload[2:2 + name_len].decode("utf-8", "replace")
    nil = payload[2 + name_len] if 2 + name_len < ln else -1
    if nil != 0:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD missing nil ({nil})", 2 + name_len)
    rest = payload[3 + name_len:]
    if len(rest) % 16:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(rest)})", 0)
    pairs = np.frombuffer(rest, dtype=_RANGE).astype(np.uint64)
    return RamDiscard(name, pairs[0::2].copy(), pairs[1::2].copy())


def encode_packaged(blob: bytes) -> bytes:
    """PACKAGED: the command (be32 length) followed by the packaged stream bytes."""
    if len(blob) > MAX_VM_CMD_PACKAGED_SIZE:
        # qemu_savevm_send_packaged's text
        raise ValueError(f"qemu_savevm_send_packaged: Unreasonably large packaged state: "
                         f"{len(blob)}")
    return encode_command(MigCmd.PACKAGED, BE32.pack(len(blob))) + bytes(blob)


def encode_postcopy_listen() -> bytes:
    return encode_command(MigCmd.POSTCOPY_LISTEN)


def encode_postcopy_run() -> bytes:
    return encode_command(MigCmd.POSTCOPY_RUN)


def encode_postcopy_resume() -> bytes:
    return encode_command(MigCmd.POSTCOPY_RESUME)


def encode_recv_bitmap(block: str) -> bytes:
    """RECV_BITMAP: u8 length, block name."""
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    return encode_command(MigCmd.RECV_BITMAP, bytes((len(name),)) + name)


def decode_recv_bitmap(payload: bytes) -> str:
    """The block name of a RECV_BITMAP (loadvm_handle_recv_bitmap's checks)."""
    if not payload or payload[0] + 1 != len(payload):
        raise StreamError(f"CMD_RECV_BITMAP: invalid length ({len(payload)})", 0)
    return payload[1:].decode("utf-8", "replace")
