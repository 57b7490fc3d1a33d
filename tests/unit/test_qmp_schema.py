"""query-qmp-schema: generated from the registry, checked against what livemig does.

Every command the server dispatches, its arguments, every event the code
emits, and what each command really returns for a sample call, against the
introspection a client sees (``tests/qmp_inprocess.py``: the real VM's QMP).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from livemig.machine.runstate import RunState
from livemig.migration.status import MigrationStatus
from livemig.qapi import schema
from livemig.qapi.schema import Union
from livemig.qmp.introspect import check_value

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for qmp_inprocess
from qmp_inprocess import InProcessFleet, inprocess_fleet, run_in_fleet  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src" / "livemig"

# One call per command; its answer must validate against the command's ret-type.
SAMPLES: dict[str, dict[str, Any]] = {
    "qmp_capabilities": {},  # after negotiation: an error, so not called (see below)
    "query-version": {}, "query-commands": {}, "query-name": {}, "query-status": {},
    "query-kvm": {}, "stop": {}, "query-migrate-capabilities": {},
    "migrate-set-capabilities": {"capabilities": [{"capability": "events", "state": True}]},
    "query-migrate-parameters": {},
    "migrate-set-parameters": {"max-bandwidth": 1 << 30},
    "query-migrate": {}, "query-machines": {}, "query-cpus-fast": {}, "query-uuid": {},
    "query-target": {}, "query-migrationthreads": {}, "query-fdsets": {},
    "query-qmp-schema": {},
    # query-commands lists object-add before object-del: the second deletes the first's.
    "object-add": {"qom-type": "authz-simple", "id": "sample", "identity": "CN=x"},
    "object-del": {"id": "sample"},
    # What libvirt asks (qmp/manager.py).
    "qom-list-types": {}, "qom-list-properties": {"typename": "accel"},
    "device-list-properties": {"typename": "accel"}, "qom-list": {"path": "/machine"},
    "qom-get": {"path": "/machine", "property": "type"}, "query-cpu-definitions": {},
    "query-command-line-options": {}, "query-chardev": {}, "query-hotpluggable-cpus": {},
    "query-iothreads": {}, "query-named-block-nodes": {"flat": True}, "query-block": {},
    "query-blockstats": {},
    "system_powerdown": {}, "system_reset": {},
}
# Commands not called here, and why (a new command must be added to one of the two).
NO_SAMPLE = {
    "qmp_capabilities": "negotiation only", "cont": "would start the guest",
    "quit": "ends the VM", "migrate": "needs a peer", "migrate-incoming": "needs -incoming",
    "migrate_cancel": "returns {} (checked by the e2e tests)",
    "migrate-continue": "needs a paused migration", "pmemsave": "writes a file",
    "migrate-start-postcopy": "always an error", "migrate-pause": "always an error",
    "migrate-recover": "always an error", "x-accel-digest": "needs a device",
    "getfd": "needs a descriptor (test_fds.py)", "closefd": "needs a name (test_fds.py)",
    "add-fd": "needs a descriptor (test_fds.py)", "remove-fd": "needs a set (test_fds.py)",
}


@pytest.fixture
def inproc(tmp_path):
    yield from inprocess_fleet(tmp_path)


def run(fleet: InProcessFleet, body) -> Any:
    return run_in_fleet(fleet, body)


def _by_name(entities: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entities}


def _emitted_events() -> set[str]:
    """Event names the code emits: every emit(...)/on_event(...) with a literal name."""
    names: set[str] = set()
    pattern = re.compile(r"""(?:emit|emit_event|on_event)\(\s*["']([A-Z_]+)["']""")
    for path in SRC.rglob("*.py"):
        names.update(pattern.findall(path.read_text()))
    return names


@pytest.mark.timeout(60)
def test_schema_lists_every_command_argument_and_event(inproc):
    async def body():
        vm = await inproc.start("schema")
        entities = await vm.cmd("query-qmp-schema")
        names = [c["name"] for c in await vm.cmd("query-commands")]
        return vm, entities, names
    vm, entities, names = run(inproc, body)
    by_name = _by_name(entities)
    commands = [e["name"] for e in entities if e["meta-type"] == "command"]
    assert commands == names                      # the very list the server dispatches
    registry = vm.host.vm.registry
    for cmd in registry:
        entry = by_name[cmd.name]
        arg_type = by_name[entry["arg-type"]]
        assert arg_type["meta-type"] == "object"
        members = {m["name"]: "default" in m for m in arg_type["members"]}
        declared = cmd.arg_type
        if isinstance(declared, Union):          # boxed (object-add): the union's base
            assert arg_type["tag"] == declared.discriminator
            declared = declared.base
        assert members == {m.name: m.optional for m in declared}, cmd.name
        assert entry["ret-type"] in by_name, cmd.name
        assert entry.get("allow-oob", False) == cmd.allow_oob
    assert by_name["migrate-pause"]["allow-oob"] is True
    assert by_name["query-migrationthreads"]["features"] == ["deprecated"]
    events = {e["name"] for e in entities if e["meta-type"] == "event"}
    emitted = _emitted_events()
    assert {"STOP", "RESUME", "SHUTDOWN", "MIGRATION", "MIGRATION_PASS"} <= emitted
    assert emitted <= events, emitted - events
    assert events == set(registry.events)
    migration = by_name[by_name["MIGRATION"]["arg-type"]]
    status = by_name[migration["members"][0]["type"]]
    assert status["values"] == [s.value for s in MigrationStatus]
    run_state = by_name[by_name[by_name["query-status"]["ret-type"]]["members"][1]["type"]]
    assert {s.value for s in RunState} <= set(run_state["values"])


@pytest.mark.timeout(60)
def test_schema_is_in_qemus_format(inproc):
    async def body():
        vm = await inproc.start("format")
        return await vm.cmd("query-qmp-schema")
    entities = run(inproc, body)
    by_name = _by_name(entities)
    assert len(by_name) == len(entities)          # no entity twice
    # Commands and events first, then the types they use, every one of them listed.
    metas = [e["meta-type"] for e in entities]
    first_type = min(i for i, m in enumerate(metas) if m not in ("command", "event"))
    assert all(m not in ("command", "event") for m in metas[first_type:])
    for e in entities:
        if e["meta-type"] in ("builtin", "command", "event"):
            continue
        # Type names are masked: numbers, or arrays of them / of built-ins.
        assert re.fullmatch(r"\d+|\[(\d+|str|int|number|bool|any|null)\]", e["name"]), e
    builtins = {e["name"] for e in entities if e["meta-type"] == "builtin"}
    assert builtins <= {"str", "int", "number", "bool", "any", "null"}  # ints fold to int
    # "0" is the empty object of commands without arguments, as QEMU's q_empty.
    assert by_name[by_name["stop"]["arg-type"]] == {"name": by_name["stop"]["arg-type"],
                                                   "meta-type": "object", "members": []}
    assert by_name["stop"]["arg-type"] == by_name["stop"]["ret-type"]
    # Optional members say "default": null; flat unions list every tag value.
    migrate_args = by_name[by_name["migrate"]["arg-type"]]["members"]
    assert {"name": "uri", "default": None, "type": "str"} in migrate_args
    channel = by_name[by_name[[m for m in migrate_args if m["name"] == "channels"][0]["type"]
                              ]["element-type"]]
    address = by_name[[m for m in channel["members"] if m["name"] == "addr"][0]["type"]]
    assert address["tag"] == "transport"
    assert [v["case"] for v in address["variants"]] == ["socket", "exec", "rdma", "file"]
    for e in entities:  # every type an entity names is itself listed
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                assert e[key] in by_name, (e, key)
        for m in e.get("members", []):
            if "type" in m:
                assert m["type"] in by_name, (e, m)
    # SchemaInfo describes the answer itself.
    check_value(entities, by_name["query-qmp-schema"]["ret-type"], entities)


@pytest.mark.timeout(60)
def test_what_each_command_returns_validates_against_its_ret_type(inproc):
    async def body():
        vm = await inproc.start("returns", paused=True)
        entities = await vm.cmd("query-qmp-schema")
        names = [c["name"] for c in await vm.cmd("query-commands")]
        answers = {}
        for name in names:
            if name in NO_SAMPLE:
                continue
            answers[name] = await vm.cmd(name, **SAMPLES[name])
        return entities, names, answers
    entities, names, answers = run(inproc, body)
    assert set(names) <= set(SAMPLES) | set(NO_SAMPLE), set(names) - set(SAMPLES) - set(NO_SAMPLE)
    by_name = _by_name(entities)
    for name, answer in answers.items():
        check_value(entities, by_name[name]["ret-type"], answer, f"{name}.return")
    assert answers["query-uuid"] == {"UUID": "00000000-0000-0000-0000-000000000000"}
    assert answers["query-target"] == {"arch": "x86_64"}
    assert answers["query-machines"][0]["name"] == "livemig-pc-10.0"


def test_check_value_refuses_what_the_type_does_not_allow() -> None:
    from livemig.qmp.introspect import query_qmp_schema
    from livemig.qmp.registry import CommandRegistry
    reg = CommandRegistry(events={})
    reg.register("query-status", lambda a: None, returns=schema.STATUS_INFO)
    entities = query_qmp_schema(list(reg), reg.events)
    ret = _by_name(entities)["query-status"]["ret-type"]
    check_value(entities, ret, {"running": False, "status": "paused"})
    for bad, text in (({"running": False}, "'status' is missing"),
                      ({"running": 1, "status": "paused"}, "boolean"),
                      ({"running": False, "status": "bogus"}, "not one of"),
                      ({"running": False, "status": "paused", "x": 1}, "'x' is not")):
        with pytest.raises(ValueError, match=text):
            check_value(entities, ret, bad)
