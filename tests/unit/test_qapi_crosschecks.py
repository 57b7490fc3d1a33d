"""The caps<->params cross-checks run from the QMP commands, both ways; migrate-incoming
resolves its address like migrate (QEMU 10.0's texts)."""

from types import SimpleNamespace
from typing import Any

import pytest

from livemig.machine.runstate import RunState
from livemig.qapi import Capabilities, Parameters
from livemig.qapi.errors import QapiError
from livemig.qmp.commands import register_vm_commands
from livemig.qmp.registry import CommandRegistry
from livemig.transport import FileAddress, InetAddress

ZERO_COPY = "Zero copy only available for non-compressed non-TLS multifd migration"
MAPPED_RAM = "Mapped-ram only available for non-compressed non-TLS multifd migration"


class FakeVm:
    def __init__(self) -> None:
        self.caps, self.params = Capabilities(), Parameters()
        self.started: list[Any] = []
        self.bandwidth_applied = 0
        self.machine = SimpleNamespace(runstate=RunState.INMIGRATE)
        self.opts = SimpleNamespace(add_fds=(), machine="livemig-pc-10.0", cpu="max")  # no -add-fd
        self.source = SimpleNamespace(is_running=lambda: False,
                                      apply_max_bandwidth=self._apply_bw)
        self.incoming = SimpleNamespace(started=False, start=self._start)

    def _apply_bw(self) -> None:
        self.bandwidth_applied += 1

    def _start(self, address: Any, *, exit_on_error: bool) -> None:
        self.started.append(address)


@pytest.fixture
def vm_and_run():
    vm, reg = FakeVm(), CommandRegistry()
    register_vm_commands(reg, vm)  # type: ignore[arg-type]

    def run(name: str, **arguments: Any) -> Any:
        command = reg.get(name)
        assert command is not None
        return command.handler(command.validate(arguments))
    return vm, run


def error(run, name: str, **arguments: Any) -> str:
    with pytest.raises(QapiError) as exc:
        run(name, **arguments)
    return exc.value.desc


def test_set_capabilities_checks_current_parameters(vm_and_run) -> None:
    vm, run = vm_and_run
    run("migrate-set-parameters", **{"multifd-compression": "zlib"})
    caps = [{"capability": "multifd", "state": True},
            {"capability": "zero-copy-send", "state": True}]
    assert error(run, "migrate-set-capabilities", capabilities=caps) == ZERO_COPY
    run("migrate-set-parameters", **{"multifd-compression": "none", "tls-creds": "tls0"})
    assert error(run, "migrate-set-capabilities", capabilities=caps) == ZERO_COPY
    assert not vm.caps.multifd and not vm.caps.zero_copy_send


def test_set_parameters_checks_current_capabilities(vm_and_run) -> None:
    vm, run = vm_and_run
    vm.caps = Capabilities({"multifd": True, "zero-copy-send": True})
    assert error(run, "migrate-set-parameters", **{"multifd-compression": "zstd"}) == ZERO_COPY
    assert error(run, "migrate-set-parameters", **{"tls-creds": "x"}) == ZERO_COPY
    assert vm.params.as_qmp()["multifd-compression"] == "none"


def test_mapped_ram_rule_reads_the_parameters_in_force(vm_and_run) -> None:
    vm, run = vm_and_run
    run("migrate-set-parameters", **{"tls-creds": "tls0"})
    vm.caps = Capabilities({"mapped-ram": True})
    assert vm.caps.mapped_ram
    # QEMU 10.0 tests the current tls-creds, so even clearing it is refused.
    assert error(run, "migrate-set-parameters", **{"tls-creds": ""}) == MAPPED_RAM


def test_max_bandwidth_still_goes_to_the_source(vm_and_run) -> None:
    vm, run = vm_and_run
    run("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    run("migrate-set-parameters", **{"downtime-limit": 100})
    assert vm.bandwidth_applied == 1 and vm.params.max_bandwidth_bytes_per_s == 1 << 20


def test_set_parameters_visits_members_before_unknown_keys(vm_and_run) -> None:
    _, run = vm_and_run
    assert error(run, "migrate-set-parameters", bogus=1, **{"max-bandwidth": "x"}) == (
        "Parameter 'max-bandwidth' expects uint64")


INET = {"channel-type": "main",
        "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}}


@pytest.mark.parametrize(("arguments", "text"), [
    ({}, "need either 'uri' or 'channels' argument"),
    ({"channels": []}, "need either 'uri' or 'channels' argument"),
    ({"uri": "tcp:1.2.3.4:5", "channels": [INET]}, "need either 'uri' or 'channels' argument"),
    ({"uri": ""}, "unknown migration protocol: "),             # checked on QEMU 10.0.2
    ({"uri": "bogus:1"}, "unknown migration protocol: bogus:1"),
    ({"channels": [INET, INET]}, "Channel list must have only one entry, for type 'main'"),
    ({"channels": [{**INET, "channel-type": "cpr"}]}, "Channel list has no main entry"),
    ({"uri": "file:/x,offset=1Q"}, "file URI has bad offset 1Q: Invalid argument"),
])
def test_migrate_incoming_resolution_errors(vm_and_run, arguments: dict, text: str) -> None:
    vm, run = vm_and_run
    assert error(run, "migrate-incoming", **arguments) == text
    assert not vm.started


def test_migrate_incoming_resolves_like_migrate(vm_and_run) -> None:
    vm, run = vm_and_run
    run("migrate-incoming", uri="tcp:127.0.0.1:4444", channels=[])
    vm.incoming.started = False
    run("migrate-incoming", channels=[INET])
    assert vm.started == [InetAddress("127.0.0.1", "4444")] * 2


def test_migrate_incoming_multifd_needs_a_socket(vm_and_run) -> None:
    vm, run = vm_and_run
    vm.caps = Capabilities({"multifd": True})
    assert error(run, "migrate-incoming", uri="file:/tmp/x") == (
        "Migration requires multi-channel URIs (e.g. tcp)")
    vm.caps = Capabilities()
    run("migrate-incoming", uri="file:/tmp/x,offset=4k")
    assert vm.started == [FileAddress("/tmp/x", 4096)]


def test_migrate_incoming_state_checks_come_first(vm_and_run) -> None:
    vm, run = vm_and_run
    vm.machine.runstate = RunState.PAUSED
    assert error(run, "migrate-incoming") == "'-incoming' was not specified on the command line"
    vm.incoming.started = True
    assert error(run, "migrate-incoming") == "The incoming migration has already been started"
