"""The VM's QMP commands: QEMU's names, arguments and error texts.

Handlers run on the QMP event loop (``@upper_half``); anything slow is
handed to the migration threads, which report back through events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from livemig.machine.runstate import RunState
from livemig.migration.status import MigrationStatus
from livemig.qapi.capabilities import MIGRATE_SET_CAPABILITIES_ARGS
from livemig.qapi.errors import (
    DEVICE_NOT_FOUND,
    INCOMING_ALREADY_STARTED,
    INCOMING_NOT_SPECIFIED,
    MIGRATION_IN_PROGRESS,
)
from livemig.qapi.parameters import MIGRATE_SET_PARAMETERS
from livemig.qmp.errors import QMPError
from livemig.qmp.registry import ArgSpec, CommandRegistry
from livemig.transport import TransportError, resolve_migrate_args

if TYPE_CHECKING:
    from livemig.cli.run import VmProcess

_CHANNELS = ArgSpec("list", items="dict")


def register_vm_commands(reg: CommandRegistry, vm: VmProcess) -> None:
    machine = vm.machine

    @reg.register("query-name")
    def query_name(args: dict) -> dict:
        return {"name": vm.name} if vm.name else {}

    @reg.register("query-status")
    def query_status(args: dict) -> dict:
        return {"running": machine.is_running(), "status": machine.runstate.value}

    @reg.register("query-kvm")
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
    @reg.register("query-migrate-capabilities")
    def query_caps(args: dict) -> list:
        return vm.caps.as_qmp_list()

    @reg.register("migrate-set-capabilities", args=MIGRATE_SET_CAPABILITIES_ARGS)
    def set_caps(args: dict) -> None:
        # migrate_caps_check reads the current parameters (zero-copy-send's rule).
        vm.caps.set_from_qmp(args["capabilities"],
                             migration_running=vm.source.is_running(),
                             incoming_started=vm.incoming.started,
                             params=vm.params.as_qmp())

    @reg.register("query-migrate-parameters")
    def query_params(args: dict) -> dict:
        return vm.params.as_qmp()

    @reg.register("migrate-set-parameters", args=MIGRATE_SET_PARAMETERS)
    def set_params(args: dict) -> None:
        # migrate_params_check reads the current capabilities (zero-copy-send, mapped-ram).
        vm.params.set_from_qmp(args, caps=vm.caps.as_dict())
        if "max-bandwidth" in args:
            vm.source.apply_max_bandwidth()

    # -- migration ---------------------------------------------------------------------------
    @reg.register("query-migrate")
    def query_migrate(args: dict) -> dict:
        if vm.source.status is not MigrationStatus.NONE:
            return vm.source.query()
        return vm.incoming.query()

    @reg.register("migrate", args={"*uri": "str", "*channels": _CHANNELS, "*detach": "bool",
                                   "*resume": "bool"})
    def migrate(args: dict) -> None:
        if args.get("resume"):
            raise QMPError("Cannot resume if there is no paused migration")
        try:
            address = resolve_migrate_args(args.get("uri"), args.get("channels"),
                                           multifd=vm.caps.multifd)
        except TransportError as exc:
            raise QMPError(exc.desc) from None
        if vm.source.is_running():
            raise QMPError(MIGRATION_IN_PROGRESS)
        if machine.runstate is RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if machine.runstate is RunState.POSTMIGRATE:
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        vm.source.migrate(address)

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
            vm.incoming.start(address, exit_on_error=args.get("exit-on-error", True))
        except TransportError as exc:
            raise QMPError(exc.desc) from None

    @reg.register("migrate_cancel")
    def migrate_cancel(args: dict) -> None:
        vm.source.cancel()

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
        ram, chunk = machine.ram, 1 << 20
        with f:
            try:
                while size:
                    n = min(size, chunk)
                    if addr < ram.size:
                        n = min(n, ram.size - addr)
                        f.write(ram.view[addr:addr + n])
                    else:
                        f.write(bytes(n))
                    addr, size = (addr + n) & (2**64 - 1), size - n
            except OSError:
                raise QMPError("An IO error has occurred") from None

    # -- postcopy: livemig migrates precopy only (postcopy-ram is never on), so these
    # always give QEMU's refusal for "not in postcopy".
    @reg.register("migrate-start-postcopy")
    def migrate_start_postcopy(args: dict) -> None:
        raise QMPError("Enable postcopy with migrate_set_capability before the start of "
                       "migration")

    @reg.register("migrate-pause")
    def migrate_pause(args: dict) -> None:
        raise QMPError("migrate-pause is currently only supported during postcopy-active or "
                       "postcopy-recover state")

    @reg.register("migrate-recover", args={"uri": "str"})
    def migrate_recover(args: dict) -> None:
        raise QMPError("Migrate recover can only be run when postcopy is paused.")

    @reg.register("x-accel-digest", args={"id": "str"}, blocking=True)
    def accel_digest(args: dict) -> dict[str, Any]:
        dev = machine.devices.get(args["id"])
        if dev is None:
            raise QMPError(f"Device '{args['id']}' not found", error_class=DEVICE_NOT_FOUND)
        return {"sha256": dev.digest()}
