"""userfaultfd(2) from ctypes: missing-page faults of guest RAM handled in user space.

Postcopy's destination runs the guest before all its RAM has arrived: the
RAM is registered with ``UFFDIO_REGISTER_MODE_MISSING``, a thread touching a
page that was never placed blocks in the kernel (a KVM vCPU inside
``KVM_RUN``, a Python thread inside whatever C call touched it) and a
``uffd_msg`` naming the address is read from the descriptor; the page is then
placed whole with ``UFFDIO_COPY`` (or ``UFFDIO_ZEROPAGE``), which also wakes
the waiters. A page is never visible half-written: the kernel copies it into a
fresh page and maps that page in one step.

Facts from Linux's ``include/uapi/linux/userfaultfd.h`` (checked against the
installed header: the ioctl numbers below are what its macros expand to):
``UFFD_API`` 0xAA, ioctl type ``UFFDIO`` 0xAA, ``_UFFDIO_REGISTER`` 0x00,
``_UNREGISTER`` 0x01, ``_WAKE`` 0x02, ``_COPY`` 0x03, ``_ZEROPAGE`` 0x04,
``_API`` 0x3F; ``USERFAULTFD_IOC_NEW`` = ``_IO(0xAA, 0x00)`` on
``/dev/userfaultfd`` (Linux 6.1+); the syscall is 323 on x86-64; a
``uffd_msg`` is 32 bytes. The descriptor comes from ``/dev/userfaultfd`` when
it exists (it needs no ``vm.unprivileged_userfaultfd``), else from the syscall.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

_libc = ctypes.CDLL(None, use_errno=True)   # CDLL calls release the GIL
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

UFFD_API: Final = 0xAA
UFFDIO: Final = 0xAA
USERFAULTFD_IOC: Final = 0xAA
SYS_userfaultfd: Final = 323            # x86-64
UFFD_USER_MODE_ONLY: Final = 1
DEV_USERFAULTFD: Final = "/dev/userfaultfd"

_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE = 0x00, 0x01, 0x02
_UFFDIO_COPY, _UFFDIO_ZEROPAGE, _UFFDIO_API = 0x03, 0x04, 0x3F

UFFDIO_REGISTER_MODE_MISSING: Final = 1 << 0
UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
UFFDIO_REGISTER_MODE_MINOR: Final = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0

UFFD_EVENT_PAGEFAULT: Final = 0x12
UFFD_EVENT_FORK: Final = 0x13
UFFD_EVENT_REMAP: Final = 0x14
UFFD_EVENT_REMOVE: Final = 0x15
UFFD_EVENT_UNMAP: Final = 0x16
UFFD_PAGEFAULT_FLAG_WRITE: Final = 1 << 0
UFFD_PAGEFAULT_FLAG_WP: Final = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR: Final = 1 << 2

UFFD_FEATURE_EVENT_REMOVE: Final = 1 << 3
UFFD_FEATURE_EVENT_UNMAP: Final = 1 << 6
UFFD_FEATURE_THREAD_ID: Final = 1 << 8


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("zeropage", ctypes.c_int64)]


def _ioc(direction: int, nr: int, size: int, kind: int = UFFDIO) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
UFFDIO_API: Final = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_API, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER: Final = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_REGISTER,
                              ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, _UFFDIO_UNREGISTER, ctypes.sizeof(uffdio_range))
UFFDIO_WAKE: Final = _ioc(_IOC_READ, _UFFDIO_WAKE, ctypes.sizeof(uffdio_range))
UFFDIO_COPY: Final = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_COPY, ctypes.sizeof(uffdio_copy))
UFFDIO_ZEROPAGE: Final = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_ZEROPAGE,
                              ctypes.sizeof(uffdio_zeropage))
USERFAULTFD_IOC_NEW: Final = _ioc(_IOC_NONE, 0x00, 0, USERFAULTFD_IOC)

UFFD_MSG: Final = struct.Struct("=BBHI24s")   # event, reserved1..3, the 24-byte union
_PAGEFAULT_ARG: Final = struct.Struct("=QQI4x")  # flags, address, feat.ptid
assert UFFD_MSG.size == 32 and _PAGEFAULT_ARG.size == 24


@dataclass(frozen=True, slots=True)
class PageFault:
    """``UFFD_EVENT_PAGEFAULT``: ``address`` (the faulting address; page-aligned
    unless UFFD_FEATURE_EXACT_ADDRESS), ``flags`` (UFFD_PAGEFAULT_FLAG_*),
    ``ptid`` (the faulting thread with UFFD_FEATURE_THREAD_ID, else 0)."""

    address: int
    flags: int
    ptid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)


@dataclass(frozen=True, slots=True)
class UffdEvent:
    """Any other event (fork, remap, remove, unmap) with its raw 24-byte argument."""

    event: int
    arg: bytes


def decode_msgs(data: bytes) -> list[PageFault | UffdEvent]:
    """``uffd_msg`` records (32 bytes each) as events."""
    if len(data) % UFFD_MSG.size:
        raise ValueError(f"uffd_msg read of {len(data)} bytes is not a multiple of 32")
    out: list[PageFault | UffdEvent] = []
    for event, _r1, _r2, _r3, arg in UFFD_MSG.iter_unpack(data):
        if event == UFFD_EVENT_PAGEFAULT:
            flags, address, ptid = _PAGEFAULT_ARG.unpack(arg)
            out.append(PageFault(address, flags, ptid))
        else:
            out.append(UffdEvent(event, arg))
    return out


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _open_fd(flags: int, method: Literal["auto", "dev", "syscall"]) -> tuple[int, str]:
    """A new userfaultfd and how it was made ("dev" or "syscall")."""
    if method in ("auto", "dev"):
        try:
            dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            if method == "dev":
                raise
        else:
            try:
                fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
                _check(fd, "USERFAULTFD_IOC_NEW")
                return fd, "dev"
            except OSError:
                if method == "dev":
                    raise
            finally:
                os.close(dev)
    fd = _libc.syscall(ctypes.c_long(SYS_userfaultfd), ctypes.c_long(flags))
    _check(fd, "userfaultfd")
    return int(fd), "syscall"


class Userfaultfd:
    """One userfaultfd descriptor after the ``UFFDIO_API`` handshake.

    Non-blocking by default: ``read_events`` returns ``[]`` when nothing is
    pending, so a fault thread polls it with a wake-up descriptor beside it
    (as QEMU's ``postcopy_ram_fault_thread`` does). ``registered`` keeps the
    ranges still registered so ``close`` can unregister them on every path.
    """

    def __init__(self, features: int = 0, *, nonblock: bool = True,
                 method: Literal["auto", "dev", "syscall"] = "auto") -> None:
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
        self.fd, self.method = _open_fd(flags, method)
        self.registered: dict[int, int] = {}
        try:
            api = uffdio_api(UFFD_API, features, 0)
            _check(_libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)), "UFFDIO_API")
        except BaseException:
            os.close(self.fd)
            raise
        self.features, self.ioctls = int(api.features), int(api.ioctls)

    def fileno(self) -> int:
        return self.fd

    def register(self, start: int, length: int,
                 mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
        """Register [start, start+length) (page-aligned); returns the range's ioctls mask."""
        reg = uffdio_register(uffdio_range(start, length), mode, 0)
        _check(_libc.ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)), "UFFDIO_REGISTER")
        self.registered[start] = length
        return int(reg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        rng = uffdio_range(start, length)
        _check(_libc.ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.byref(rng)), "UFFDIO_UNREGISTER")
        self.registered.pop(start, None)

    def wake(self, start: int, length: int) -> None:
        rng = uffdio_range(start, length)
        _check(_libc.ioctl(self.fd, UFFDIO_WAKE, ctypes.byref(rng)), "UFFDIO_WAKE")

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> None:
        """Place ``length`` bytes from address ``src`` at ``dst`` (both page-aligned
        ranges), waking threads blocked there. Retries the rest after a partial
        copy (EAGAIN); a page already present raises OSError(EEXIST)."""
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        while length:
            cp = uffdio_copy(dst, src, length, mode, 0)
            if _libc.ioctl(self.fd, UFFDIO_COPY, ctypes.byref(cp)) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.EAGAIN or cp.copy <= 0:
                raise OSError(err, f"UFFDIO_COPY: {os.strerror(err)}")
            dst, src, length = dst + cp.copy, src + cp.copy, length - cp.copy

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> None:
        """Map zero pages over [dst, dst+length) and wake its waiters."""
        mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        while length:
            zp = uffdio_zeropage(uffdio_range(dst, length), mode, 0)
            if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.byref(zp)) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.EAGAIN or zp.zeropage <= 0:
                raise OSError(err, f"UFFDIO_ZEROPAGE: {os.strerror(err)}")
            dst, length = dst + zp.zeropage, length - zp.zeropage

    def read_events(self, max_msgs: int = 64) -> list[PageFault | UffdEvent]:
        """Pending events (at most ``max_msgs``); ``[]`` if none (non-blocking fd)."""
        try:
            data = os.read(self.fd, UFFD_MSG.size * max_msgs)
        except BlockingIOError:
            return []
        return decode_msgs(data)

    def close(self) -> None:
        """Unregister what is still registered (waking its waiters) and close."""
        if self.fd < 0:
            return
        for start, length in list(self.registered.items()):
            try:
                self.unregister(start, length)
            except OSError:
                pass                        # the mapping is gone: nothing left registered
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_runs(pages: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64],
                                                     npt.NDArray[np.int64]]:
    """Runs of consecutive page numbers in the sorted ``pages``: (first, count)
    arrays, so a batch is placed with one ``UFFDIO_COPY`` per run, not per page."""
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return pages[starts].astype(np.int64), (ends - starts).astype(np.int64)


