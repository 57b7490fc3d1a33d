"""Fixtures for the KVM accelerator tests.

``kvm`` marks a test that needs a usable /dev/kvm; it is skipped with the
reason :func:`livemig.machine.kvm.kvm_usable` gives when not. Helpers live in
kvm_harness.py (a unique module name: several test folders have a conftest).
"""

from __future__ import annotations

import pytest
from kvm_harness import KVM_OK, KVM_WHY, RAM_SIZE, WALK_END, WALK_START, Vm

from livemig.machine.guest import GuestConfig


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (skipped otherwise)")


def pytest_collection_modifyitems(config, items) -> None:
    skip = pytest.mark.skip(reason=f"KVM not usable here: {KVM_WHY}")
    for item in items:
        if item.get_closest_marker("kvm") is not None and not KVM_OK:
            item.add_marker(skip)


@pytest.fixture
def make_vm(tmp_path):
    vms: list[Vm] = []

    def make(guest: GuestConfig | None = None, ram_size: int = RAM_SIZE,
             name: str | None = None, irqchip: bool = False) -> Vm:
        guest = guest or GuestConfig(start=WALK_START, end=WALK_END, rate_pages_per_s=0)
        vm = Vm(tmp_path, name or f"vm{len(vms)}", guest, ram_size, irqchip)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.close()
