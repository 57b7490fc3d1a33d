"""``-daemonize`` and ``-pidfile``, as QEMU's os-posix.c does them.

libvirt's capability probe starts the emulator with ``-daemonize -pidfile F``
and waits for the first process to exit: it then reads the pidfile and
connects to the monitor. So the first process must exit only once the
daemon has written the pidfile and its monitors listen, and with status 1
when the daemon failed. QEMU's way, kept here: fork; the parent waits for
one status byte on a pipe; the child starts a session and forks again (the
daemon is no session leader); the daemon writes the pidfile, builds the VM,
binds its monitors, then (:func:`setup_post`) sends 0 and puts /dev/null on
its standard descriptors. A daemon that fails before that exits, the pipe
closes without a byte and the parent exits 1 (the daemon's message is on
the shared stderr).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys


class PidFileError(Exception):
    pass


class PidFile:
    """QEMU's ``qemu_write_pidfile``: created 0600, locked for the process's life
    (a second VM with the same pidfile fails), truncated, ``PID\\n``; removed at
    exit if it is still ours (``qemu_unlink_pidfile``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PidFileError(f"Could not create '{path}': {exc.strerror}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            raise PidFileError(f"Cannot lock pid file: {exc.strerror}") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        self.inode = os.fstat(self.fd).st_ino

    def unlink(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def os_daemonize() -> int:
    """Fork as QEMU's ``os_daemonize``; returns, in the daemon only, the pipe's write
    end for :func:`setup_post`. The first process never returns."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        while True:
            try:
                status = os.read(read_end, 1)
                break
            except InterruptedError:
                continue
        # Only a one-byte zero from the daemon, after its start-up, is success.
        os._exit(0 if status == b"\0" else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o027)
    for sig in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    return write_end


def setup_post(pipe: int) -> None:
    """QEMU's ``os_setup_post`` for a daemon: working directory ``/``, tell the first
    process that start-up succeeded, standard descriptors onto /dev/null."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.write(pipe, b"\0")
    finally:
        os.close(pipe)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
