"""multifd channels: the init message and the RAM packet header (sans-IO).

Layouts follow QEMU's migration/multifd.h (MultiFDInit_t, MultiFDPacket_t),
all fields big-endian. A packet is this header, then ``normal + zero`` be64
page offsets (normal pages first), then ``normal`` x 4 KiB of page data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import StreamError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 1 << 0

# magic, version, uuid[16], channel id, unused1[7], unused2[4] (u64)
_INIT = struct.Struct(">II16sB7s32s")
# hdr{magic, version, flags}, pages_alloc, normal_pages, next_packet_size,
# packet_num, zero_pages, unused32[1], unused64[3], ramblock[256]
_PACKET = struct.Struct(">IIIIIIQII24s256s")
MULTIFD_INIT_SIZE = _INIT.size          # 64
MAX_PAGES_PER_PACKET = 1 << 16


def multifd_packet_header_size() -> int:
    return _PACKET.size


@dataclass(frozen=True)
class MultifdInit:
    uuid: bytes
    channel_id: int


@dataclass(frozen=True)
class MultifdPacket:
    flags: int
    normal_pages: int
    zero_pages: int
    packet_num: int
    block: str

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)


def encode_multifd_init(uuid: bytes, channel_id: int) -> bytes:
    if len(uuid) != 16 or not 0 <= channel_id < 256:
        raise ValueError("multifd init needs a 16-byte uuid and a channel id < 256")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id, bytes(7), bytes(32))


def decode_multifd_init(data: bytes) -> MultifdInit:
    if len(data) != _INIT.size:
        raise StreamError(f"multifd: short init message ({len(data)} bytes)", 0)
    magic, version, uuid, channel_id, _, _ = _INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise StreamError(f"multifd: received packet magic {magic:x} and expected magic "
                          f"{MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise StreamError(f"multifd: received packet version {version} and expected "
                          f"version {MULTIFD_VERSION}", 4)
    return MultifdInit(uuid, channel_id)


def encode_multifd_packet_header(*, flags: int, normal_offsets: np.ndarray,
                                 zero_offsets: np.ndarray, packet_num: int,
                                 block: str) -> bytes:
    """Header plus the be64 offset array (normal pages first, then zero pages)."""
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    n, z = int(normal_offsets.size), int(zero_offsets.size)
    head = _PACKET.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, n + z, n, n * 4096,
                        packet_num, z, 0, bytes(24), name)
    offs = np.concatenate([normal_offsets, zero_offsets]).astype(">u8", copy=False)
    return head + offs.tobytes()


def decode_multifd_packet_header(data: bytes) -> MultifdPacket:
    """Decode the fixed header; the caller then reads (normal + zero) x 8 bytes of
    offsets and normal x 4 KiB of data."""
    if len(data) != _PACKET.size:
        raise StreamError(f"multifd: short packet header ({len(data)} bytes)", 0)
    (magic, version, flags, pages_alloc, normal, _next, packet_num, zero, _u32, _u64,
     name) = _PACKET.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise StreamError(f"multifd: received packet magic {magic:x} and expected magic "
                          f"{MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise StreamError(f"multifd: received packet version {version} and expected "
                          f"version {MULTIFD_VERSION}", 4)
    if normal + zero > min(pages_alloc, MAX_PAGES_PER_PACKET):
        raise StreamError(f"multifd: received packet with {normal} normal and {zero} zero "
                          f"pages, more than {min(pages_alloc, MAX_PAGES_PER_PACKET)}", 12)
    block = name.split(b"\0", 1)[0].decode(errors="replace")
    return MultifdPacket(flags, normal, zero, packet_num, block)
