"""The host's TSC rate: what the walk guest's ``pace`` counts in.

Under KVM the guest reads the host's TSC (constant and invariant on these
machines: ``constant_tsc``, ``nonstop_tsc``), so ``pace`` cycles per page
mean the same time under livemig's KVM, QEMU's KVM, and, through this rate,
the soft vCPU. The rate is the nominal clock ``/proc/cpuinfo`` reports; on a
host without an invariant TSC it is a guess, and this says so.
"""

from __future__ import annotations

import functools


@functools.cache
def tsc_hz() -> float:
    """TSC ticks per second (cached)."""
    mhz = None
    invariant = False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if mhz is None and line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                invariant = "constant_tsc" in flags
            if mhz is not None and line.startswith("flags"):
                break
    if mhz is None:
        raise RuntimeError("cannot tell the TSC rate: no 'cpu MHz' in /proc/cpuinfo")
    if not invariant:
        import warnings
        warnings.warn("no constant_tsc: the walk's pace is only approximate", stacklevel=2)
    return mhz * 1e6
