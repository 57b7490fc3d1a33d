"""Stand-ins for the machine and the incoming side that the RAM handlers and
``savevm.qemu_loadvm_state`` need, for tests and bench scripts that load a
stream without a VM. Import with the ``tests`` directory on ``sys.path``
(as ``streams.py``)."""

from __future__ import annotations


class RamMachine:
    """What the RAM handlers ask of a machine: its RAM, whether it runs."""

    def __init__(self, ram) -> None:
        self.ram = ram

    def is_running(self) -> bool:
        return True


class _NoLogCpu:
    """A vCPU whose writes mark the DirtyLog themselves (as the soft vCPU's do):
    nothing to pull at a sync."""

    def log_dirty_start(self) -> None: ...
    def log_dirty_stop(self) -> None: ...
    def log_dirty_sync(self) -> None: ...


class LoggedRamMachine(RamMachine):
    """A RamMachine with a dirty log the test's "guest" writes mark, so the
    source's whole save path (setup, syncs, sends) runs without a vCPU."""

    def __init__(self, ram) -> None:
        from livemig.machine.dirty_log import DirtyLog
        super().__init__(ram)
        self.dirty_log = DirtyLog(ram.npages)
        self.cpu = _NoLogCpu()

    def guest_write(self, page: int, value: int) -> None:
        self.ram.pages[page, 0] = value
        self.dirty_log.mark_range(page, page + 1)


class QuietHost:
    """A LoadvmHost with no return path, no switchover-ack, no multifd; a
    subclass supplies ``read_into`` (and ``read_iovec`` for direct reads)."""

    def switchover_ack_enabled(self) -> bool:
        return False

    def approve_switchover(self, handler) -> None: ...
    def open_return_path(self) -> None: ...
    def has_return_path(self) -> bool:
        return False
    def send_pong(self, value: int) -> None: ...
    def set_switchover_ack_pending(self, count: int) -> None: ...
    def set_device_cost(self, ms: float) -> None: ...
    def multifd_recv_sync_main(self) -> None: ...
    def mark(self, name: str) -> None: ...


class ChannelHost(QuietHost):
    """Reads a channel, at most ``max_read`` bytes a read (the network hands
    over what has arrived, rarely the whole stream)."""

    def __init__(self, ch, max_read: int = 1 << 30) -> None:
        self.ch, self.max_read = ch, max_read

    def read_into(self, buf) -> int:
        return self.ch.recv_into(buf[:self.max_read])

    def read_iovec(self, iov) -> int:
        return self.ch.recv_iovec_some(iov)
