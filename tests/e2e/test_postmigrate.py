"""Run state and migration status agree: ``postmigrate`` is visible whenever
``completed`` is (QEMU sets the run state first: migration_iteration_finish).

100 migrations of a paused 32M guest to ``file:/dev/null`` in one VM (``cont``
then ``stop`` between them, as postmigrate allows); each time, the first
``query-migrate`` that says ``completed`` is followed at once by
``query-status``, which must say ``postmigrate``. Every answer and event is
also checked against the VM's own ``query-qmp-schema``."""

from __future__ import annotations

import time

import pytest
from conftest import run_with

from livemig.qmp.introspect import check_value

ROUNDS = 100


@pytest.mark.timeout(120)
def test_postmigrate_right_after_completed_100_times(vms):
    async def body():
        vm = await vms.start("pm", ram="32M", walk_end="4M", paused=True)
        entities = await vm.cmd("query-qmp-schema")
        by_name = {e["name"]: e for e in entities}
        await vm.set_caps(events=True)
        seen = []
        started = time.monotonic()
        for i in range(ROUNDS):
            if i:
                await vm.cmd("cont")
                await vm.cmd("stop")
            await vm.cmd("migrate", uri="file:/dev/null")
            deadline = time.monotonic() + 20
            while True:
                info = await vm.cmd("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, info
            status = await vm.cmd("query-status")
            assert info["status"] == "completed", info
            check_value(entities, by_name["query-migrate"]["ret-type"], info)
            check_value(entities, by_name["query-status"]["ret-type"], status)
            seen.append(status["status"])
        assert seen == ["postmigrate"] * ROUNDS, {s: seen.count(s) for s in set(seen)}
        assert time.monotonic() - started < 90
        for ev in vm.events:   # every event emitted, against its declared data
            entry = by_name[ev["event"]]
            assert entry["meta-type"] == "event"
            check_value(entities, entry["arg-type"], ev.get("data", {}), ev["event"])
        assert {ev["event"] for ev in vm.events} >= {"MIGRATION", "STOP", "RESUME"}
    run_with(vms, body)
