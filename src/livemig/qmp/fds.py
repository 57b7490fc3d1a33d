"""File descriptors passed to the monitor (QEMU's monitor/fds.c).

* :class:`MonitorFds`, one per QMP client (QEMU's ``mon->fds``): the
  descriptors the client sent with SCM_RIGHTS and has not yet named
  (``received``: the last batch only, as QEMU's char-socket keeps), and
  those ``getfd`` named. ``migrate fd:NAME`` *takes* a named one
  (``monitor_get_fd``: the caller owns it from then on).
* :class:`FdSets`, one per VM (QEMU's process-wide ``mon_fdsets``):
  ``add-fd`` / ``-add-fd`` members, ``remove-fd``, ``query-fdsets``, and
  :meth:`FdSets.dup_fd` for ``/dev/fdset/N`` paths (``qemu_open``).

Which client's table a command uses: :data:`CURRENT`, set by the QMP
server in each client's task (QEMU's ``monitor_cur()``).

Texts are QEMU 10.0.2's.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from livemig.qmp.errors import QMPError

NO_FD_SUPPLIED: Final = "No file descriptor supplied via SCM_RIGHTS"
FDSET_PREFIX: Final = "/dev/fdset/"


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class MonitorFds:
    """One monitor's descriptors. Used on the QMP loop only."""

    def __init__(self) -> None:
        self._received: list[int] = []
        self._named: dict[str, int] = {}

    # -- the read path (server) --
    def receive(self, fds: list[int]) -> None:
        """Descriptors that came with one read: they replace (and close) earlier ones."""
        old, self._received = self._received, list(fds)
        for fd in old:
            _close(fd)

    def take_received(self) -> int | None:
        """``qemu_chr_fe_get_msgfd``: the first received descriptor; the rest are closed."""
        fds, self._received = self._received, []
        for fd in fds[1:]:
            _close(fd)
        return fds[0] if fds else None

    # -- commands --
    def getfd(self, fdname: str) -> None:
        fd = self.take_received()
        if fd is None:
            raise QMPError(NO_FD_SUPPLIED)
        if fdname[:1].isdigit():
            _close(fd)
            raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
        old = self._named.get(fdname)
        self._named[fdname] = fd
        if old is not None:
            _close(old)

    def closefd(self, fdname: str) -> None:
        fd = self._named.pop(fdname, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{fdname}' not found")
        _close(fd)

    def take(self, fdname: str) -> int:
        """``monitor_get_fd``: the caller owns the descriptor from now on."""
        fd = self._named.pop(fdname, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{fdname}' has not been found")
        return fd

    def names(self) -> list[str]:
        return list(self._named)

    def close(self) -> None:
        """The client is gone: close what it left behind."""
        for fd in [*self._received, *self._named.values()]:
            _close(fd)
        self._received, self._named = [], {}


# The monitor of the command being executed (QEMU's monitor_cur()).
CURRENT: Final[contextvars.ContextVar[MonitorFds | None]] = contextvars.ContextVar(
    "livemig_monitor_fds", default=None)


def current() -> MonitorFds:
    mon = CURRENT.get()
    if mon is None:  # a command run outside a client's task (never from QMP)
        mon = MonitorFds()
    return mon


def monitor_fd_param(fdname: str) -> int:
    """QEMU's ``monitor_fd_param``: a name is a monitor descriptor (taken), a number
    a descriptor of this process (duplicated, so the caller owns what it gets)."""
    if not fdname[:1].isdigit():
        return current().take(fdname)
    try:
        fd = int(fdname, 10)
        return os.dup(fd)
    except (ValueError, OSError):
        raise QMPError(f"Invalid file descriptor number '{fdname}'") from None


@dataclass
class _Fdset:
    id: int
    fds: list[tuple[int, str | None]] = field(default_factory=list)  # newest first


class FdSets:
    """The VM's descriptor sets. Thread-safe (the migration threads open ``/dev/fdset/N``)."""

    def __init__(self) -> None:
        self._sets: list[_Fdset] = []   # ordered by id
        self._lock = threading.Lock()

    def add(self, fd: int, fdset_id: int | None = None,
            opaque: str | None = None) -> dict[str, int]:
        """``monitor_fdset_add_fd``: AddfdInfo. ``fdset_id`` None: the lowest free id."""
        with self._lock:
            if fdset_id is not None and fdset_id < 0:
                raise QMPError("Parameter 'fdset-id' expects a non-negative value")
            if fdset_id is None:
                fdset_id = 0
                for s in self._sets:
                    if s.id != fdset_id:
                        break
                    fdset_id += 1
            target = next((s for s in self._sets if s.id == fdset_id), None)
            if target is None:
                target = _Fdset(fdset_id)
                self._sets.append(target)
                self._sets.sort(key=lambda s: s.id)
            target.fds.insert(0, (fd, opaque))
            return {"fdset-id": fdset_id, "fd": fd}

    def remove(self, fdset_id: int, fd: int | None = None) -> None:
        """``qmp_remove_fd``: the members are closed at once (no user keeps a
        duplicate registered here), an emptied set disappears."""
        with self._lock:
            target = next((s for s in self._sets if s.id == fdset_id), None)
            if target is not None:
                if fd is None:
                    gone, target.fds = target.fds, []
                else:
                    gone = [m for m in target.fds if m[0] == fd][:1]
                    target.fds = [m for m in target.fds if m not in gone]
                if gone or fd is None:
                    for member_fd, _ in gone:
                        _close(member_fd)
                    if not target.fds:
                        self._sets.remove(target)
                    return
        what = f"fdset-id:{fdset_id}" if fd is None else f"fdset-id:{fdset_id}, fd:{fd}"
        raise QMPError(f"File descriptor named '{what}' not found")

    def query(self) -> list[dict[str, Any]]:
        """``query-fdsets``: highest id first, each set's members oldest first (QEMU's)."""
        with self._lock:
            out = []
            for s in reversed(self._sets):
                fds = []
                for fd, opaque in reversed(s.fds):
                    info: dict[str, Any] = {"fd": fd}
                    if opaque is not None:
                        info["opaque"] = opaque
                    fds.append(info)
                out.append({"fdset-id": s.id, "fds": fds})
            return out

    def dup_fd(self, path: str, flags: int) -> int:
        """``qemu_open`` of ``/dev/fdset/N``: a duplicate of the first member whose
        access mode is that of ``flags`` (the caller owns it)."""
        text = path[len(FDSET_PREFIX):]
        if not text.isdigit():
            raise QMPError(f"Could not parse fdset {path}")
        fdset_id = int(text)
        with self._lock:
            target = next((s for s in self._sets if s.id == fdset_id), None)
            if target is None:
                raise QMPError(f"Failed to find fdset {FDSET_PREFIX}{fdset_id}")
            for fd, _ in target.fds:
                try:
                    mode = fcntl.fcntl(fd, fcntl.F_GETFL)
                except OSError:
                    raise QMPError(f"Failed to read file status flags for fd={fd}") from None
                if mode & os.O_ACCMODE == flags & os.O_ACCMODE:
                    try:
                        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
                    except OSError:
                        raise QMPError(
                            f"Failed to dup() given file descriptor fd={fd}") from None
        raise QMPError(f"Failed to find file descriptor with matching flags=0x{flags:x}")

    def close(self) -> None:
        with self._lock:
            for s in self._sets:
                for fd, _ in s.fds:
                    _close(fd)
            self._sets = []


def add_fd_option(fdsets: FdSets, fd: int, fdset_id: int, opaque: str | None) -> None:
    """``-add-fd fd=N,set=M[,opaque=S]`` (QEMU's parse_add_fd, after the option
    checks in ``cli/run_options.py``): a descriptor inherited across exec, so
    FD_CLOEXEC clear; its duplicate joins the set."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        flags = -1
    if flags == -1 or flags & fcntl.FD_CLOEXEC:
        raise ValueError("fd is not valid or already in use")
    if fdset_id < 0:
        raise ValueError("set option is required and must be non-negative")
    try:
        dupfd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError as exc:
        raise ValueError(f"error duplicating fd: {exc.strerror}") from None
    fdsets.add(dupfd, fdset_id, opaque)
