"""The walk firmware boots QEMU's microvm with no other firmware.

``qemu-system-x86_64 -M microvm,x-option-roms=off,pit=off,pic=off,rtc=off
-accel kvm -m 128 -nodefaults -bios walk-bios.bin``: the vCPU starts at the
image's reset vector, the loader copies the walk to 0x7c00, and the walk runs.
Proven from outside: the serial ticks (with the ISA serial, QEMU's default)
and QEMU's walk-pattern check on ``pmemsave`` of the stopped guest; with
``isa-serial=off`` (no COM1 at all) by RAM alone. QEMU maps the image as the
RAM block ``pc.bios`` with its size (``info ramblock``). Every wait is on
serial output or guest RAM, with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import run
from e2e_helpers import needs_qemu_and_kvm, walk_problems_of

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import MIB
from livemig.machine.kvm import WALK_BIOS_PATH, walk_bios_image

pytestmark = [*needs_qemu_and_kvm(), pytest.mark.timeout(90)]

RAM = "128M"
PAGE = 4096
TICK = 256


def microvm(tmp_path: Path, bios: bytes, name: str, extra: list[str] | None = None) -> VmSpec:
    image = tmp_path / f"{name}-bios.bin"
    image.write_bytes(bios)
    return VmSpec(engine="qemu", machine="microvm", name=name, ram=RAM, accel="kvm",
                  boot_image=str(image), extra=list(extra or []))


def ramblocks(text: str) -> dict[str, int]:
    """``info ramblock``: block name -> used length (bytes)."""
    blocks = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            blocks[cols[0]] = int(cols[4], 16)
    return blocks


async def first_bytes_change(vm: Vm, addr: int, timeout: float) -> None:
    """The walk is running: the first byte of the page at ``addr`` changes."""
    before = (await vm.pmem(addr, 1))[0]
    deadline = time.monotonic() + timeout
    while (await vm.pmem(addr, 1))[0] == before:
        if time.monotonic() > deadline:
            pytest.fail(f"byte at 0x{addr:x} stayed {before} for {timeout} s")
        await asyncio.sleep(0.01)


def test_ticking_walk_runs_from_the_reset_vector(tmp_path):
    """'A', then 256-page ticks and a 'B' every 64 passes on COM1; the stopped
    guest's RAM holds the walk pattern over [1 MiB, 16 MiB), nothing above."""
    start, end = 1 * MIB, 16 * MIB
    passes = 64 * (end - start) // PAGE // TICK

    async def body() -> None:
        vm = await Vm.start(microvm(tmp_path, walk_bios_image(start, end, tick_pages=TICK),
                                    "tick"), str(tmp_path))
        try:
            out = await vm.wait_serial(lambda d: d.count(b"B") >= 2, timeout=60)
            assert out.startswith(b"A" + b"." * passes + b"B" + b"." * passes + b"B"), out[:80]
            await vm.cmd("stop")
            mem = await vm.pmem(0, 128 * MIB)
            assert walk_problems_of(mem, "16M") == []
            pages = memoryview(mem)[start:end:PAGE]
            assert len(set(pages)) <= 2, "the walk touched [1M, 16M)"
            assert not any(mem[end:128 * MIB:PAGE]), "nothing beyond the walk's end"
            # The loader's copy at 0x7c00; loading CS and DS set the accessed bit
            # (bit 0 of the access byte) of their GDT descriptors, nothing else differs.
            sector = walk_bios_image(start, end, tick_pages=TICK)[:512]
            diff = {i: mem[0x7C00 + i] ^ sector[i] for i in range(512)
                    if mem[0x7C00 + i] != sector[i]}
            assert len(diff) == 2 and set(diff.values()) == {1}, diff
            blocks = ramblocks(await vm.cmd("human-monitor-command",
                                            **{"command-line": "info ramblock"}))
            assert blocks["pc.bios"] == len(WALK_BIOS_PATH.read_bytes()) == 64 * 1024
            assert blocks["microvm.ram"] == 128 * MIB
            await vm.cmd("cont")
            grown = len(out) + passes
            await vm.wait_serial(lambda d: len(d) > grown, timeout=30)
        finally:
            await vm.close()
    run(body())


def test_default_walk_with_no_serial(tmp_path):
    """The issue's command line, isa-serial=off, the image as shipped (walk 1 MiB
    to 100 MiB): the walk runs (a page's first byte changes) and the stopped
    guest's RAM holds the pattern."""
    async def body() -> None:
        vm = await Vm.start(microvm(tmp_path, WALK_BIOS_PATH.read_bytes(), "plain",
                                    ["-M", "isa-serial=off"]), str(tmp_path))
        try:
            await first_bytes_change(vm, 50 * MIB, timeout=30)
            await vm.cmd("stop")
            mem = await vm.pmem(0, 128 * MIB)
            assert walk_problems_of(mem, "100M") == []
            assert not any(mem[100 * MIB:128 * MIB:PAGE])
            assert vm.serial_bytes() == b"", "no COM1 with isa-serial=off"
        finally:
            await vm.close()
    run(body())
