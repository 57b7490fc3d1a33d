"""Postcopy of a running KVM guest (issue 15): the KVM vCPU faults inside
``KVM_RUN`` on pages not there yet, blocks in the kernel until the load
thread places them with UFFDIO_COPY, and walks on; KVM's walk re-dirties its
whole range every pass, so precopy alone would need the downtime race that
postcopy avoids."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from kvm_harness import KVM_OK, KVM_WHY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_helpers import (  # noqa: E402
    uffd_count,
    wait_event,
    wait_migration_status,
    wait_runstate,
)

from livemig.cli.driver import Vm, VmSpec
from livemig.machine.guest import MIB
from livemig.machine.walk_check import check_walk_pattern

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable here: {KVM_WHY}")]
RAM, WALK_END = "128M", "32M"


def walk_first_bytes(mem: bytes) -> np.ndarray:
    return np.frombuffer(mem, dtype=np.uint8).reshape(-1, 4096)[MIB // 4096: 32 * MIB // 4096, 0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("paused_dst", [False, True], ids=["running", "S"])
def test_kvm_guest_postcopy(tmp_path, paused_dst):
    async def main():
        src = await Vm.start(VmSpec(name="src", ram=RAM, accel="kvm", walk_end=WALK_END),
                             str(tmp_path))
        dst = None
        try:
            dst = await Vm.start(VmSpec(name="dst", ram=RAM, accel="kvm", walk_end=WALK_END,
                                        incoming="defer", paused=paused_dst), str(tmp_path))
            for vm in (src, dst):
                await vm.set_caps(events=True, **{"postcopy-ram": True})
            # Background pages slowed so the running guest surely faults.
            await src.set_params(max_bandwidth=0, **{"max-postcopy-bandwidth": 16 << 20})
            await dst.cmd("migrate-incoming", uri=f"unix:{tmp_path}/mig.sock")
            await src.wait_serial(lambda d: d.startswith(b"A"), timeout=20)
            await src.cmd("migrate", uri=f"unix:{tmp_path}/mig.sock")
            await wait_event(src, "MIGRATION", "active")
            await src.cmd("migrate-start-postcopy")
            info = await wait_migration_status(src, timeout=90)
            assert info["status"] == "completed", info.get("error-desc")
            dinfo = await wait_migration_status(dst, timeout=30)
            assert dinfo["status"] == "completed", dinfo.get("error-desc")
            await wait_runstate(src, "postmigrate")
            assert uffd_count(dst.proc.pid) == 0
            assert info["ram"]["postcopy-bytes"] > 0
            if paused_dst:
                assert info["ram"]["postcopy-requests"] == 0
                src_mem = await src.pmem(0, 128 * MIB)
                assert src_mem == await dst.pmem(0, 128 * MIB)
            else:
                assert info["ram"]["postcopy-requests"] > 0
                before = len(dst.serial_bytes())
                await dst.wait_serial(lambda d: len(d) > before + 1, timeout=30)   # new 'B's
                await dst.cmd("stop")
            assert check_walk_pattern(walk_first_bytes(await dst.pmem(0, 128 * MIB))) == []
        finally:
            await src.close()       # also when the destination did not start
            if dst is not None:
                await dst.close()
    asyncio.run(main())


@pytest.mark.timeout(120)
def test_kvm_pages_first_sent_in_postcopy_carry_their_data(tmp_path):
    """Issue 15's stale page, forced. The source starts paused, so at setup no
    walk page is resident (all "known zero"); it runs only once the migration
    is set up, and precopy moves one page per 100 ms window (max-bandwidth
    10 B/s), so the walk's pages (from page 256 on) are first sent after
    postcopy's discard sync. That sync had taken their dirty marks, and they
    went out as zero pages (in the seen failure: the pages past the 2 MiB
    frontier the zeroing pass had reached at setup). The stopped destination
    must hold exactly the stopped source's RAM."""
    async def main():
        src = await Vm.start(VmSpec(name="src", ram=RAM, accel="kvm", walk_end=WALK_END,
                                    walk_tick=8192, paused=True), str(tmp_path))
        dst = None
        try:
            dst = await Vm.start(VmSpec(name="dst", ram=RAM, accel="kvm", walk_end=WALK_END,
                                        incoming="defer", paused=True), str(tmp_path))
            for vm in (src, dst):
                await vm.set_caps(events=True, **{"postcopy-ram": True})
            await src.set_params(max_bandwidth=10, **{"max-postcopy-bandwidth": 0})
            await dst.cmd("migrate-incoming", uri=f"unix:{tmp_path}/mig.sock")
            await src.cmd("migrate", uri=f"unix:{tmp_path}/mig.sock")
            await wait_event(src, "MIGRATION", "active")
            await src.cmd("cont")
            # 'A', the zeroing pass, then a '.' after 8192 pages walked: every walk
            # page (7936 of them) holds a non-zero first byte now.
            await src.wait_serial(lambda d: d.startswith(b"A."), timeout=30)
            await src.cmd("migrate-start-postcopy")
            info = await wait_migration_status(src, timeout=90)
            assert info["status"] == "completed", info.get("error-desc")
            dinfo = await wait_migration_status(dst, timeout=30)
            assert dinfo["status"] == "completed", dinfo.get("error-desc")
            src_mem = await src.pmem(0, 128 * MIB)
            dst_mem = await dst.pmem(0, 128 * MIB)
            assert check_walk_pattern(walk_first_bytes(src_mem)) == []
            assert check_walk_pattern(walk_first_bytes(dst_mem)) == []
            assert src_mem == dst_mem
            # The walk's pages went in postcopy (precopy sent a few hundred at most).
            assert info["ram"]["postcopy-bytes"] >= 7000 * 4096
        finally:
            await src.close()       # also when the destination did not start
            if dst is not None:
                await dst.close()
    asyncio.run(main())
