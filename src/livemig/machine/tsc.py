"""The TSC rate the walk guest's ``pace`` counts in.

Under KVM (livemig's and QEMU's alike) the guest's ``rdtsc`` runs at the
vCPU's virtual TSC rate, which is the host's unless a VMM scales it (neither
does). The most honest figure is therefore KVM's own: ``KVM_GET_TSC_KHZ`` on a
scratch vCPU, when /dev/kvm is usable. Without KVM it is the host's nominal
clock, ``cpu MHz`` in /proc/cpuinfo, trusted only with the ``tsc`` flag; with
``constant_tsc`` the TSC does not follow frequency scaling, without it the
figure is a guess and a warning says so. The source taken is in
:func:`tsc_source`.

On this project's machines both give 2 600 000 kHz (``constant_tsc``,
``nonstop_tsc``, ``tsc_known_freq``).
"""

from __future__ import annotations

import fcntl
import functools
import os
import warnings

KVM_DEVICE = "/dev/kvm"


def _kvm_tsc_khz() -> int | None:
    """KVM_GET_TSC_KHZ of a scratch vCPU (what a KVM guest's rdtsc counts), or None."""
    from livemig.machine import kvm_abi as abi

    try:
        kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    fds = [kvm]
    try:
        fds.append(fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0))
        fds.append(fcntl.ioctl(fds[1], abi.KVM_CREATE_VCPU, 0))
        khz = fcntl.ioctl(fds[2], abi._io(0xA3), 0)     # KVM_GET_TSC_KHZ
        return khz if khz > 0 else None
    except OSError:
        return None
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _cpuinfo_tsc_hz() -> tuple[float, bool]:
    """(``cpu MHz`` * 1e6, whether the TSC is constant) from /proc/cpuinfo."""
    mhz, flags = None, None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if mhz is None and line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
            elif flags is None and line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
            if mhz is not None and flags is not None:
                break
    if mhz is None or not flags or "tsc" not in flags:
        raise RuntimeError("cannot tell the TSC rate: no usable /dev/kvm, and /proc/cpuinfo "
                           "has no 'cpu MHz' or no 'tsc' flag")
    return mhz * 1e6, "constant_tsc" in flags


@functools.cache
def _measure() -> tuple[float, str]:
    khz = _kvm_tsc_khz()
    if khz is not None:
        return khz * 1e3, "KVM_GET_TSC_KHZ"
    hz, constant = _cpuinfo_tsc_hz()
    if not constant:
        warnings.warn("no constant_tsc: the walk's pace in pages/s is only approximate",
                      stacklevel=3)
    return hz, "/proc/cpuinfo cpu MHz"


def tsc_hz() -> float:
    """TSC ticks per second (read once per process)."""
    return _measure()[0]


def tsc_source() -> str:
    """Where :func:`tsc_hz` came from: ``KVM_GET_TSC_KHZ`` or ``/proc/cpuinfo cpu MHz``."""
    return _measure()[1]
