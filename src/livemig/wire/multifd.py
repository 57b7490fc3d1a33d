"""multifd channels: the init message and the RAM packets (sans-IO).

Layouts follow QEMU 10.0's migration/multifd.h (MultiFDInit_t,
MultiFDPacket_t), all fields big-endian. A RAM packet is QEMU's fixed-size
packet: the header and room for ``MULTIFD_PACKET_PAGES`` be64 page offsets
(normal pages first, then zero pages, the rest zero), then ``normal`` x
4 KiB of page data. A QEMU receiver reads exactly that size and refuses a
``pages_alloc`` above its 128, so livemig's packets are the same shape.

The sender builds the headers of a whole batch of packets in one numpy step
(``encode_multifd_ram_packets``): no Python per packet.
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
# QEMU's multifd_ram_page_count(): MULTIFD_PACKET_SIZE (512 KiB) / 4 KiB pages.
MULTIFD_PACKET_PAGES = 128
# One whole packet header with its offset array, as numpy sees it (no padding).
MULTIFD_PACKET = np.dtype([
    ("magic", ">u4"), ("version", ">u4"), ("flags", ">u4"), ("pages_alloc", ">u4"),
    ("normal_pages", ">u4"), ("next_packet_size", ">u4"), ("packet_num", ">u8"),
    ("zero_pages", ">u4"), ("unused32", ">u4"), ("unused64", ">u8", (3,)),
    ("ramblock", "S256"), ("offset", ">u8", (MULTIFD_PACKET_PAGES,))])
MULTIFD_PACKET_SIZE = MULTIFD_PACKET.itemsize     # 1344: what a receiver reads first
assert MULTIFD_PACKET_SIZE == _PACKET.size + 8 * MULTIFD_PACKET_PAGES


def multifd_packet_header_size() -> int:
    """Bytes before a packet's page data: the header and its full offset array."""
    return MULTIFD_PACKET_SIZE


@dataclass(frozen=True)
class MultifdInit:
    uuid: bytes
    channel_id: int


@dataclass(frozen=True)
class MultifdPacket:
    """A decoded header; ``offsets`` are the byte offsets of its ``normal_pages``
    normal pages, then of its ``zero_pages`` zero pages (native uint64)."""

    flags: int
    normal_pages: int
    zero_pages: int
    packet_num: int
    block: str
    offsets: np.ndarray

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


def _block_name(block: str) -> bytes:
    name = block.encode()
    if len(name) > 255:
        raise ValueError("RAM block name longer than 255 bytes")
    return name


def encode_multifd_ram_packets(pages: np.ndarray, nonzero: np.ndarray, *, first_packet_num: int,
                               block: str) -> np.ndarray:
    """The headers of the packets that carry ``pages`` (page numbers, ascending),
    ``MULTIFD_PACKET_PAGES`` per packet in order: packet j holds pages
    ``[j*128, (j+1)*128)`` of the batch, its normal ones (``nonzero``) first.

    Each packet's data are its normal pages in ascending order, so the data of
    the whole batch, packet by packet, is ``pages[nonzero]`` in order.
    Returns a (packets,) ``MULTIFD_PACKET`` array, numbered from
    ``first_packet_num``.
    """
    n = int(pages.size)
    k = -(-n // MULTIFD_PACKET_PAGES)
    out = _template(k, _block_name(block))
    if not k:
        return out
    offs = np.zeros(k * MULTIFD_PACKET_PAGES, dtype=np.uint64)
    if nonzero.all():                      # the common case: no zero pages, no reorder
        total = np.full(k, MULTIFD_PACKET_PAGES, dtype=np.uint32)
        total[-1] = n - (k - 1) * MULTIFD_PACKET_PAGES
        normal = total
        offs[:n] = pages
    else:
        starts = np.arange(0, n, MULTIFD_PACKET_PAGES)
        normal = np.add.reduceat(nonzero.astype(np.uint32), starts)
        total = np.diff(np.append(starts, n)).astype(np.uint32)
        # Within each packet normal pages first: a stable sort on (packet, is zero).
        key = (np.arange(n) // MULTIFD_PACKET_PAGES) * 2 + ~nonzero
        offs[:n] = pages[np.argsort(key, kind="stable")]
    offs[:n] <<= np.uint64(12)
    out["normal_pages"] = normal
    out["zero_pages"] = total - normal
    out["next_packet_size"] = normal * np.uint32(4096)
    out["packet_num"] = np.arange(first_packet_num, first_packet_num + k, dtype=np.uint64)
    out["offset"] = offs.reshape(k, MULTIFD_PACKET_PAGES)
    return out


_TEMPLATES: dict[bytes, np.ndarray] = {}


def _template(k: int, name: bytes) -> np.ndarray:
    """k packet headers with the fields every packet of this block shares."""
    t = _TEMPLATES.get(name)
    if t is None or t.size < k:
        t = np.zeros(max(k, 8), dtype=MULTIFD_PACKET)
        t["magic"], t["version"] = MULTIFD_MAGIC, MULTIFD_VERSION
        t["pages_alloc"] = MULTIFD_PACKET_PAGES
        t["ramblock"] = name
        _TEMPLATES[name] = t
    return t[:k].copy()


def encode_multifd_sync_packet(*, packet_num: int) -> np.ndarray:
    """A SYNC packet, QEMU's full size; as QEMU 10.0 sends it, it carries no
    pages, so ``pages_alloc`` and the block name stay zero."""
    out = np.zeros(1, dtype=MULTIFD_PACKET)
    out["magic"], out["version"], out["flags"] = MULTIFD_MAGIC, MULTIFD_VERSION, \
        MULTIFD_FLAG_SYNC
    out["packet_num"] = packet_num
    return out


def decode_multifd_packet_header(data) -> MultifdPacket:
    """Decode one ``MULTIFD_PACKET_SIZE``-byte packet header with QEMU 10.0's
    checks and texts; the caller then reads ``normal_pages`` x 4 KiB of data.
    ``offsets`` is a copy: the caller may reuse ``data`` at once."""
    if len(data) != MULTIFD_PACKET_SIZE:
        raise StreamError(f"multifd: short packet header ({len(data)} bytes)", 0)
    (magic, version, flags, pages_alloc, normal, _next, packet_num, zero, _u32, _u64,
     name) = _PACKET.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise StreamError(f"multifd: received packet magic {magic:x}, expected "
                          f"{MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise StreamError(f"multifd: received packet version {version}, expected "
                          f"{MULTIFD_VERSION}", 4)
    if pages_alloc > MULTIFD_PACKET_PAGES:
        raise StreamError(f"multifd: received packet with {pages_alloc} pages, expected "
                          f"{MULTIFD_PACKET_PAGES}", 12)
    if normal > pages_alloc:
        raise StreamError(f"multifd: received packet with {normal} non-zero pages, which "
                          f"exceeds maximum expected pages {pages_alloc}", 16)
    if zero > pages_alloc - normal:
        raise StreamError(f"multifd: received packet with {zero} zero pages, expected "
                          f"maximum {pages_alloc - normal}", 36)
    block = name.split(b"\0", 1)[0].decode(errors="replace")
    offsets = np.frombuffer(data, dtype=">u8", count=normal + zero,
                            offset=_PACKET.size).astype(np.uint64)
    return MultifdPacket(flags, normal, zero, packet_num, block, offsets)
