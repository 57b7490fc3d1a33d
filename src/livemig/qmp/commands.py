"""The VM's QMP commands: QEMU's names, arguments and error texts.

Handlers run on the QMP event loop (``@upper_half``); anything slow is
handed to the migration threads, which report back through events.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from livemig.machine.machine import NONE_MACHINE, RAM_BLOCK_NAME
from livemig.machine.runstate import RunState
from livemig.migration.errors import LoadError, MigrationError
from livemig.migration.status import MigrationStatus
from livemig.qapi import schema
from livemig.qapi.capabilities import (
    MIGRATE_SET_CAPABILITIES_ARGS,
    MIGRATION_CAPABILITY_STATUS_LIST,
)
from livemig.qapi.errors import (
    DEVICE_NOT_FOUND,
    INCOMING_ALREADY_STARTED,
    INCOMING_NOT_SPECIFIED,
    MIGRATION_IN_PROGRESS,
)
from livemig.qapi.parameters import MIGRATE_SET_PARAMETERS, MIGRATION_PARAMETERS
from livemig.qapi.schema import Array
from livemig.qmp import fds as monitor_fds
from livemig.qmp import introspect
from livemig.qmp.errors import QMPError
from livemig.qmp.fds import FdSets
from livemig.qmp.manager import register_manager_commands
from livemig.qmp.registry import ArgSpec, CommandRegistry
from livemig.qom.object import object_options_type
from livemig.transport import (
    Address,
    FdAddress,
    FileAddress,
    TransportError,
    resolve_migrate_args,
)
from livemig.transport.uri import is_fdset_path

if TYPE_CHECKING:
    from livemig.cli.run import VmProcess

_CHANNELS = schema.MIGRATION_CHANNEL_LIST
# What a /dev/fdset/N descriptor must have been opened with (QEMU's file: flags).
_FILE_OUT_FLAGS = os.O_CREAT | os.O_WRONLY
_FILE_IN_FLAGS = os.O_RDONLY
# Threads query-migrationthreads lists (QEMU's migration_threads_add callers).
_MIGRATION_THREADS = ("live_migration", "mig/src/send_")


def _thread_id(name: str) -> int | None:
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            return thread.native_id
    return None


def resolve_descriptors(address: Address, fdsets: FdSets, *, incoming: bool) -> Address:
    """Give ``fd:NAME`` and ``file:/dev/fdset/N`` their descriptor now, so a wrong
    name fails the command at once with QEMU's text (``monitor_get_fd``,
    ``qemu_open``), and the transport opens a descriptor, not a name."""
    if isinstance(address, FdAddress):
        # QEMU 10.0: migrate takes monitor names only; migrate-incoming also numbers.
        fd = (monitor_fds.monitor_fd_param(address.name) if incoming
              else monitor_fds.current().take(address.name))
        return FdAddress(address.name, fd=fd)
    if isinstance(address, FileAddress) and is_fdset_path(address.filename):
        fd = fdsets.dup_fd(address.filename, _FILE_IN_FLAGS if incoming else _FILE_OUT_FLAGS)
        return FileAddress(address.filename, address.offset, fd=fd)
    return address


def _close_descriptor(address: Address) -> None:
    fd = getattr(address, "fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def register_vm_commands(reg: CommandRegistry, vm: VmProcess) -> None:
    machine = vm.machine
    fdsets = FdSets()
    for fd, fdset_id, opaque in getattr(vm.opts, "add_fds", ()):
        try:
            monitor_fds.add_fd_option(fdsets, fd, fdset_id, opaque)
        except ValueError as exc:
            spec = f"fd={fd},set={fdset_id}" + (f",opaque={opaque}" if opaque else "")
            raise ValueError(f"-add-fd {spec}: {exc}") from None

    @reg.register("query-name", returns=schema.NAME_INFO)
    def query_name(args: dict) -> dict:
        return {"name": vm.name} if vm.name else {}

    @reg.register("query-status", returns=schema.STATUS_INFO)
    def query_status(args: dict) -> dict:
        return {"running": machine.is_running(), "status": machine.runstate.value}

    @reg.register("query-kvm", returns=schema.KVM_INFO)
    def query_kvm(args: dict) -> dict:
        from livemig.machine.machine import kvm_usable
        return {"enabled": machine.accel_name == "kvm", "present": kvm_usable()[0]}

    @reg.register("stop")
    def stop(args: dict) -> None:
        if machine.runstate is RunState.INMIGRATE:
            machine.autostart = False
        elif machine.is_running():
            machine.vm_stop(RunState.PAUSED)

    @reg.register("cont")
    def cont(args: dict) -> None:
        state = machine.runstate
        if state is RunState.INMIGRATE:
            machine.autostart = True
        elif state is RunState.FINISH_MIGRATE:
            raise QMPError("Migration is not finalized yet")
        elif state is RunState.SHUTDOWN:
            raise QMPError("Resetting the Virtual Machine is required")
        else:
            machine.vm_start()

    @reg.register("quit")
    def quit_(args: dict) -> None:
        vm.request_quit("host-qmp-quit")

    # -- capabilities and parameters -------------------------------------------------
    @reg.register("query-migrate-capabilities", returns=MIGRATION_CAPABILITY_STATUS_LIST)
    def query_caps(args: dict) -> list:
        return vm.caps.as_qmp_list()

    @reg.register("migrate-set-capabilities", args=MIGRATE_SET_CAPABILITIES_ARGS)
    def set_caps(args: dict) -> None:
        # migrate_caps_check reads the current parameters (zero-copy-send's rule).
        vm.caps.set_from_qmp(args["capabilities"],
                             migration_running=vm.source.is_running(),
                             incoming_started=vm.incoming.started,
                             params=vm.params.as_qmp())

    @reg.register("query-migrate-parameters", returns=MIGRATION_PARAMETERS)
    def query_params(args: dict) -> dict:
        return vm.params.as_qmp()

    @reg.register("migrate-set-parameters", args=MIGRATE_SET_PARAMETERS)
    def set_params(args: dict) -> None:
        # migrate_params_check reads the current capabilities (zero-copy-send, mapped-ram).
        vm.params.set_from_qmp(args, caps=vm.caps.as_dict())
        if "max-bandwidth" in args:
            vm.source.apply_max_bandwidth()

    # -- migration ---------------------------------------------------------------------------
    @reg.register("query-migrate", returns=schema.MIGRATION_INFO)
    def query_migrate(args: dict) -> dict:
        if vm.source.status is not MigrationStatus.NONE:
            return vm.source.query()
        return vm.incoming.query()

    @reg.register("migrate", args={"*uri": "str", "*channels": _CHANNELS, "*detach": "bool",
                                   "*resume": "bool"})
    def migrate(args: dict) -> None:
        if args.get("resume") and vm.source.status is not MigrationStatus.POSTCOPY_PAUSED:
            raise QMPError("Cannot resume if there is no paused migration")
        try:
            address = resolve_migrate_args(args.get("uri"), args.get("channels"),
                                           multifd=vm.caps.multifd)
        except TransportError as exc:
            raise QMPError(exc.desc) from None
        if args.get("resume"):
            vm.source.migrate_resume(resolve_descriptors(address, fdsets, incoming=False))
            return
        if vm.source.is_running():
            raise QMPError(MIGRATION_IN_PROGRESS)
        if machine.runstate is RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if machine.runstate is RunState.POSTMIGRATE:
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        address = resolve_descriptors(address, fdsets, incoming=False)
        try:
            vm.source.migrate(address)
        except BaseException:
            _close_descriptor(address)
            raise

    @reg.register("migrate-incoming", args={"*uri": "str", "*channels": _CHANNELS,
                                            "*exit-on-error": "bool"})
    def migrate_incoming(args: dict) -> None:
        if vm.incoming.started:
            raise QMPError(INCOMING_ALREADY_STARTED)
        if machine.runstate is not RunState.INMIGRATE:
            raise QMPError(INCOMING_NOT_SPECIFIED)
        try:
            # The same resolution as migrate's (qemu_start_incoming_migration).
            address = resolve_migrate_args(args.get("uri"), args.get("channels"),
                                           incoming=True, multifd=vm.caps.multifd)
        except TransportError as exc:
            raise QMPError(exc.desc) from None
        address = resolve_descriptors(address, fdsets, incoming=True)
        try:
            vm.incoming.start(address, exit_on_error=args.get("exit-on-error", True))
        except TransportError as exc:
            _close_descriptor(address)
            raise QMPError(exc.desc) from None

    @reg.register("migrate_cancel")
    def migrate_cancel(args: dict) -> None:
        try:
            vm.source.cancel()
        except MigrationError as exc:        # postcopy: QEMU's refusal
            raise QMPError(exc.desc) from None

    @reg.register("migrate-continue", args={"state": ArgSpec(
        "str", enum=tuple(s.value for s in MigrationStatus))})
    def migrate_continue(args: dict) -> None:
        current = vm.source.status
        if current.value != args["state"]:
            raise QMPError(f"Migration not in expected state: {current.value}")
        vm.source.continue_()

    # -- memory and devices -------------------------------------------------------------------
    @reg.register("pmemsave", args={"val": "int", "size": "int", "filename": "str"},
                  blocking=True)
    def pmemsave(args: dict) -> None:
        """QEMU's qmp_pmemsave(): no range check; guest-physical bytes (from ``val``, a
        uint64 address) without RAM behind them read as zeros, as on QEMU's q35."""
        addr, size = args["val"] & (2**64 - 1), args["size"]
        if size < 0:  # QEMU would write without end; refuse instead
            raise QMPError(f"Invalid addr 0x{addr:016x}/size {size} specified")
        try:
            f = open(args["filename"], "wb")
        except OSError as exc:
            raise QMPError(f"Could not open '{args['filename']}': {exc.strerror}") from None
        regions, chunk = machine.physical_map(), 1 << 20
        with f:
            try:
                while size:
                    n = min(size, chunk)
                    for gpa, block, offset, length in regions:
                        if gpa <= addr < gpa + length:
                            n = min(n, gpa + length - addr)
                            lo = offset + addr - gpa
                            f.write(block.view[lo:lo + n])
                            break
                    else:           # no memory here: zeros up to the next region
                        n = min([n, *(gpa - addr for gpa, _, _, _ in regions if gpa > addr)])
                        f.write(bytes(n))
                    addr, size = (addr + n) & (2**64 - 1), size - n
            except OSError:
                raise QMPError("An IO error has occurred") from None

    # -- postcopy (no recovery yet: pause and recover give QEMU's "not paused" texts)
    @reg.register("migrate-start-postcopy")
    def migrate_start_postcopy(args: dict) -> None:
        if not vm.caps.postcopy_ram:
            raise QMPError("Enable postcopy with migrate_set_capability before the start of "
                           "migration")
        if vm.source.status is MigrationStatus.NONE:
            raise QMPError("Postcopy must be started after migration has been started")
        vm.source.migrate_start_postcopy()     # no error once finished: QEMU's (racy) rule

    @reg.register("migrate-pause", allow_oob=True)
    def migrate_pause(args: dict) -> None:
        in_postcopy = (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER)
        if vm.source.status in in_postcopy:
            vm.source.migrate_pause()
        elif vm.incoming.status in in_postcopy:
            vm.incoming.migrate_pause()
        else:
            raise QMPError("migrate-pause is currently only supported during postcopy-active "
                           "or postcopy-recover state")

    @reg.register("migrate-recover", args={"uri": "str"}, allow_oob=True)
    def migrate_recover(args: dict) -> None:
        if vm.incoming.status is not MigrationStatus.POSTCOPY_PAUSED:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        try:
            address = resolve_migrate_args(args["uri"], None, incoming=True)
            vm.incoming.migrate_recover(resolve_descriptors(address, fdsets, incoming=True))
        except TransportError as exc:
            raise QMPError(exc.desc) from None
        except LoadError as exc:
            raise QMPError(exc.desc) from None

    @reg.register("x-accel-digest", args={"id": "str"}, blocking=True,
                  returns=schema.X_ACCEL_DIGEST_INFO)
    def accel_digest(args: dict) -> dict[str, Any]:
        dev = machine.devices.get(args["id"])
        if dev is None:
            raise QMPError(f"Device '{args['id']}' not found", error_class=DEVICE_NOT_FOUND)
        return {"sha256": dev.digest()}

    # -- the machine, for managers (QEMU's qapi/machine.json, qapi/misc.json) ---------------
    @reg.register("query-machines", args={"*compat-props": "bool"},
                  returns=Array(schema.MACHINE_INFO))
    def query_machines(args: dict) -> list[dict[str, Any]]:
        from livemig.cli.run_options import DEFAULT_MACHINE, MACHINE_TYPES
        out = []
        for name, _desc, alias in MACHINE_TYPES:
            info: dict[str, Any] = {"name": name}
            if alias:
                info["alias"] = alias
            if name == DEFAULT_MACHINE:
                info["is-default"] = True
            info.update({"cpu-max": 1, "hotpluggable-cpus": False,
                         "numa-mem-supported": False, "deprecated": False})
            # No default-cpu-type (optional in QEMU): libvirt 9.0 would turn "max" into
            # a custom CPU model its CPU map does not have; without it, it passes no -cpu.
            if name != NONE_MACHINE:   # QEMU's none machine has no default RAM id
                info["default-ram-id"] = RAM_BLOCK_NAME
            info["acpi"] = False
            out.append(info)
        return out

    @reg.register("query-cpus-fast", returns=Array(schema.CPU_INFO_FAST))
    def query_cpus_fast(args: dict) -> list[dict[str, Any]]:
        if machine.empty:     # -machine none has no vCPU
            return []
        # The vCPU thread exists once the guest first ran; before, the main thread runs it.
        thread_id = _thread_id("vcpu0") or threading.main_thread().native_id or os.getpid()
        return [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                 "thread-id": thread_id,
                 "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
                 "target": "x86_64"}]

    @reg.register("query-uuid", returns=schema.UUID_INFO)
    def query_uuid(args: dict) -> dict[str, str]:
        import uuid
        raw = machine.uuid_bytes or bytes(16)
        return {"UUID": str(uuid.UUID(bytes=raw))}

    @reg.register("query-target", returns=schema.TARGET_INFO)
    def query_target(args: dict) -> dict[str, str]:
        return {"arch": "x86_64"}

    @reg.register("query-migrationthreads", returns=Array(schema.MIGRATION_THREAD_INFO),
                  features=("deprecated",))
    def query_migrationthreads(args: dict) -> list[dict[str, Any]]:
        out = []
        for thread in threading.enumerate():
            if (thread.name.startswith(_MIGRATION_THREADS) and thread.is_alive()
                    and thread.native_id is not None and " " not in thread.name):
                out.append({"name": thread.name, "thread-id": thread.native_id})
        return out

    # -- file descriptors (QEMU's monitor/fds.c) ---------------------------------------------
    @reg.register("getfd", args={"fdname": "str"})
    def getfd(args: dict) -> None:
        monitor_fds.current().getfd(args["fdname"])

    @reg.register("closefd", args={"fdname": "str"})
    def closefd(args: dict) -> None:
        monitor_fds.current().closefd(args["fdname"])

    @reg.register("add-fd", args={"*fdset-id": "int", "*opaque": "str"},
                  returns=schema.ADDFD_INFO)
    def add_fd(args: dict) -> dict[str, int]:
        fd = monitor_fds.current().take_received()
        if fd is None:
            raise QMPError(monitor_fds.NO_FD_SUPPLIED)
        try:
            return fdsets.add(fd, args.get("fdset-id"), args.get("opaque"))
        except QMPError:
            os.close(fd)
            raise

    @reg.register("remove-fd", args={"fdset-id": "int", "*fd": "int"})
    def remove_fd(args: dict) -> None:
        fdsets.remove(args["fdset-id"], args.get("fd"))

    @reg.register("query-fdsets", returns=Array(schema.FDSET_INFO))
    def query_fdsets(args: dict) -> list[dict[str, Any]]:
        return fdsets.query()

    # -- QOM's user-creatable objects (qom/qom-qmp-cmds.c) ---------------------------------
    import livemig.cli.object_types  # noqa: F401  (registers every object type)

    @reg.register("object-add", boxed=object_options_type, allow_preconfig=True,
                  blocking=True)
    def object_add(args: dict) -> None:
        # blocking: completing an object may read files (certificates, keys, lists).
        vm.objects.add(args)

    @reg.register("object-del", args={"id": "str"}, allow_preconfig=True)
    def object_del(args: dict) -> None:
        vm.objects.delete(args["id"])

    register_manager_commands(reg, vm)

    # -- introspection: generated from this registry, the server's protocol commands
    # and the events; registered last, so it lists itself in dispatch order.
    @reg.register("query-qmp-schema", returns=Array(schema.SCHEMA_INFO),
                  allow_preconfig=True)
    def query_qmp_schema(args: dict) -> list[dict[str, Any]]:
        return introspect.query_qmp_schema(
            # The server keeps its protocol commands (qmp_capabilities, query-version,
            # query-commands) itself; their arguments come from there.
            [*introspect.protocol_commands(vm.server._builtins.values()), *reg], reg.events)
