"""`virsh migrate --live` A -> B -> A of a QEMU domain and a livemig domain, in one
run, between two libvirt daemons on this machine (tests/e2e/libvirt_harness.py).
Prints each migration's wall time (virsh's) and libvirt's completed-job figures.

    python bench/libvirt_migrate.py [--ram-mib 256] [--reps 2]

Figures on a shared machine are noisy: compare the engines within one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))

from libvirt_harness import Daemon, libvirt_missing, start_pair  # noqa: E402
from test_libvirt import domain_xml, jobinfo, write_emulator  # noqa: E402

from livemig.machine.machine import kvm_usable  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")


def qemu_xml(ram_mib: int, kvm: bool) -> str:
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>lm1</name><memory unit='MiB'>{ram_mib}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
  <devices><emulator>{QEMU}</emulator><controller type='usb' model='none'/>
    <memballoon model='none'/></devices>
</domain>"""


def one(src: Daemon, dst: Daemon) -> tuple[float, dict[str, str]]:
    t0 = time.monotonic()
    src.virsh("migrate", "--live", "lm1", dst.uri, "--migrateuri", "tcp://127.0.0.1",
              timeout=300)
    return time.monotonic() - t0, jobinfo(dst)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    why = libvirt_missing()
    if why:
        sys.exit(why)
    root = tempfile.mkdtemp(prefix="libvirt-bench-")
    a, b = start_pair(root, first_port=23200)
    kvm = kvm_usable()[0]
    try:
        engines = [("livemig", domain_xml(write_emulator(root),
                                          os.path.join(root, "serial"), kvm)
                    .replace("<memory unit='MiB'>128</memory>",
                             f"<memory unit='MiB'>{args.ram_mib}</memory>"))]
        if QEMU:
            engines.append(("qemu", qemu_xml(args.ram_mib, kvm)))
        for engine, xml in engines:
            path = os.path.join(root, f"{engine}.xml")
            with open(path, "w") as f:
                f.write(xml)
            a.virsh("create", path, timeout=180)
            for _ in range(args.reps):
                for src, dst in ((a, b), (b, a)):
                    wall, info = one(src, dst)
                    print(f"{engine:8} {src.name}->{dst.name} virsh {wall:6.2f} s  "
                          f"downtime {info.get('Total downtime', '?'):>8}  "
                          f"elapsed {info.get('Time elapsed', '?'):>9}  "
                          f"processed {info.get('Memory processed', '?')}", flush=True)
            a.virsh("destroy", "lm1")
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
