"""``-M microvm,...`` and ``-bios`` (cli/run_options.py): QEMU's property names,
what livemig's microvm honours, and a clear error for what it lacks."""

from __future__ import annotations

import pytest

from livemig.cli.run_options import OptionError, parse_run_args
from livemig.machine.microvm import MicrovmOptions

QEMU_LINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off"


def test_the_issues_machine_line():
    opts = parse_run_args(["-M", QEMU_LINE, "-bios", "/x/walk-bios.bin"])
    assert opts.machine == "microvm"
    assert opts.microvm == MicrovmOptions(isa_serial=True, ioapic2=True)
    assert opts.bios == "/x/walk-bios.bin"


def test_properties_accumulate_over_several_machine_options():
    opts = parse_run_args(["-M", QEMU_LINE, "-M", "isa-serial=off", "-machine", "ioapic2=off"])
    assert opts.microvm == MicrovmOptions(isa_serial=False, ioapic2=False)
    opts = parse_run_args(["-M", f"{QEMU_LINE},acpi=on,pcie=off,auto-kernel-cmdline=off"])
    assert opts.microvm == MicrovmOptions()


@pytest.mark.parametrize("line, text", [
    ("microvm", "livemig's microvm has no option ROMs: pass -M microvm,x-option-roms=off"),
    ("microvm,x-option-roms=off", "livemig's microvm has no PIT: pass -M microvm,pit=off"),
    ("microvm,x-option-roms=off,pit=off,pic=auto,rtc=off",
     "livemig's microvm has no PIC: pass -M microvm,pic=off"),
    ("microvm,x-option-roms=off,pit=off,pic=off", "livemig's microvm has no RTC: pass "
     "-M microvm,rtc=off"),
    (f"{QEMU_LINE},acpi=off", "livemig's microvm has QEMU's ACPI devices and tables: "
     "acpi=off is not supported"),
    (f"{QEMU_LINE},pcie=on", "livemig's microvm has no PCIe host bridge: pcie=on is not "
     "supported"),
    (f"{QEMU_LINE},nosuch=1", "Property 'microvm-machine.nosuch' not found"),
])
def test_what_livemigs_microvm_lacks_is_one_clear_error(line, text):
    with pytest.raises(OptionError) as err:
        parse_run_args(["-M", line])
    assert str(err.value) == text


def test_microvm_properties_and_bios_belong_to_microvm():
    with pytest.raises(OptionError, match="Property 'livemig-pc-10.0-machine.pit' not found"):
        parse_run_args(["-M", "livemig-pc-10.0,pit=off"])
    with pytest.raises(OptionError, match="-bios is for -M microvm"):
        parse_run_args(["-bios", "/x/bios.bin"])
