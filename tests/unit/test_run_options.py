"""``livemig run`` option parsing, QEMU spelling."""

import pytest

from livemig.cli.run_options import OptionError, parse_run_args
from livemig.machine.guest import MIB


def test_qemu_style_and_double_dash_are_the_same():
    a = parse_run_args(["-m", "512M", "-S", "-name", "src", "-incoming", "defer"])
    b = parse_run_args(["--m", "512M", "--S", "--name=src", "--incoming=defer"])
    assert a == b
    assert a.ram_size == 512 * MIB and a.start_paused and a.incoming == "defer"


@pytest.mark.parametrize("text,size", [("512M", 512 * MIB), ("2G", 2048 * MIB), ("256", 256 * MIB)])
def test_sizes(text, size):
    assert parse_run_args(["-m", text]).ram_size == size


@pytest.mark.parametrize("argv", [
    ["-m", "lots"], ["-m"], ["-accel", "xen"], ["-bogus"], ["-guest", "walk,end=1G"],
    ["-guest", "walk,start=3"], ["-device", "accel,size=64M"], ["-device", "nic,id=n"],
    ["-global", "migration"], ["-uuid", "nope"], ["positional"],
])
def test_invalid_options_are_one_clear_error(argv):
    with pytest.raises(OptionError) as exc:
        parse_run_args(argv)
    assert "\n" not in str(exc.value) and str(exc.value)


def test_guest_device_serial_global_qmp():
    o = parse_run_args(["-m", "256M", "-guest", "walk,start=1M,end=100M,rate=0",
                        "-device", "accel,id=acc0,size=64M,init-size=4M,prepare-ms=400",
                        "-serial", "file:/tmp/x", "-global", "migration.x-switchover-ack=on",
                        "-qmp", "unix:/tmp/q,server=on,wait=off", "-qmp", "tcp:127.0.0.1:0"])
    assert o.guest.end == 100 * MIB and o.guest.rate_pages_per_s == 0
    assert o.devices[0].id == "acc0" and o.devices[0].prepare_ms == 400
    assert o.serial == "/tmp/x"
    assert o.globals == [("migration", "x-switchover-ack", "on")]
    assert len(o.qmp) == 2


def test_machine_accel_form():
    assert parse_run_args(["-machine", "livemig-pc,accel=tcg"]).accel == "soft"
    assert parse_run_args(["-machine", "accel=tcg"]).machine == "livemig-pc-10.0"


def test_mem_prealloc_option():
    assert parse_run_args(["-mem-prealloc"]).mem_prealloc
    assert parse_run_args(["--mem-prealloc"]).mem_prealloc
    assert not parse_run_args([]).mem_prealloc


def test_prealloc_makes_every_page_resident():
    from livemig.machine.ram import RamBlock
    ram = RamBlock("pc.ram", 8 * MIB)
    try:
        assert not ram.resident_pages().all()      # a fresh mapping: nothing faulted in
        ram.prealloc()
        assert ram.resident_pages().all()
        assert not ram.pages.any()                  # and still all zero
    finally:
        ram.close()


def test_device_values_take_qemuopts_double_comma():
    opts = parse_run_args(["-device", "accel,id=a,,b,size=1M,init-size=0"])
    assert opts.devices[0].id == "a,b" and opts.devices[0].size == 1 << 20


# -- QEMU's command line (issue 13): every text checked against qemu-system-x86_64 10.0.2 --

def error_of(argv: list[str]) -> str:
    with pytest.raises(OptionError) as exc:
        parse_run_args(argv)
    return str(exc.value)


@pytest.mark.parametrize("argv,text", [
    (["-M", "bogus"], 'unsupported machine type: "bogus"\nUse -machine help to list supported '
                      "machines"),
    (["-machine", "q35"], 'unsupported machine type: "q35"\nUse -machine help to list '
                          "supported machines"),
    (["-smp", "2"], "Invalid SMP CPUs 2. The max CPUs supported by machine 'livemig-pc-10.0' is 1"),
    (["-smp", "cpus=1,maxcpus=4"],
     "Invalid SMP CPUs 4. The max CPUs supported by machine 'livemig-pc-10.0' is 1"),
    (["-smp", "sockets=2"],
     "Invalid SMP CPUs 2. The max CPUs supported by machine 'livemig-pc-10.0' is 1"),
    (["-smp", "bogus"], "Parameter 'smp.cpus' expects integer"),
    (["-smp", "cpus=1,bogus=3"], "Parameter 'smp.bogus' is unexpected"),
    (["-vga", "bogus"], "unknown vga type: bogus"),
    (["-cpu", "bogus"], "unable to find CPU model 'bogus'"),
    (["-cpu", "max,bogus=on"],
     "can't apply global max-x86_64-cpu.bogus=on: Property 'max-x86_64-cpu.bogus' not found"),
    (["-display", "cocoa"], "-display cocoa: Parameter 'type' does not accept value 'cocoa'"),
    (["-display", "none,bogus=1"], "-display none,bogus=1: Parameter 'bogus' is unexpected"),
    (["-accel", "bogus"], "-accel bogus: invalid accelerator bogus"),
    (["-chardev", "socket,path=/tmp/x"], "-chardev socket,path=/tmp/x: chardev: no id specified"),
    (["-chardev", "bogus,id=m"], "-chardev bogus,id=m: 'bogus' is not a valid char driver name"),
    (["-chardev", "null,id=m", "-chardev", "null,id=m"],
     "-chardev null,id=m: Duplicate ID 'm' for chardev"),
    (["-chardev", "socket,id=m"], "-chardev socket,id=m: Unable to parse FD number "),
    (["-mon", "chardev=nope,mode=control"], '-mon chardev=nope,mode=control: chardev "nope" '
                                             "not found"),
    (["-mon", "mode=control"], "-mon mode=control: Parameter 'chardev' is missing"),
    (["-mon", "chardev=m,mode=bogus"],
     "-mon chardev=m,mode=bogus: Parameter 'mode' does not accept value 'bogus'"),
    (["-mon", "chardev=m,mode=control,bogus=1"],
     "-mon chardev=m,mode=control,bogus=1: Invalid parameter 'bogus'"),
    (["-mon", "chardev=x,mode=control,pretty=maybe"],
     "-mon chardev=x,mode=control,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'"),
    (["-serial", "chardev:nope"], "-serial chardev:nope: could not connect serial device to "
                                  "character backend 'chardev:nope'"),
    (["-serial", "bogus"], "-serial bogus: 'bogus' is not a valid char driver\n-serial bogus: "
                           "could not connect serial device to character backend 'bogus'"),
    (["-serial", "tcp:127.0.0.1"], "-serial tcp:127.0.0.1: could not connect serial device to "
                                   "character backend 'tcp:127.0.0.1'"),
])
def test_qemu_texts(argv: list[str], text: str) -> None:
    assert error_of(argv) == text


@pytest.mark.parametrize("argv,text", [
    (["-chardev", "null,id=m", "-mon", "chardev=m"], "no human monitor (HMP)"),
    (["-chardev", "null,id=m", "-mon", "chardev=m,mode=readline"], "no human monitor (HMP)"),
    (["-monitor", "stdio"], "no human monitor (HMP)"),
    (["-chardev", "null,id=m", "-mon", "chardev=m,mode=control"], "needs a socket chardev"),
    (["-chardev", "socket,id=m,path=/tmp/x,server=on", "-mon", "chardev=m,mode=control",
      "-serial", "chardev:m"], "-serial chardev:m: Device 'm' is in use"),
    (["-serial", "stdio"], "chardev backend 'stdio' is not supported by livemig"),
    (["-serial", "null", "-serial", "file:/tmp/x"], "livemig has one serial port (COM1)"),
    (["-display", "gtk"], "livemig has no display"),
    (["-chardev", "socket,id=m,path=/tmp/x,server=on,telnet=on"], "'telnet' is not supported"),
])
def test_livemig_refusals_are_clear(argv: list[str], text: str) -> None:
    assert text in error_of(argv)


def test_qemu_machine_class_argv_parses() -> None:
    """python/qemu/machine/machine.py's _base_args, the three monitor forms, a console."""
    for moncdev in ("socket,id=mon,fd=5", "socket,id=mon,host=127.0.0.1,port=4444",
                    "socket,id=mon,path=/tmp/m.sock"):
        o = parse_run_args(["-display", "none", "-vga", "none", "-chardev", moncdev,
                            "-mon", "chardev=mon,mode=control", "-serial", "null"])
        assert o.monitors == ["mon"] and o.chardevs["mon"].server is False
    o = parse_run_args(["-chardev", "socket,id=console,path=/tmp/c.con,server=on,wait=off",
                        "-serial", "chardev:console", "-monitor", "null"])
    assert o.serial_chardev == "console" and o.serial is None


def test_serial_spellings() -> None:
    o = parse_run_args(["-serial", "unix:/tmp/s.sock,server=on,wait=off"])
    assert o.serial_chardev == "serial0" and o.chardevs["serial0"].path == "/tmp/s.sock"
    assert o.chardevs["serial0"].option == "-serial"
    o = parse_run_args(["-serial", "tcp:127.0.0.1:0,server=on,wait=off"])
    assert o.chardevs["serial0"].kind == "tcp" and o.chardevs["serial0"].server
    o = parse_run_args(["-serial", "chardev:s", "-chardev", "socket,id=s,path=/tmp/s,server=on"])
    assert o.serial_chardev == "s"                  # -chardev after its user, as QEMU allows
    o = parse_run_args(["-chardev", "file,id=f,path=/tmp/f", "-serial", "chardev:f"])
    assert o.serial == "/tmp/f" and o.serial_chardev is None
    for value in ("null", "none"):
        o = parse_run_args(["-serial", value])
        assert o.serial is None and o.serial_chardev is None
    assert parse_run_args(["-serial", "file:/tmp/a,b"]).serial == "/tmp/a,b"
    # QEMU's machine class: one -serial null per console before the console.
    o = parse_run_args(["-serial", "null", "-serial", "null"])
    assert o.serial is None


def test_qmp_is_the_chardev_mon_shorthand() -> None:
    o = parse_run_args(["-qmp", "unix:/tmp/q,server=on,wait=off", "-qmp", "tcp:127.0.0.1:0,server"])
    assert o.monitors == ["compat_monitor0", "compat_monitor1"]
    assert o.chardevs["compat_monitor0"].path == "/tmp/q"
    assert o.chardevs["compat_monitor1"].wait is True and o.chardevs["compat_monitor0"].option \
        == "-qmp"
    o = parse_run_args(["-chardev", "socket,id=m,path=/tmp/q,server=on,wait=off",
                        "-mon", "m,mode=control"])     # chardev is -mon's implied key
    assert o.monitors == ["m"]


def test_accepted_no_ops_and_help() -> None:
    o = parse_run_args(["-display", "none", "-vga", "none", "-nographic", "-nodefaults",
                        "-no-shutdown", "-smp", "1", "-cpu", "max", "-monitor", "null",
                        "-smp", "cpus=1,sockets=1,cores=1,threads=1,maxcpus=1"])
    assert o.no_shutdown and o.cpu == "max" and not o.warnings and o.help is None
    assert parse_run_args(["-vga", "std"]).warnings == [
        "A -vga option was passed but this machine type does not use that option; "
        "No VGA device has been created"]
    assert parse_run_args(["-cpu", "host"]).cpu == "host"   # KVM checked at start (run.py)
    for argv, kind in ((["-M", "help"], "machine"), (["-machine", "help"], "machine"),
                       (["-accel", "help"], "accel"), (["-cpu", "help"], "cpu"),
                       (["-version"], "version"), (["--version"], "version")):
        assert parse_run_args(argv).help == kind


def test_help_texts_are_qemus_format() -> None:
    from livemig.cli.run_options import help_text
    text = help_text(parse_run_args(["-M", "help"])).splitlines()
    assert text[0] == "Supported machines are:"
    assert text[1] == (f"{'livemig-pc':<20} livemig PC (one vCPU, walk guest, accel devices) "
                       "(alias of livemig-pc-10.0)")
    assert text[2].startswith(f"{'livemig-pc-10.0':<20} ") and text[2].endswith(" (default)")
    assert help_text(parse_run_args(["-accel", "help"])).splitlines() == [
        "Accelerators supported in QEMU binary:", "tcg", "kvm", "soft"]
    version = help_text(parse_run_args(["-version"])).splitlines()
    assert version[0] == "QEMU emulator version 10.0.2 (livemig 0.1.0)"
