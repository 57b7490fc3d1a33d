"""The engine's failures, typed: each carries the text ``query-migrate``
shows as ``error-desc`` (QEMU's words where QEMU has them)."""

from __future__ import annotations


class MigrationError(Exception):
    """A migration failed; ``desc`` is the reason, as the user reads it."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class MigrationCancelled(Exception):
    """``migrate_cancel`` ended the migration: not a failure."""


class LoadError(MigrationError):
    """The destination refused the stream; ``desc`` goes to ``error-desc``
    and, over the return path, to the source."""
