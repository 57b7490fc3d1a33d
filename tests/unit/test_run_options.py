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
    ["-serial", "stdio"], ["-global", "migration"], ["-uuid", "nope"], ["positional"],
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
    assert parse_run_args(["-machine", "q35,accel=tcg"]).accel == "soft"


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
