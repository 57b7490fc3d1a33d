"""QMP driven by ``qemu.qmp`` exactly as QEMU 10.0 would be (texts from the
reference, sections 4 and 8).

Tests that only check QMP answers run on the real VM's QMP side in this
process (``tests/qmp_inprocess.py``, fixture ``inproc``: same command line,
guest never started, so a VM without ``-S`` is in ``prelaunch``). Those that
need a process (exit status, stderr, a running guest, a migration listener)
start one ``livemig run`` at a time (fixture ``vms``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    RAM,
    WALK_END,
    qmp_error,
    run_with,
    runstate,
    vm_walk_problems,
    wait_event,
    wait_guest_runs,
    wait_walking,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for qmp_inprocess
from qmp_inprocess import inprocess_fleet  # noqa: E402


@pytest.fixture
def inproc(tmp_path):
    yield from inprocess_fleet(tmp_path)


MIGRATION_COMMANDS = (
    "migrate", "migrate-incoming", "migrate_cancel", "migrate-continue",
    "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters",
    "query-migrate-parameters", "query-migrate",
)


@pytest.mark.timeout(30)
def test_greeting_and_query_version(inproc):
    async def body():
        vm = await inproc.start("greet")
        version = vm.qmp.greeting.QMP.version
        assert version["qemu"]["major"] == 10
        assert "livemig" in version["package"]
        assert vm.qmp.greeting.QMP.capabilities == []
        assert await vm.cmd("query-version") == dict(version)
        assert await vm.cmd("query-name") == {"name": "greet"}
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_query_commands_lists_the_migration_commands(inproc):
    async def body():
        vm = await inproc.start("cmds")
        names = {c["name"] for c in await vm.cmd("query-commands")}
        missing = [c for c in MIGRATION_COMMANDS if c not in names]
        assert not missing
        assert {"query-status", "stop", "cont", "quit", "pmemsave"} <= names
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_query_status_running_then_stop_cont_events(vms):
    async def body():
        vm = await vms.start("runner")
        assert await vm.cmd("query-status") == {"running": True, "status": "running"}
        await vm.cmd("stop")
        await wait_event(vm, "STOP")
        assert await vm.cmd("query-status") == {"running": False, "status": "paused"}
        await vm.cmd("cont")
        await wait_event(vm, "RESUME")
        assert await runstate(vm) == "running"
        await wait_guest_runs(vm)
        assert [e["event"] for e in vm.events] == ["STOP", "RESUME"]
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_query_status_prelaunch_with_S(vms):
    async def body():
        vm = await vms.start("prelaunch", paused=True)
        assert await vm.cmd("query-status") == {"running": False, "status": "prelaunch"}
        assert vm.serial_bytes() == b""            # the guest never ran
        await vm.cmd("cont")
        await wait_event(vm, "RESUME")
        await vm.wait_serial(lambda data: data.startswith(b"A"))
        assert await runstate(vm) == "running"
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_query_status_inmigrate_with_incoming_defer(inproc):
    async def body():
        vm = await inproc.start("defer", incoming="defer")
        assert await vm.cmd("query-status") == {"running": False, "status": "inmigrate"}
        # stop/cont while inmigrate only toggle autostart: state stays inmigrate.
        assert await vm.cmd("cont") == {}
        assert await runstate(vm) == "inmigrate"
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_unknown_command_and_bad_arguments(inproc):
    async def body():
        vm = await inproc.start("errors")
        assert await runstate(vm) == "prelaunch"     # in process: the guest never starts
        err = await qmp_error(vm, "no-such-command")
        assert err.error_class == "CommandNotFound"
        assert str(err) == "The command no-such-command has not been found"

        err = await qmp_error(vm, "query-name", bogus=1)
        assert (err.error_class, str(err)) == ("GenericError", "Parameter 'bogus' is unexpected")
        err = await qmp_error(vm, "pmemsave", val="zero", size=1, filename="/dev/null")
        assert str(err) == "Invalid parameter type for 'val', expected: integer"
        err = await qmp_error(vm, "pmemsave", size=1, filename="/dev/null")
        assert str(err) == "Parameter 'val' is missing"
        err = await qmp_error(vm, "migrate-set-capabilities",
                              capabilities=[{"capability": "no-such-cap", "state": True}])
        assert str(err) == "Parameter 'capability' does not accept value 'no-such-cap'"
        err = await qmp_error(vm, "migrate-continue", state="no-such-state")
        assert str(err) == "Parameter 'state' does not accept value 'no-such-state'"
        assert await runstate(vm) == "prelaunch"     # errors change nothing
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_migration_defaults(inproc):
    async def body():
        vm = await inproc.start("defaults")
        assert await vm.cmd("query-migrate") == {}
        params = await vm.cmd("query-migrate-parameters")
        assert params["downtime-limit"] == 300
        assert params["max-bandwidth"] == 134217728
        caps = await vm.cmd("query-migrate-capabilities")
        assert caps[0] == {"state": False, "capability": "xbzrle"}
        assert len(caps) == 22 and not any(c["state"] for c in caps)
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_switchover_ack_requires_return_path(inproc):
    async def body():
        vm = await inproc.start("caps")
        err = await qmp_error(vm, "migrate-set-capabilities",
                              capabilities=[{"capability": "switchover-ack", "state": True}])
        assert err.error_class == "GenericError"
        assert str(err) == "Capability 'switchover-ack' requires capability 'return-path'"
        states = {c["capability"]: c["state"] for c in await vm.cmd("query-migrate-capabilities")}
        assert not states["switchover-ack"] and not states["return-path"]   # all or nothing

        await vm.set_caps(**{"return-path": True, "switchover-ack": True})
        # Turning return-path off alone breaks the rule too (checked on every set).
        err = await qmp_error(vm, "migrate-set-capabilities",
                              capabilities=[{"capability": "return-path", "state": False}])
        assert str(err) == "Capability 'switchover-ack' requires capability 'return-path'"
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_global_switchover_ack_and_return_path_on_the_command_line(inproc):
    async def body():
        # x-switchover-ack first: -global order does not matter, the check runs once.
        vm = await inproc.start("globals", extra=["-global", "migration.x-switchover-ack=on",
                                               "-global", "migration.x-return-path=on"])
        states = {c["capability"]: c["state"] for c in await vm.cmd("query-migrate-capabilities")}
        assert states["switchover-ack"] and states["return-path"]
        assert [name for name, on in states.items() if on] == ["return-path", "switchover-ack"]
    run_with(inproc, body)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [
    ["-no-such-option"],
    ["-m", "lots"],
    ["-global", "migration.x-switchover-ack=on"],
], ids=["unknown-option", "bad-size", "ack-without-return-path"])
def test_invalid_command_line_exits_with_one_line(tmp_path, argv):
    qmp = tmp_path / "bad.qmp"
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "run", "-accel", "soft", "-m", RAM,
         "-qmp", f"unix:{qmp},server=on,wait=off", *argv],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("livemig: ")
    assert not qmp.exists()


@pytest.mark.timeout(30)
def test_pmemsave_of_a_stopped_walk_guest_shows_the_walk_pattern(vms):
    async def body():
        vm = await vms.start("walker")
        await wait_walking(vm)
        await vm.cmd("stop")
        assert await vm_walk_problems(vm) == []
        # The walk is under way: the pages are not all zero.
        mem = await vm.pmem(0, 16 << 20)
        assert any(mem[1 << 20::4096])
        assert WALK_END == "16M"
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_quit_exits_zero_with_a_shutdown_event(vms):
    async def body():
        vm = await vms.start("quitter")
        assert await vm.cmd("quit") == {}
        ev = await wait_event(vm, "SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert vm.proc.wait(10) == 0
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_migrate_while_waiting_for_incoming_is_refused(inproc):
    async def body():
        vm = await inproc.start("waiting", incoming="defer")
        err = await qmp_error(vm, "migrate", uri="tcp:127.0.0.1:1")
        assert str(err) == "Guest is waiting for an incoming migration"
        assert await vm.cmd("query-migrate") == {}
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_migrate_incoming_needs_incoming_on_the_command_line(inproc):
    async def body():
        vm = await inproc.start("notincoming")
        err = await qmp_error(vm, "migrate-incoming", uri="tcp:127.0.0.1:0")
        assert str(err) == "'-incoming' was not specified on the command line"
        assert await vm.cmd("query-migrate") == {}
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_second_migrate_incoming_is_refused(vms):
    async def body():
        vm = await vms.start("twice", incoming="defer")
        await vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        info = await vm.cmd("query-migrate")
        assert info["status"] == "setup"
        assert info["socket-address"][0]["host"] == "127.0.0.1"
        assert int(info["socket-address"][0]["port"]) > 0
        err = await qmp_error(vm, "migrate-incoming", uri="tcp:127.0.0.1:0")
        assert str(err) == "The incoming migration has already been started"
    run_with(vms, body)


@pytest.mark.timeout(30)
def test_migrate_with_unknown_protocol(inproc):
    async def body():
        vm = await inproc.start("proto")
        assert await runstate(vm) == "prelaunch"     # in process: the guest never starts
        err = await qmp_error(vm, "migrate", uri="bogus:somewhere")
        assert (err.error_class, str(err)) == ("GenericError",
                                               "unknown migration protocol: bogus:somewhere")
        assert await vm.cmd("query-migrate") == {}
        assert await runstate(vm) == "prelaunch"     # a refused migrate changes nothing
    run_with(inproc, body)


@pytest.mark.timeout(30)
def test_migrate_continue_in_the_wrong_state(inproc):
    async def body():
        vm = await inproc.start("cont")
        err = await qmp_error(vm, "migrate-continue", state="pre-switchover")
        assert str(err) == "Migration not in expected state: none"
    run_with(inproc, body)
