"""Guest RAM: one anonymous mapping per RAM block, viewed as pages by numpy.

The mapping is what the accelerator runs the guest on (KVM registers it as a
memory slot), what the migration source sends pages from, and what the
destination writes pages into. Page size is fixed at 4 KiB, as on x86.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_MADV_POPULATE_WRITE = 23      # Linux 5.14+
_MADV_DONTNEED = 4

TARGET_PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12


class RamBlock:
    """One RAM block (QEMU's RAMBlock): a named, page-aligned host mapping.

    ``pages`` is a (npages, 4096) uint8 view of the mapping (no copy), so a
    batch of pages is gathered or scattered with one numpy fancy index.
    """

    def __init__(self, idstr: str, size_bytes: int, fd: int | None = None,
                 shared: bool = False) -> None:
        """``fd``: a memory backend's file (memfd or ``mem-path``) to map instead of
        anonymous memory, shared with others if ``shared`` (``share=on``)."""
        if size_bytes <= 0 or size_bytes % TARGET_PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of {TARGET_PAGE_SIZE}")
        self.idstr = idstr
        self.size = size_bytes
        # Only a fresh anonymous mapping is known zero where untouched.
        self.anonymous = fd is None
        if fd is None:
            self.mem = mmap.mmap(-1, size_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self.mem = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # Transparent huge pages: 512x fewer first-touch faults when the
            # destination fills RAM, and fewer TLB misses for the guest and
            # for the source's page scans. Dirty tracking stays per 4 KiB page.
            self.mem.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.mem)
        self.bytes = np.frombuffer(self.mem, dtype=np.uint8)
        self.pages = self.bytes.reshape(-1, TARGET_PAGE_SIZE)
        self.pages64 = self.pages.view(np.uint64)    # (npages, 512): zero checks by words
        # Pages an incoming migration wrote here; the others of this fresh
        # mapping are zero, so a zero page for them needs no read (no fault).
        # A file's pages may hold anything: every zero page is written there.
        self.loaded = np.full(self.npages, not self.anonymous, dtype=bool)
        # Postcopy's destination registered this RAM with userfaultfd: a missing
        # page blocks whoever touches it until it arrives, so Python code must
        # touch guest RAM only through ``populate`` (GIL released) first.
        self.postcopy_armed = False

    @property
    def npages(self) -> int:
        return self.size // TARGET_PAGE_SIZE

    @property
    def host_address(self) -> int:
        """Userspace address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def nonzero_pages(self, idx: np.ndarray, known_zero: np.ndarray) -> np.ndarray:
        """Which of the pages ``idx`` hold data (one bool each). Pages marked in
        ``known_zero`` are not read; a non-zero first word proves a page non-zero
        (the walk writes byte 0), so only the others are scanned whole. Reads one
        word per page, not a gather of whole pages."""
        nonzero = ~known_zero
        check = idx[nonzero]
        if check.size:
            first = self.pages64[check, 0] != 0
            maybe = ~first
            if maybe.any():
                cand = check[maybe]
                lo, hi = int(cand[0]), int(cand[-1]) + 1
                if hi - lo == cand.size:      # a run (zeroed memory): a view, no gather
                    first[maybe] = np.bitwise_or.reduce(self.pages64[lo:hi], axis=1) != 0
                else:
                    first[maybe] = self.pages64[cand].any(axis=1)
            nonzero[nonzero] = first
        return nonzero

    def prealloc(self) -> None:
        """Fault every page in now (QEMU's ``-mem-prealloc``): the first-touch
        cost (page allocation and zeroing) is paid at start, not while a guest
        runs or an incoming migration loads."""
        rc = _libc.madvise(ctypes.c_void_p(self.host_address), ctypes.c_size_t(self.size),
                           _MADV_POPULATE_WRITE)
        if rc != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:            # EINVAL: kernel < 5.14, touch instead
                raise OSError(err, f"preallocating guest RAM failed: {os.strerror(err)}")
            self.pages[:, 0] = 0               # a write faults each page in

    def discard(self, first: int, count: int) -> None:
        """Give pages ``[first, first + count)`` back to the kernel: they read as
        zero again, as a fresh mapping does (MADV_DONTNEED; anonymous memory)."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages {first}+{count} outside RAM")
        if count and _libc.madvise(ctypes.c_void_p(self.host_address + first * TARGET_PAGE_SIZE),
                                   ctypes.c_size_t(count * TARGET_PAGE_SIZE),
                                   _MADV_DONTNEED) != 0:
            self.pages[first:first + count] = 0            # cannot happen; still zero them

    def madvise(self, advice: int, start: int, length: int) -> None:
        """madvise(2) on [start, start+length) of this block (offsets in bytes)."""
        rc = _libc.madvise(ctypes.c_void_p(self.host_address + start),
                           ctypes.c_size_t(length), advice)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise({advice}) of guest RAM failed: {os.strerror(err)}")

    def populate(self, first_page: int, end_page: int) -> None:
        """Fault pages [first_page, end_page) in for writing, in one call that
        releases the GIL: under postcopy a missing page blocks here (not inside
        a numpy write holding the GIL) until the fault thread placed it."""
        self.madvise(_MADV_POPULATE_WRITE, first_page * TARGET_PAGE_SIZE,
                     (end_page - first_page) * TARGET_PAGE_SIZE)

    def resident_pages(self) -> np.ndarray:
        """One bool per page: is it backed by memory (mincore)? A page of this
        anonymous mapping that is not resident was never written: it is zero.
        Lets the first migration pass skip reading untouched guest RAM."""
        if not self.anonymous:   # a file's page may be on disk, not in memory
            return np.ones(self.npages, dtype=bool)
        vec = np.zeros(self.npages, dtype=np.uint8)
        rc = _libc.mincore(ctypes.c_void_p(self.host_address), ctypes.c_size_t(self.size),
                           vec.ctypes.data_as(ctypes.c_void_p))
        if rc != 0:
            return np.ones(self.npages, dtype=bool)   # unknown: treat all as maybe non-zero
        return (vec & 1).astype(bool)

    def read(self, addr: int, size: int) -> bytes:
        """Guest-physical read (addr is an offset in this block), bounds-checked."""
        if addr < 0 or size < 0 or addr + size > self.size:
            raise ValueError(f"Invalid addr 0x{addr:x}/size {size} specified")
        return bytes(self.view[addr:addr + size])

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > self.size:
            raise ValueError(f"Invalid addr 0x{addr:x}/size {len(data)} specified")
        self.view[addr:addr + len(data)] = data

    def close(self) -> None:
        # Views must go before the mapping can be closed.
        del self.pages, self.pages64, self.bytes
        self.view.release()
        try:
            self.mem.close()
        except BufferError:
            pass  # a numpy view still alive elsewhere; the GC unmaps it later
