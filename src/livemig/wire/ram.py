"""RAM section records (``migration/ram.c``): vectorised encoders and run scanners.

Every RAM record starts with a be64 "address word": the page-aligned byte
offset inside a RAMBlock OR'ed with RAM_SAVE_FLAG_* in the low 12 bits. A PAGE
record is that word (+ ``u8 len, idstr`` unless CONTINUE) + 4096 bytes; a ZERO
record is the word (+ name) + one byte that must be 0.

Speed comes from one observation: in a run of CONTINUE records all records
have the same size (stride 4104 for PAGE, 9 for ZERO), *including the step
from the first record's payload to the second record's payload even when the
first carries a block name*. Record i >= 1's address word sits at
``P0 - 8 + i * stride`` and payload i (i >= 0) at ``P0 + i * stride``, where
``P0`` is the first payload's position. So a batch of n pages is a single
strided numpy view ``(n, 4096)`` with strides ``(4104, 1)``, both when
building it (source) and when reading it (destination); all address words are
one strided ``>u8`` view, checked in one vectorised comparison.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from .constants import (
    BE64,
    RAM_ADDR,
    RAM_BLOCK_NAME_MAX,
    RAM_FLAGS_MASK,
    RAM_PAGE_STRIDE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RAM_ZERO_STRIDE,
    TARGET_PAGE_MASK,
    TARGET_PAGE_SIZE,
)

PAGE_CONTINUE = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE  # 0x28
ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE  # 0x22
RAM_OFFSET_LIMIT = 1 << 63  # offsets and block lengths must fit an int64

_BE64_DTYPE = np.dtype(">u8")
_U64_FLAGS_MASK = np.uint64(RAM_FLAGS_MASK)
_U64_PAGE_MASK = np.uint64(TARGET_PAGE_MASK)
_NO_OFFSETS: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
_NO_OFFSETS.flags.writeable = False
_FIRST_SCAN_WINDOW = 64  # records; the window grows x4 while the run goes on


# --- encoders (source side) -----------------------------------------------------------


def block_name_bytes(block: str) -> bytes:
    """A RAMBlock idstr as sent after ``u8 len`` (UTF-8, at most 255 bytes)."""
    raw = block.encode("utf-8")
    if len(raw) > RAM_BLOCK_NAME_MAX:
        raise ValueError(f"RAM block name longer than {RAM_BLOCK_NAME_MAX} bytes: {block!r}")
    return raw


def _check_offsets(offsets: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    off = np.asarray(offsets)
    if off.ndim != 1 or (off.size and off.dtype.kind not in "iu"):
        raise ValueError("offsets must be a 1-D integer array of byte offsets")
    if off.size:
        if int(off.min()) < 0 or int(off.max()) >= RAM_OFFSET_LIMIT:
            raise ValueError("RAM offsets must be in [0, 2**63)")
        if np.any(off % TARGET_PAGE_SIZE):
            raise ValueError(f"RAM offsets must be multiples of {TARGET_PAGE_SIZE}")
    return off.astype(np.uint64)


def encode_ram_block_list(blocks: Iterable[tuple[str, int]]) -> bytes:
    """The RAM_SAVE_FLAG_MEM_SIZE record: be64 (total | MEM_SIZE), then per
    block ``u8 len, idstr, be64 used_length`` (bytes, page multiples)."""
    parts = []
    total = 0
    for name, length in blocks:
        if length < 0 or length % TARGET_PAGE_SIZE or length >= RAM_OFFSET_LIMIT:
            raise ValueError(f"RAM block {name!r}: length must be a page multiple, got {length}")
        raw = block_name_bytes(name)
        parts.append(bytes([len(raw)]) + raw + BE64.pack(length))
        total += length
    if total >= RAM_OFFSET_LIMIT:
        raise ValueError("total RAM size too large")
    return BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE) + b"".join(parts)


def encode_ram_multifd_flush() -> bytes:
    """A multifd sync point in the main stream (RAM_SAVE_FLAG_MULTIFD_FLUSH)."""
    return BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def encode_ram_eos() -> bytes:
    """RAM_SAVE_FLAG_EOS: ends every RAM section payload."""
    return BE64.pack(RAM_SAVE_FLAG_EOS)


def _encode_run(block: str, off: npt.NDArray[np.uint64], first_has_block_name: bool,
                flag: int, stride: int, scratch: npt.NDArray[np.uint8] | None = None,
                ) -> tuple[npt.NDArray[np.uint8], int]:
    """Lay out n records of one block with numpy; returns (buffer, P0) where P0
    is the first payload position. Payload bytes are left for the caller to
    fill. ``scratch``: a reusable buffer to build in when it is large enough
    (fresh multi-MiB allocations cost a page fault per 4 KiB)."""
    n = off.size
    name = block_name_bytes(block)
    payload = stride - RAM_ADDR.size
    p0 = RAM_ADDR.size + (1 + len(name) if first_has_block_name else 0)
    size = p0 + payload + (n - 1) * stride
    if scratch is not None and scratch.size >= size:
        out = scratch[:size]
    else:
        out = np.empty(size, dtype=np.uint8)
    words = np.ndarray((n,), dtype=_BE64_DTYPE, buffer=out, offset=p0 - RAM_ADDR.size,
                       strides=(stride,))
    cont = flag | RAM_SAVE_FLAG_CONTINUE
    if first_has_block_name:
        words[1:] = off[1:] | np.uint64(cont)
        out[:RAM_ADDR.size] = np.frombuffer(BE64.pack(int(off[0]) | flag), dtype=np.uint8)
        out[RAM_ADDR.size] = len(name)
        out[RAM_ADDR.size + 1:p0] = np.frombuffer(name, dtype=np.uint8)
    else:
        words[:] = off | np.uint64(cont)
    return out, p0


def encode_ram_pages(block: str, offsets: npt.ArrayLike, pages: npt.ArrayLike, *,
                     first_has_block_name: bool,
                     scratch: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """PAGE records for ``pages[i]`` at byte offset ``offsets[i]`` of ``block``.

    One contiguous uint8 buffer (a bytes-like object: ``sock.sendall`` takes it)
    of, per page, be64 (offset | PAGE | CONTINUE) + 4096 bytes. When
    ``first_has_block_name`` the first record has no CONTINUE and carries
    ``u8 len, block`` (send it so when the receiver's "last block" differs).
    ``pages``: uint8 (n, 4096), any strides (e.g. a fancy-indexed gather).
    Empty input gives an empty buffer. With ``scratch`` (a uint8 buffer the
    caller reuses) the result is a view of it when it fits: valid until the
    caller's next encode.
    """
    off = _check_offsets(offsets)
    src = np.asarray(pages)
    if src.dtype != np.uint8 or src.ndim != 2 or src.shape != (off.size, TARGET_PAGE_SIZE):
        raise ValueError(f"pages must be uint8 of shape ({off.size}, {TARGET_PAGE_SIZE})")
    if off.size == 0:
        return np.empty(0, dtype=np.uint8)
    out, p0 = _encode_run(block, off, first_has_block_name, RAM_SAVE_FLAG_PAGE, RAM_PAGE_STRIDE,
                          scratch)
    data = np.ndarray((off.size, TARGET_PAGE_SIZE), dtype=np.uint8, buffer=out, offset=p0,
                      strides=(RAM_PAGE_STRIDE, 1))
    data[...] = src
    return out


def encode_ram_page_headers(block: str, offsets: npt.ArrayLike, *,
                            first_has_block_name: bool,
                            scratch: npt.NDArray[np.uint8] | None = None,
                            ) -> tuple[npt.NDArray[np.uint8], int]:
    """The record headers of ``encode_ram_pages`` without the page bytes.

    For a gathered write (writev) whose page data leave straight from guest
    RAM, as QEMU's ``qemu_put_buffer_async`` does: record i is header i then
    page i. Returns ``(headers, first_len)``: the first header is
    ``headers[:first_len]`` (8 bytes, or 8 + 1 + len(name) with the block
    name); header i >= 1 is the 8 bytes at ``first_len + 8 * (i - 1)``.
    With ``scratch`` the result is a view of it when it fits.
    """
    off = _check_offsets(offsets)
    if off.size == 0:
        return np.empty(0, dtype=np.uint8), 0
    # encode_ram_pages' layout with no payload between the records.
    return _encode_run(block, off, first_has_block_name, RAM_SAVE_FLAG_PAGE, RAM_ADDR.size,
                       scratch)


def encode_ram_zero_pages(block: str, offsets: npt.ArrayLike, *,
                          first_has_block_name: bool) -> npt.NDArray[np.uint8]:
    """ZERO records (be64 offset | ZERO | CONTINUE, then byte 0) for ``offsets``;
    block name on the first record as in ``encode_ram_pages``."""
    off = _check_offsets(offsets)
    if off.size == 0:
        return np.empty(0, dtype=np.uint8)
    out, p0 = _encode_run(block, off, first_has_block_name, RAM_SAVE_FLAG_ZERO, RAM_ZERO_STRIDE)
    out[p0::RAM_ZERO_STRIDE] = 0   # the byte after each address word must be 0
    return out


# --- run scanner (destination side) ---------------------------------------------------


def scan_continue_run(buf: npt.NDArray[np.uint8], pos: int, end: int, stride: int,
                      expected_flags: int, limit: int,
                      zero_byte: bool = False) -> npt.NDArray[np.uint64]:
    """Offsets of the longest valid run of complete records at ``pos``,
    ``pos + stride``, ... inside ``buf[pos:end]``.

    A record is valid when its flags equal ``expected_flags``, its offset is
    below ``limit`` (the block length, bytes) and, with ``zero_byte``, the byte
    after its address word is 0. The first invalid record is left for the
    caller's one-record path, which reports it precisely. Windows grow
    geometrically, so a long run costs O(run) and a run that stops early costs
    O(first window), never O(buffer).
    """
    total = (end - pos) // stride if end > pos else 0
    if total <= 0:
        return _NO_OFFSETS
    # Cheap scalar look at the first record: mixed streams (zero and normal
    # pages interleaved) end most runs right here, without numpy overhead.
    first = int.from_bytes(buf.data[pos:pos + RAM_ADDR.size], "big")
    if ((first & RAM_FLAGS_MASK) != expected_flags or (first & TARGET_PAGE_MASK) >= limit
            or (zero_byte and buf[pos + RAM_ADDR.size])):
        return _NO_OFFSETS
    u64_limit = np.uint64(limit)
    u64_flags = np.uint64(expected_flags)
    chunks: list[npt.NDArray[np.uint64]] = []
    done = 0
    window = _FIRST_SCAN_WINDOW
    while done < total:
        w = min(window, total - done)
        p = pos + done * stride
        words = np.ndarray((w,), dtype=_BE64_DTYPE, buffer=buf, offset=p,
                           strides=(stride,)).astype(np.uint64)
        offs = words & _U64_PAGE_MASK
        ok = ((words & _U64_FLAGS_MASK) == u64_flags) & (offs < u64_limit)
        if zero_byte:
            ok &= np.ndarray((w,), dtype=np.uint8, buffer=buf, offset=p + RAM_ADDR.size,
                             strides=(stride,)) == 0
        if ok.all():
            chunks.append(offs)
            done += w
            window *= 4
            continue
        k = int(np.argmin(ok))
        chunks.append(offs[:k])
        break
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# --- records read straight into RAM (destination side) --------------------------------


def placed_page_records(headers: npt.NDArray[np.uint8], got: int, first_offset: int) -> int:
    """How many of the records read by a direct read are the ones it guessed.

    The destination read ``got`` bytes laid out as records of 8 header bytes
    (into ``headers``, shape (n, 8)) and 4096 data bytes (into guest RAM, at
    ``first_offset + i * 4096``), guessing that each is the ``PAGE|CONTINUE``
    record of that page. Returns the number of leading complete records whose
    header is exactly that; the bytes after them belong to the stream again.
    """
    full = min(got // RAM_PAGE_STRIDE, int(headers.shape[0]))
    if full == 0:
        return 0
    words = headers[:full].view(_BE64_DTYPE).reshape(full)
    want = np.uint64(first_offset | PAGE_CONTINUE) + \
        np.arange(full, dtype=np.uint64) * np.uint64(TARGET_PAGE_SIZE)
    bad = np.flatnonzero(words != want)
    return int(bad[0]) if bad.size else full
