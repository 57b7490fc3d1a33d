"""Memory backends (QEMU's ``backends/hostmem*.c``): where guest RAM comes from.

libvirt gives every domain its RAM as an object, ``-object
memory-backend-ram,id=pc.ram,size=N`` with ``-machine memory-backend=pc.ram``,
and probes ``memory-backend-file`` and ``-memfd`` too. The machine maps the
one named by ``memory-backend`` as its RAM block, named after the backend's
id, as QEMU names it (so ``pc.ram`` streams stay compatible):

* ``memory-backend-ram``: an anonymous private mapping (what livemig uses
  without a backend);
* ``memory-backend-memfd``: a memfd_create(2) file, mapped shared if
  ``share=on``;
* ``memory-backend-file``: ``mem-path`` (a file, created if missing, or a
  directory to make an unlinked file in, as QEMU does), mapped shared if
  ``share=on``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar

from livemig.qapi.errors import QapiError
from livemig.qapi.schema import Object, struct
from livemig.qom.object import UserCreatable, register_object_type

BACKEND_TYPES = ("memory-backend-ram", "memory-backend-memfd", "memory-backend-file")
# QEMU's MemoryBackendProperties, the members livemig honours.
_COMMON = {"size": "size", "*share": "bool", "*prealloc": "bool", "*dump": "bool"}


@dataclass(frozen=True)
class HostMemoryBackend:
    """One memory backend object's properties (QEMU's names)."""

    qom_type: str
    id: str
    size: int
    share: bool = False
    prealloc: bool = False
    dump: bool = True
    mem_path: str | None = None

    def open_fd(self) -> int | None:
        """The descriptor to map (None: anonymous memory). OSError texts are QEMU's."""
        if self.qom_type == "memory-backend-ram":
            return None
        if self.qom_type == "memory-backend-memfd":
            fd = os.memfd_create(f"{self.id}", os.MFD_CLOEXEC)
        else:
            assert self.mem_path is not None
            try:
                if os.path.isdir(self.mem_path):
                    fd, name = tempfile.mkstemp(prefix=f"qemu_back_mem.{self.id}.",
                                                dir=self.mem_path)
                    os.unlink(name)
                else:
                    fd = os.open(self.mem_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(exc.errno, f"can't open backing store {self.mem_path} for "
                                         f"guest RAM: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size < self.size:
                os.ftruncate(fd, self.size)
        except OSError:
            os.close(fd)
            raise
        return fd


class MemoryBackend(UserCreatable):
    """A memory backend object; the machine maps it (``-machine memory-backend=ID``)
    and then it is in use (QEMU's ``host_memory_backend_is_mapped``)."""

    properties: ClassVar[Object] = struct("MemoryBackendProperties", _COMMON)
    in_use = False

    def complete(self) -> None:
        if self.props["size"] == 0:
            raise QapiError("can't create backend with size 0")

    def backend(self) -> HostMemoryBackend:
        p = self.props
        return HostMemoryBackend(self.qom_type, self.id, p["size"], share=p.get("share", False),
                                 prealloc=p.get("prealloc", False), dump=p.get("dump", True),
                                 mem_path=p.get("mem-path"))

    def can_be_deleted(self) -> bool:
        return not self.in_use


@register_object_type
class MemoryBackendRam(MemoryBackend):
    qom_type = "memory-backend-ram"


@register_object_type
class MemoryBackendMemfd(MemoryBackend):
    qom_type = "memory-backend-memfd"
    properties = struct("MemoryBackendMemfdProperties", _COMMON)


@register_object_type
class MemoryBackendFile(MemoryBackend):
    qom_type = "memory-backend-file"
    properties = struct("MemoryBackendFileProperties", {**_COMMON, "mem-path": "str"})
