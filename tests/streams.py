"""Hand-crafted migration streams for tests: the pieces every stream starts with.

A QEMU 10.0 stream begins ``QEVM`` v3 header, configuration section (machine
type), then sections. Tests that build streams by hand (decoder unit tests,
the hostile-stream e2e tests, the fuzzer) take the preamble and the RAM
section's start from here instead of each spelling them out.

Import it with the ``tests`` directory on ``sys.path`` (``sys.path.insert(0,
str(Path(__file__).resolve().parents[1]))`` from ``tests/<dir>/*.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from livemig.wire import (
    SectionType,
    encode_configuration,
    encode_header,
    encode_ram_block_list,
    encode_section_header,
)

QEMU_MACHINE = "pc-q35-10.0"
RAM_VERSION = 4


def preamble(machine_type: str | None = QEMU_MACHINE, uuid: bytes | None = None) -> bytes:
    """``QEVM`` v3 header, then the configuration section for ``machine_type``
    (``uuid``: the ``configuration/uuid`` subsection). ``None``: the header alone."""
    if machine_type is None:
        return encode_header()
    return encode_header() + encode_configuration(machine_type, uuid)


def section(type_: SectionType, sid: int, idstr: str | None = None, version: int = 1,
            instance: int = 0) -> bytes:
    """A section header (START/FULL carry ``idstr``, ``instance`` and ``version``)."""
    return encode_section_header(type_, sid, idstr, instance, version)


def ram_section_start(sid: int, blocks: Sequence[tuple[str, int]],
                      version: int = RAM_VERSION) -> bytes:
    """``SECTION_START`` of ``ram`` (id ``sid``) with its block list (MEM_SIZE record)."""
    return section(SectionType.SECTION_START, sid, "ram", version) + \
        encode_ram_block_list(list(blocks))


def ram_stream_start(blocks: Sequence[tuple[str, int]], *, sid: int = 0,
                     machine_type: str | None = QEMU_MACHINE) -> bytes:
    """The preamble, then the RAM section's start: where page records may follow."""
    return preamble(machine_type) + ram_section_start(sid, blocks)
