"""A live microvm guest between QEMU 10.0.2 and livemig's ``-M microvm``, both
ways (issue 16).

Every VM boots the same walk firmware (``-bios``, ticking on COM1) on
``-M microvm,x-option-roms=off,pit=off,pic=off,rtc=off -accel kvm``; the
destination listens (``-incoming defer``, ``migrate-incoming`` on TCP) and
takes a live migration of the walking guest. With a ``-S`` destination both
guests are stopped at the end: guest-physical memory is byte for byte the
same (``pmemsave`` on each: RAM and the firmware at 4 GiB) and the walk
pattern holds; then ``cont`` and the walk goes on there (new ticks on the
destination's COM1, RAM changing). Variants: a running destination;
return-path with switchover-ack (no device needs the ACK: it comes at
once); multifd; the round trip QEMU -> livemig -> QEMU. Every wait is on a
status, a run state or serial output, with a deadline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run, start_incoming, wait_completed
from e2e_helpers import needs_qemu_and_kvm, wait_runstate, walk_problems_of

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import MIB
from livemig.machine.kvm import walk_bios_image

pytestmark = [*needs_qemu_and_kvm(), pytest.mark.timeout(240)]

RAM, RAM_BYTES = "128M", 128 * MIB
WALK_END = "16M"
TICK = 256
BIOS_AT, BIOS_SIZE = 0xFFFF0000, 0x10000
PLAIN: dict[str, bool] = {}
ACKED = {"return-path": True, "switchover-ack": True}
MULTIFD = {"multifd": True}


def _image(tmp_path: Path) -> str:
    image = tmp_path / "walk-bios.bin"
    if not image.exists():
        image.write_bytes(walk_bios_image(1 * MIB, 16 * MIB, tick_pages=TICK))
    return str(image)


def _spec(tmp_path: Path, engine: str, name: str, *, incoming: bool = False,
          paused: bool = False) -> VmSpec:
    return VmSpec(engine=engine, machine="microvm", name=name, ram=RAM, accel="kvm",
                  boot_image=_image(tmp_path), incoming="defer" if incoming else None,
                  paused=paused, walk_end=WALK_END)


def _differing_pages(a: bytes, b: bytes) -> list[int]:
    x = np.frombuffer(a, np.uint8).reshape(-1, 4096)
    y = np.frombuffer(b, np.uint8).reshape(-1, 4096)
    return np.flatnonzero((x != y).any(axis=1)).tolist()[:8]


async def _hop(src: Vm, dst: Vm, caps: dict[str, bool]) -> None:
    """Migrate the walking ``src`` into the listening ``dst``; both complete."""
    for vm in (src, dst):
        if caps:
            await vm.set_caps(**caps)
    uri = await start_incoming(dst)
    await src.cmd("migrate", uri=uri)
    src_info = await wait_completed(src, timeout=90)
    dst_info = await wait_completed(dst, timeout=90)
    why = (src_info, dst_info, src.stderr_text(), dst.stderr_text())
    assert src_info["status"] == dst_info["status"] == "completed", why


async def _same_guest(src: Vm, dst: Vm) -> bytes:
    """The stopped source's guest-physical memory is the paused destination's."""
    await wait_runstate(src, "postmigrate")
    await wait_runstate(dst, "paused")
    src_mem, dst_mem = await src.pmem(0, RAM_BYTES), await dst.pmem(0, RAM_BYTES)
    assert _differing_pages(src_mem, dst_mem) == []
    assert walk_problems_of(dst_mem, WALK_END) == []
    assert await src.pmem(BIOS_AT, BIOS_SIZE) == await dst.pmem(BIOS_AT, BIOS_SIZE)
    return dst_mem


async def _walks_on(vm: Vm, before: bytes | None = None) -> None:
    """The guest runs (``cont`` if it is paused): new serial output, the walk
    pattern holds, and (from a known state) RAM changed."""
    seen = len(vm.serial_bytes())
    if before is not None:
        await vm.cmd("cont")
    await vm.wait_serial(lambda d: len(d) > seen + 4, timeout=30)
    await vm.cmd("stop")
    after = await vm.pmem(0, RAM_BYTES)
    assert walk_problems_of(after, WALK_END) == []
    if before is not None:
        assert _differing_pages(after, before), "the walk wrote nothing after cont"


async def _start(tmp_path: Path, *specs: VmSpec) -> list[Vm]:
    vms: list[Vm] = []
    try:
        for spec in specs:
            vms.append(await Vm.start(spec, str(tmp_path)))
    except BaseException:
        for vm in vms:
            await vm.close()
        raise
    return vms


def _one_hop(tmp_path: Path, src_engine: str, dst_engine: str, caps: dict[str, bool], *,
             dst_paused: bool) -> None:
    async def body() -> None:
        src, dst = await _start(tmp_path, _spec(tmp_path, src_engine, f"{src_engine}-src"),
                                _spec(tmp_path, dst_engine, f"{dst_engine}-dst", incoming=True,
                                      paused=dst_paused))
        try:
            await src.wait_serial(lambda d: d.count(b"B") >= 1, timeout=60)     # walking
            await _hop(src, dst, caps)
            if dst_paused:
                await _walks_on(dst, await _same_guest(src, dst))
            else:
                await wait_runstate(dst, "running")
                await _walks_on(dst)
        finally:
            await src.close()
            await dst.close()
    run(body())


@pytest.mark.parametrize("caps", [PLAIN, ACKED, MULTIFD],
                         ids=["plain", "return-path+switchover-ack", "multifd"])
def test_qemu_to_livemig(tmp_path, caps):
    _one_hop(tmp_path, "qemu", "livemig", caps, dst_paused=True)


def test_qemu_to_a_running_livemig(tmp_path):
    _one_hop(tmp_path, "qemu", "livemig", PLAIN, dst_paused=False)


@pytest.mark.parametrize("caps", [PLAIN, ACKED, MULTIFD],
                         ids=["plain", "return-path+switchover-ack", "multifd"])
def test_livemig_to_qemu(tmp_path, caps):
    _one_hop(tmp_path, "livemig", "qemu", caps, dst_paused=True)


def test_round_trip_qemu_livemig_qemu(tmp_path):
    """QEMU -> livemig (running on) -> QEMU (-S): the second hop's memory is the
    same on both sides, and the guest walks on in the last QEMU."""
    async def body() -> None:
        a, b = await _start(tmp_path, _spec(tmp_path, "qemu", "qemu-a"),
                            _spec(tmp_path, "livemig", "livemig-b", incoming=True))
        try:
            await a.wait_serial(lambda d: d.count(b"B") >= 1, timeout=60)
            await _hop(a, b, ACKED)
            await wait_runstate(b, "running")
            seen = len(b.serial_bytes())
            await b.wait_serial(lambda d: len(d) > seen + 4, timeout=30)   # walking in livemig
            (c,) = await _start(tmp_path, _spec(tmp_path, "qemu", "qemu-c", incoming=True,
                                                paused=True))
            try:
                await _hop(b, c, ACKED)
                await _walks_on(c, await _same_guest(b, c))
            finally:
                await c.close()
        finally:
            await a.close()
            await b.close()
    run(body())
