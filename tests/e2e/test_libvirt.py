"""libvirt 9.0 manages a livemig VM: two real libvirt daemons (``libvirt_harness``),
a domain whose ``<emulator>`` runs ``livemig run "$@"``, created, migrated live
A -> B and back with ``virsh migrate --live``, its figures in ``virsh domjobinfo
--completed``, switchover-ack with the accel device (set by ``-global`` in the
domain's ``<qemu:commandline>``, checked with ``virsh qemu-monitor-command``),
``virsh reboot`` (a power-button press the walk ignores, as under QEMU),
``virsh reset`` (the guest restarts: a second ``A`` on its serial port),
suspend/resume, ``domstats``, ``virsh destroy``.

`.ci/run` installs the Debian packages where apt can; the test skips with the
reason where libvirt is missing (``libvirt_harness.install_libvirt`` does the same
by hand).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from libvirt_harness import Daemon, libvirt_missing, start_pair

import livemig
from livemig.machine.machine import kvm_usable

DOMAIN = "lm1"
RAM_MIB = 128


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Daemon, Daemon, str]]:
    why = libvirt_missing()      # .ci/run installs the packages where apt can
    if why is not None:
        pytest.skip(why)
    root = tempfile.mkdtemp(prefix="libvirt-e2e-")   # short: socket paths live under it
    a, b = start_pair(root, first_port=23100)
    try:
        yield a, b, root
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)


def write_emulator(root: str) -> str:
    """The emulator libvirt runs: a script that only runs ``livemig run "$@"``
    (libvirt clears the environment, so it names this checkout's sources)."""
    src = os.path.dirname(os.path.dirname(livemig.__file__))
    path = os.path.join(root, "livemig-emulator")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -m livemig run "$@"\n')
    os.chmod(path, 0o755)
    return path


def domain_xml(emulator: str, serial: str, kvm: bool) -> str:
    # A paced walk (about 2,500 pages/s under either accelerator) converges on any link.
    return f"""<domain type='{"kvm" if kvm else "qemu"}'
        xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>{RAM_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='livemig-pc-10.0'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-guest'/>
    <qemu:arg value='walk,start=1M,end=16M,pace=1000000'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='accel,id=acc0,size=8M,init-size=1M,prepare-ms=400'/>
    <qemu:arg value='-global'/>
    <qemu:arg value='migration.x-return-path=on'/>
    <qemu:arg value='-global'/>
    <qemu:arg value='migration.x-switchover-ack=on'/>
    <qemu:arg value='-serial'/>
    <qemu:arg value='file:{serial}'/>
  </qemu:commandline>
</domain>
"""


def qmp(daemon: Daemon, command: str, **arguments: object) -> object:
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    out = daemon.virsh("qemu-monitor-command", DOMAIN, json.dumps(msg)).stdout
    return json.loads(out)["return"]


def jobinfo(daemon: Daemon) -> dict[str, str]:
    out = daemon.virsh("domjobinfo", DOMAIN, "--completed").stdout
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines()) if v}


def wait_for(what: str, check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def emulator_pid(daemon: Daemon) -> int:
    with open(daemon.path(f"/run/libvirt/qemu/{DOMAIN}.pid")) as f:
        return int(f.read())


def migrate(src: Daemon, dst: Daemon) -> dict[str, str]:
    src.virsh("migrate", "--live", DOMAIN, dst.uri, "--migrateuri", "tcp://127.0.0.1",
              timeout=180)
    assert dst.virsh("domstate", DOMAIN).stdout.strip() == "running"
    assert src.virsh("list", "--name").stdout.split() == []
    # The destination's livemig: switchover-ack on, the accel device's approval came.
    info = qmp(dst, "query-migrate")
    assert isinstance(info, dict) and info["status"] == "completed"
    assert info["x-switchover-ack"]["pending"] == 0
    assert "acc0/accel" in info["x-switchover-ack"]["approved"]
    return jobinfo(dst)


@pytest.mark.timeout(420)
def test_libvirt_manages_a_livemig_domain(pair: tuple[Daemon, Daemon, str]) -> None:
    a, b, root = pair
    kvm = kvm_usable()[0]
    serial = os.path.join(root, "serial.log")
    xml = os.path.join(root, "domain.xml")
    with open(xml, "w") as f:
        f.write(domain_xml(write_emulator(root), serial, kvm))

    # Create: libvirt probes the emulator (-machine none, -daemonize), then starts it.
    a.virsh("create", xml, timeout=180)
    assert a.virsh("domstate", DOMAIN).stdout.strip() == "running"
    with open(a.domain_log(DOMAIN)) as f:
        argv = f.read()
    for option in ("-no-user-config", "-object", "memory-backend=pc.ram", "-overcommit",
                   "-rtc", "-no-shutdown", "-boot", "-audiodev", "-msg", "fd="):
        assert option in argv, option
    status = qmp(a, "query-status")
    assert status == {"running": True, "status": "running"}
    machines = qmp(a, "query-kvm")
    assert isinstance(machines, dict) and machines["enabled"] is kvm
    wait_for("the guest's A", lambda: os.path.exists(serial) and b"A" in open(serial, "rb").read())

    # Live A -> B: libvirt's own path (getfd + migrate fd:, pause-before-switchover).
    there = migrate(a, b)
    assert there["Operation"] == "Incoming migration"
    assert there["Memory total"] == f"{RAM_MIB:.3f} MiB"
    assert there["Memory processed"] != "0.000 B"
    downtime_ms = int(there["Total downtime"].split()[0])
    assert 0 < downtime_ms < 5000, there
    # The device's 400 ms preparation ran before the switchover, not inside it.
    assert int(there["Iteration"]) >= 1

    # And back B -> A.
    back = migrate(b, a)
    assert back["Memory total"] == f"{RAM_MIB:.3f} MiB"
    assert int(back["Total downtime"].split()[0]) > 0

    # The guest never restarted through all that: one A on its serial port.
    with open(serial, "rb") as f:
        assert f.read().count(b"A") == 1

    # Suspend, resume and domstats go through stop, cont and the queries.
    a.virsh("suspend", DOMAIN)
    assert a.virsh("domstate", DOMAIN).stdout.strip() == "paused"
    a.virsh("resume", DOMAIN)
    assert a.virsh("domstate", DOMAIN).stdout.strip() == "running"
    assert "state.state=1" in a.virsh("domstats", DOMAIN).stdout

    # virsh reboot presses the ACPI power button: the walk has no ACPI, it runs on.
    a.virsh("reboot", DOMAIN)
    assert qmp(a, "query-status") == {"running": True, "status": "running"}
    # virsh reset is system_reset: the guest restarts (its A again) and keeps running.
    a.virsh("reset", DOMAIN)
    wait_for("the restarted guest's A", lambda: open(serial, "rb").read().count(b"A") == 2)
    assert qmp(a, "query-status") == {"running": True, "status": "running"}

    # virsh destroy ends the emulator.
    pid = emulator_pid(a)
    a.virsh("destroy", DOMAIN)
    assert a.virsh("list", "--all", "--name").stdout.split() == []
    wait_for("the emulator's end", lambda: not os.path.exists(f"/proc/{pid}")
             or open(f"/proc/{pid}/stat").read().split()[2] == "Z")


def test_harness_skips_with_a_reason_without_libvirt(monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt_harness
    monkeypatch.setattr(libvirt_harness.shutil, "which", lambda tool, path=None: None)
    why = libvirt_harness.libvirt_missing()
    assert why is not None and "libvirtd not installed" in why and "apt-get install" in why


def test_emulator_script_runs_livemig(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = write_emulator(str(tmp_path))
    out = subprocess.run([script, "-version"], capture_output=True, text=True, env={},
                         timeout=60)
    assert out.returncode == 0 and "livemig" in out.stdout
