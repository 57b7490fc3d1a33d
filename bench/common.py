"""What the bench scripts share: their common options, and
``livemig.cli.bench.walk_pair`` (the setup ``livemig bench`` uses) driven by them."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from livemig.cli.bench import WALK_START as START  # noqa: F401 - for the scripts
from livemig.cli.bench import walk_pair
from livemig.cli.driver import Vm


def add_pair_args(p: argparse.ArgumentParser, ram: str = "2G", walk_end: str = "1G") -> None:
    p.add_argument("--engine", default="livemig", choices=("livemig", "qemu"))
    p.add_argument("--ram", default=ram)
    p.add_argument("--walk-end", default=walk_end)
    p.add_argument("--mem-prealloc", action="store_true", help="start both VMs with it")


@asynccontextmanager
async def pair(a: argparse.Namespace, **kw) -> AsyncIterator[tuple[Vm, Vm, str]]:
    with tempfile.TemporaryDirectory() as wd:
        async with walk_pair(a.engine, a.ram, a.walk_end, wd, mem_prealloc=a.mem_prealloc,
                             **kw) as vms:
            yield vms
