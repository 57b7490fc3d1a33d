"""QMP tests without a VM process: the real VM's QMP side, in the test process.

Tests that only check what QMP answers (texts, defaults, refusals; no guest
execution, no migration) need none of what a ``livemig run`` process costs:
interpreter start, imports, a vCPU. Here :class:`VmOnThread` builds the very
``VmProcess`` of ``livemig run`` (``cli/run.py``: QMPServer, CommandRegistry
and ``register_vm_commands`` over a real Machine, MigrationState and
IncomingState) from the same command line, and runs its asyncio loop on a
thread of the test process, listening on a UNIX socket in the test's
directory. :class:`InProcessVm` is :class:`livemig.cli.driver.Vm` (so
``qemu.qmp`` drives it and the e2e helpers take it) with that thread in
place of the process.

What differs from a process, on purpose:

* the guest is never started (``VmProcess.listen``, not ``main``): a VM
  without ``-S`` or ``-incoming`` stays in ``prelaunch``;
* ``-incoming URI`` other than ``defer`` is refused: it would start a
  migration listener thread in the test process;
* no signal handlers, no exit status; ``stderr_text()`` is what the VM logged
  at WARNING and above (tracebacks included), not a process's stderr.

Every wait has a deadline; nothing sleeps "long enough".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from livemig.cli.driver import Vm, VmSpec
from livemig.cli.run import VmProcess
from livemig.cli.run_options import parse_run_args

RAM = "32M"
WALK_END = "16M"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

T = TypeVar("T")


class _LogCapture(logging.Handler):
    """Formatted records (with their tracebacks) of everything logged while a VM lives."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("livemig: %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class VmOnThread:
    """A ``VmProcess`` whose asyncio loop runs on a thread of this process.

    ``argv``: what follows ``livemig run``. The constructor returns once every
    ``-qmp`` socket listens; :meth:`close` undoes everything (idempotent).
    """

    def __init__(self, argv: list[str]) -> None:
        opts = parse_run_args(argv)
        if opts.incoming not in (None, "defer"):
            raise ValueError("in-process VMs take no -incoming URI but defer (no migration)")
        self.log = _LogCapture()
        logging.getLogger().addHandler(self.log)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="qmp-inprocess",
                                       daemon=True)
        self.vm: VmProcess | None = None
        self.thread.start()
        try:
            self.vm = VmProcess(opts)
            self.call(self.vm.listen(), START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the VM's loop and wait for its result (any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def alive(self) -> bool:
        """The loop runs and the QMP server has not closed (the process would live)."""
        return (self.thread.is_alive() and self.vm is not None
                and not self.vm.server.closed)

    def log_text(self) -> str:
        return "\n".join(self.log.lines)

    def close(self) -> None:
        """What ``VmProcess.main`` does after a quit, then stop the loop thread."""
        if self.thread.is_alive():
            if self.vm is not None:
                with contextlib.suppress(Exception):
                    self.call(self._shutdown(self.vm), STOP_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(STOP_TIMEOUT_S)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        logging.getLogger().removeHandler(self.log)

    @staticmethod
    async def _shutdown(vm: VmProcess) -> None:
        vm.source.cancel()
        await vm.server.close()
        vm.machine.close()
        await asyncio.get_running_loop().shutdown_default_executor()  # blocking commands


def run_argv(vm: Vm) -> list[str]:
    """The arguments ``vm`` gives ``livemig run`` (what :class:`VmOnThread` takes)."""
    argv = vm.argv()
    return argv[argv.index("run") + 1:]


class InProcessVm(Vm):
    """:class:`livemig.cli.driver.Vm` on a :class:`VmOnThread`: same argv, same client."""

    host: VmOnThread | None = None

    @classmethod
    async def start(cls, spec: VmSpec, workdir: str, timeout: float = START_TIMEOUT_S) -> Vm:
        vm = cls(spec, workdir)
        vm.host = await asyncio.to_thread(VmOnThread, run_argv(vm))
        try:
            await asyncio.wait_for(vm.qmp.connect(vm.qmp_path), timeout)
        except BaseException:
            await asyncio.to_thread(vm.host.close)
            raise
        vm._event_task = asyncio.create_task(vm._collect_events())
        return vm

    @property
    def alive(self) -> bool:
        return self.host is not None and self.host.alive

    def stderr_text(self) -> str:
        return self.host.log_text() if self.host is not None else ""

    def peak_rss_kib(self) -> int | None:
        return None  # the test process's, not a VM's: measure RSS on a real process

    async def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), timeout)
        if self._event_task is not None:
            self._event_task.cancel()
        await asyncio.to_thread(self.kill)

    def kill(self) -> None:
        if self.host is not None:
            self.host.close()


class InProcessFleet:
    """Starts the in-process VMs of one test (the ``vms``/``fleet`` fixtures' interface)."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.vms: list[InProcessVm] = []

    async def start(self, name: str, *, ram: str = RAM, walk_end: str = WALK_END,
                    incoming: str | None = None, paused: bool = False,
                    devices: tuple[str, ...] | list[str] = (),
                    extra: list[str] | None = None) -> InProcessVm:
        spec = VmSpec(engine="livemig", name=name, ram=ram, accel="soft", walk_end=walk_end,
                      incoming=incoming, paused=paused, devices=list(devices),
                      extra=list(extra or []))
        vm = await InProcessVm.start(spec, self.workdir)
        assert isinstance(vm, InProcessVm)
        self.vms.append(vm)
        return vm

    async def close_all(self) -> None:
        for vm in self.vms:
            await vm.close()

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()


def inprocess_fleet(tmp_path: Any) -> Iterator[InProcessFleet]:
    """Body of a test module's fixture: ``yield from inprocess_fleet(tmp_path)``."""
    fleet = InProcessFleet(str(tmp_path))
    try:
        yield fleet
    finally:
        fleet.kill_all()


def run_in_fleet(fleet: InProcessFleet, body: Any) -> Any:
    """Run ``body()`` on a fresh loop; the fleet's VMs are closed after, on that loop."""
    import asyncio

    async def main() -> Any:
        try:
            return await body()
        finally:
            await fleet.close_all()
    return asyncio.run(main())
