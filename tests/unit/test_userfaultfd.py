"""userfaultfd from ctypes on a real anonymous mapping: a thread touching a
missing page blocks in the kernel until the page is placed, and the handler
reads the fault from the descriptor. Every wait is on the descriptor (poll)
or on the faulting thread's exit, never on a sleep."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.machine import userfaultfd as U

PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)


def _usable() -> str | None:
    try:
        U.Userfaultfd().close()
    except OSError as exc:
        return f"userfaultfd not usable here: {exc}"
    return None


pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(_usable() is not None, reason=str(_usable()))]


class Area:
    """An anonymous mapping of ``n`` pages and its address."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.mem = mmap.mmap(-1, n * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def page(self, i: int) -> bytes:
        return bytes(self.mem[i * PAGE:(i + 1) * PAGE])


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _uffd_fds() -> list[str]:
    """This process's descriptors that are userfaultfds."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]":
                out.append(name)
        except OSError:
            pass
    return out


def test_ioctl_numbers_are_the_kernel_headers():
    # What <linux/userfaultfd.h>'s macros expand to on x86-64 (gcc, this host).
    assert U.UFFDIO_API == 0xC018AA3F
    assert U.UFFDIO_REGISTER == 0xC020AA00
    assert U.UFFDIO_UNREGISTER == 0x8010AA01
    assert U.UFFDIO_WAKE == 0x8010AA02
    assert U.UFFDIO_COPY == 0xC028AA03
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.USERFAULTFD_IOC_NEW == 0xAA00
    assert U.UFFD_MSG.size == 32


@pytest.mark.parametrize("method", ["dev", "syscall"])
def test_both_ways_to_open_give_a_userfaultfd(method):
    if method == "dev" and not os.path.exists(U.DEV_USERFAULTFD):
        pytest.skip("no /dev/userfaultfd")
    before = _fd_count()
    with U.Userfaultfd(method=method) as uffd:
        assert uffd.method == method
        assert os.readlink(f"/proc/self/fd/{uffd.fd}") == "anon_inode:[userfaultfd]"
        assert uffd.ioctls & (1 << 0x3F)          # the API ioctl itself
    assert _fd_count() == before


def test_register_reports_the_range_ioctls():
    area = Area(4)
    with U.Userfaultfd() as uffd:
        ioctls = uffd.register(area.addr, 4 * PAGE)
        for nr in (0x02, 0x03, 0x04):             # WAKE, COPY, ZEROPAGE
            assert ioctls & (1 << nr)


def test_a_reader_blocks_until_the_page_is_copied():
    area = Area(8)
    src = np.full(PAGE, 0xA5, dtype=np.uint8)
    out = ctypes.create_string_buffer(PAGE)
    with U.Userfaultfd() as uffd:
        uffd.register(area.addr, 8 * PAGE)
        # memmove is a ctypes foreign call: the GIL is released while it faults.
        t = threading.Thread(target=ctypes.memmove, args=(out, area.addr + 5 * PAGE, PAGE))
        t.start()
        r, _, _ = select.select([uffd.fd], [], [], 10)
        assert r, "no fault reported"
        events = uffd.read_events()
        assert events == [U.PageFault(area.addr + 5 * PAGE, 0, 0)]
        assert not events[0].write
        assert t.is_alive()                       # still blocked in the kernel
        uffd.copy(area.addr + 5 * PAGE, src.ctypes.data, PAGE)
        t.join(10)
        assert not t.is_alive()
        assert out.raw == bytes(src)
        assert uffd.read_events() == []           # non-blocking: nothing pending


def test_write_faults_of_a_range_are_each_placed_whole():
    """A writer over four missing pages (madvise MADV_POPULATE_WRITE, as the soft
    vCPU touches a batch) faults page by page, each with the WRITE flag."""
    area = Area(16)
    src = np.arange(16 * PAGE, dtype=np.uint64).astype(np.uint8)
    rc: list[int] = []

    def populate() -> None:
        rc.append(_libc.madvise(ctypes.c_void_p(area.addr + 4 * PAGE),
                                ctypes.c_size_t(4 * PAGE), 23))

    faults = []
    with U.Userfaultfd() as uffd:
        uffd.register(area.addr, 16 * PAGE)
        t = threading.Thread(target=populate)
        t.start()
        while t.is_alive() or select.select([uffd.fd], [], [], 0)[0]:
            select.select([uffd.fd], [], [], 0.2)
            for ev in uffd.read_events():
                assert isinstance(ev, U.PageFault)
                faults.append(ev)
                i = (ev.address - area.addr) // PAGE
                uffd.copy(area.addr + i * PAGE, src.ctypes.data + i * PAGE, PAGE)
        t.join()
    assert rc == [0]
    assert [(f.address - area.addr) // PAGE for f in faults] == [4, 5, 6, 7]
    assert all(f.write for f in faults)
    for i in range(4, 8):
        assert area.page(i) == bytes(src[i * PAGE:(i + 1) * PAGE])


def test_copy_of_a_run_zeropage_and_already_present():
    area = Area(8)
    src = np.frombuffer(os.urandom(3 * PAGE), dtype=np.uint8).copy()
    with U.Userfaultfd() as uffd:
        uffd.register(area.addr, 8 * PAGE)
        uffd.copy(area.addr + 2 * PAGE, src.ctypes.data, 3 * PAGE)   # one ioctl, three pages
        uffd.zeropage(area.addr + 6 * PAGE, PAGE)
        with pytest.raises(OSError) as exc:
            uffd.copy(area.addr + 3 * PAGE, src.ctypes.data, PAGE)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(OSError) as exc:
            uffd.zeropage(area.addr + 6 * PAGE, PAGE)
        assert exc.value.errno == errno.EEXIST
    assert bytes(area.mem[2 * PAGE:5 * PAGE]) == bytes(src)
    assert area.page(6) == bytes(PAGE)


def test_close_unregisters_so_touching_no_longer_faults():
    area = Area(4)
    before = len(_uffd_fds())
    uffd = U.Userfaultfd()
    uffd.register(area.addr, 4 * PAGE)
    assert uffd.registered == {area.addr: 4 * PAGE}
    assert len(_uffd_fds()) == before + 1
    uffd.close()
    uffd.close()                                   # idempotent
    assert len(_uffd_fds()) == before
    assert area.page(1) == bytes(PAGE)             # plain anonymous memory again


def test_unregister_forgets_the_range():
    area = Area(4)
    with U.Userfaultfd() as uffd:
        uffd.register(area.addr, 4 * PAGE)
        uffd.unregister(area.addr, 4 * PAGE)
        assert uffd.registered == {}
        assert area.page(0) == bytes(PAGE)


def test_bad_range_is_a_clear_error():
    with U.Userfaultfd() as uffd, pytest.raises(OSError, match="UFFDIO_REGISTER: Invalid"):
        uffd.register(12345, PAGE)


def test_decode_msgs_rejects_partial_records():
    with pytest.raises(ValueError, match="multiple of 32"):
        U.decode_msgs(b"\0" * 31)
    other = U.UFFD_MSG.pack(U.UFFD_EVENT_REMOVE, 0, 0, 0, b"\1" * 24)
    assert U.decode_msgs(other) == [U.UffdEvent(U.UFFD_EVENT_REMOVE, b"\1" * 24)]


@given(st.sets(st.integers(0, 500), max_size=100))
def test_page_runs_cover_exactly_the_pages(pages):
    arr = np.array(sorted(pages), dtype=np.int64)
    first, count = U.page_runs(arr)
    rebuilt = [p for f, c in zip(first, count, strict=True) for p in range(f, f + c)]
    assert rebuilt == sorted(pages)
    assert all(f + c not in pages for f, c in zip(first, count, strict=True))
