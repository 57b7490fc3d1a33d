"""The options libvirt 9.0 passes (issue 18), with QEMU 10.0.2's texts where QEMU has
them (compared side by side with /usr/bin/qemu-system-x86_64)."""

from __future__ import annotations

import pytest

from livemig.cli.run_options import OptionError, parse_run_args
from livemig.machine.machine import kvm_usable

# The domain start line libvirt 9.0 built for a livemig domain here.
LIBVIRT_ARGV = [
    "-name", "guest=lm1,debug-threads=on", "-S",
    "-object", "secret,id=masterKey0,format=raw,file=/x/master-key.aes",
    "-machine", "livemig-pc-10.0,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel", "tcg", "-m", "256",
    "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
    "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
    "-uuid", "797c5b6d-531d-4430-90b9-94d154c1dac7", "-display", "none",
    "-no-user-config", "-nodefaults", "-rtc", "base=utc", "-no-shutdown", "-no-acpi",
    "-boot", "strict=on", "-audiodev", '{"id":"audio1","driver":"none"}',
    "-msg", "timestamp=on",
]


def test_libvirt_domain_line_parses() -> None:
    o = parse_run_args(LIBVIRT_ARGV)
    assert o.name == "lm1" and o.start_paused and o.accel == "soft"
    assert o.memory_backend == "pc.ram" and not o.dump_guest_core
    assert o.ram_size == 256 << 20 and o.ram_size_given
    assert [obj["qom-type"] for obj in o.objects] == ["secret", "memory-backend-ram"]
    assert o.objects[1]["size"] == 268435456 and o.msg_timestamp and o.mem_lock == "off"
    assert o.no_shutdown


def test_probe_line_parses() -> None:
    o = parse_run_args(["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine",
                        "none,accel=kvm:tcg", "-qmp", "unix:/tmp/x.sock,server=on,wait=off",
                        "-pidfile", "/tmp/x.pid", "-daemonize"])
    assert o.machine == "none" and o.daemonize and o.pidfile == "/tmp/x.pid"
    assert o.accel == ("kvm" if kvm_usable()[0] else "soft")
    assert parse_run_args(["-machine", "none,accel=tcg"]).accel == "soft"
    assert parse_run_args(["-machine", "none,accel=tcg:kvm"]).accel == "soft"


@pytest.mark.parametrize(("argv", "text"), [
    (["-accel", "kvm:tcg"], "-accel kvm:tcg: invalid accelerator kvm:tcg"),
    (["-machine", "none,accel=foo"], "invalid accelerator foo"),
    (["-rtc", "base=foo"], "invalid datetime format\n"
                           "valid formats: '2006-06-17T16:01:21' or '2006-06-17'"),
    (["-rtc", "clock=foo"], "invalid option value 'foo'"),
    (["-rtc", "driftfix=foo"], "invalid option value 'foo'"),
    (["-rtc", "bogus=1"], "-rtc bogus=1: Invalid parameter 'bogus'"),
    (["-overcommit", "mem-lock=bad"],
     "-overcommit mem-lock=bad: parameter 'mem-lock' expects one of 'on', 'off', 'on-fault'"),
    (["-overcommit", "cpu-pm=bad"], "-overcommit cpu-pm=bad: Parameter 'cpu-pm' expects 'on' "
                                    "or 'off'"),
    (["-overcommit", "bogus=1"], "-overcommit bogus=1: Invalid parameter 'bogus'"),
    (["-boot", "bogus=1"], "Parameter 'boot.bogus' is unexpected"),
    (["-boot", "strict=maybe"], "Parameter 'boot.strict' expects 'on' or 'off'"),
    (["-msg", "bogus=1"], "-msg bogus=1: Invalid parameter 'bogus'"),
    (["-msg", "timestamp=x"], "-msg timestamp=x: Parameter 'timestamp' expects 'on' or 'off'"),
    (["-audiodev", '{"id":"a","driver":"bogus"}'],
     '-audiodev {"id":"a","driver":"bogus"}: Parameter \'driver\' does not accept value '
     "'bogus'"),
    (["-audiodev", '{"driver":"none"}'], '-audiodev {"driver":"none"}: Parameter \'id\' is '
                                         "missing"),
    (["-audiodev", "none"], "-audiodev none: Parameter 'id' is missing"),
    (["-audiodev", "none,id=a,bogus=1"], "-audiodev none,id=a,bogus=1: Parameter 'bogus' is "
                                         "unexpected"),
    (["-machine", "none,usb=maybe"], "-machine none,usb=maybe: Parameter 'usb' expects 'on' "
                                     "or 'off'"),
])
def test_qemu_texts(argv: list[str], text: str) -> None:
    with pytest.raises(OptionError) as exc:
        parse_run_args(argv)
    assert str(exc.value) == text


@pytest.mark.parametrize(("argv", "text"), [
    # What livemig does not have, said so (QEMU would make the thing).
    (["-machine", "livemig-pc,usb=on"], "livemig's machines have no USB controller (usb=on)"),
    (["-overcommit", "cpu-pm=on"], "-overcommit cpu-pm=on: livemig's vCPU has no cpu-pm=on "
                                   "(guest-owned idle); use cpu-pm=off"),
    (["-machine", "livemig-pc,kernel=/vmlinuz"],
     "Property 'livemig-pc-10.0-machine.kernel' not found"),
])
def test_livemig_refusals(argv: list[str], text: str) -> None:
    with pytest.raises(OptionError) as exc:
        parse_run_args(argv)
    assert str(exc.value) == text


def test_accepted_no_ops() -> None:
    o = parse_run_args(["-rtc", "base=2006-06-17T16:01:21,clock=vm,driftfix=slew",
                        "-boot", "order=c,menu=off,strict=on", "-no-acpi", "-no-user-config",
                        "-overcommit", "mem-lock=on-fault,cpu-pm=off",
                        "-audiodev", "none,id=snd0"])
    assert o.mem_lock == "on-fault"


def test_machine_none_takes_no_walk_check() -> None:
    # The empty machine has no guest: a walk beyond its RAM is not an error there.
    parse_run_args(["-machine", "none", "-m", "1"])
    with pytest.raises(OptionError):
        parse_run_args(["-m", "1"])
