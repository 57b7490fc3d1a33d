"""Migration capabilities: QEMU 10.0's ``MigrationCapability`` and ``migrate_caps_check``.

Names, order and error texts are QEMU's (``qapi/migration.json``,
``migration/options.c``). livemig implements only :data:`IMPLEMENTED`;
enabling any other capability is refused, but only after QEMU's own rules
ran, so a client sees QEMU's text wherever QEMU itself would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from livemig.qapi.errors import (
    CAPABILITY_NOT_SUPPORTED,
    GLOBAL_PREFIX,
    MIGRATION_IN_PROGRESS,
    PROPERTY_NOT_FOUND,
    ZERO_COPY_NEEDS_PLAIN_MULTIFD,
    QapiError,
)
from livemig.qapi.schema import Array, Enum, struct
from livemig.qapi.string_input import parse_bool
from livemig.qapi.visitor import visit

# MigrationCapability in enum order (= query-migrate-capabilities order).
CAPABILITIES: Final[tuple[str, ...]] = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)

# The same as schema data: the enum, one list element, the command's arguments.
MIGRATION_CAPABILITY: Final = Enum("MigrationCapability", CAPABILITIES)
MIGRATION_CAPABILITY_STATUS: Final = struct(
    "MigrationCapabilityStatus", {"capability": MIGRATION_CAPABILITY, "state": "bool"})
MIGRATION_CAPABILITY_STATUS_LIST: Final = Array(MIGRATION_CAPABILITY_STATUS)
MIGRATE_SET_CAPABILITIES_ARGS: Final = struct(
    None, {"capabilities": MIGRATION_CAPABILITY_STATUS_LIST})

# ``-global migration.<prop>=on|off`` property -> capability
# (migration_properties[]; x-zero-copy-send exists on Linux only).
GLOBAL_PROPERTY: Final[dict[str, str]] = {
    "x-xbzrle": "xbzrle",
    "x-rdma-pin-all": "rdma-pin-all",
    "x-auto-converge": "auto-converge",
    "x-zero-blocks": "zero-blocks",
    "x-events": "events",
    "x-postcopy-ram": "postcopy-ram",
    "x-postcopy-preempt": "postcopy-preempt",
    "x-colo": "x-colo",
    "x-release-ram": "release-ram",
    "x-return-path": "return-path",
    "x-multifd": "multifd",
    "x-background-snapshot": "background-snapshot",
    "x-zero-copy-send": "zero-copy-send",
    "x-switchover-ack": "switchover-ack",
    "x-dirty-limit": "dirty-limit",
    "mapped-ram": "mapped-ram",
}

# What livemig implements; zero-blocks is deprecated in QEMU (warning only)
# and accepted here as a no-op, and so is late-block-activate: it defers the
# destination's block devices' activation to cont, and livemig has none
# (libvirt 9.0 sets it on every destination).
IMPLEMENTED: Final = frozenset(
    {
        "postcopy-ram",
        "postcopy-blocktime",
        "events",
        "return-path",
        "switchover-ack",
        "pause-before-switchover",
        "validate-uuid",
        "multifd",
        "zero-blocks",
        "auto-converge",
        "late-block-activate",
        "zero-copy-send",
    }
)

# check_caps_background_snapshot, in QEMU's order.
_BACKGROUND_SNAPSHOT_INCOMPATIBLE: Final = (
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
)

NOT_SUPPORTED: Final = CAPABILITY_NOT_SUPPORTED

def caps_check(
    old: Mapping[str, bool],
    new: Mapping[str, bool],
    *,
    incoming_started: bool,
    params: Mapping[str, Any] | None = None,
) -> list[str]:
    """Validate the capability set ``new`` like QEMU 10.0's ``migrate_caps_check``.

    Raises :class:`QapiError` with QEMU's text for the first rule broken, in
    QEMU's order; then refuses capabilities livemig does not implement.
    Returns warnings (QEMU's ``warn_report`` texts).

    ``old`` is the current set (QEMU 10.0 only consults it for the host
    postcopy probe, which livemig never reaches). ``incoming_started``: a
    ``migrate-incoming`` has started. ``params``: current parameters as
    ``query-migrate-parameters`` shows them, for the zero-copy rule.

    Host-dependent rules are not modelled: COLO without replication,
    postcopy host support, background-snapshot UFFD-WP support and
    dirty-limit's KVM dirty ring (those capabilities are refused as not
    supported instead).
    """
    def on(name: str) -> bool:
        return bool(new.get(name, False))

    warnings = []
    if on("zero-blocks"):
        warnings.append("zero-blocks capability is deprecated")
    if on("postcopy-ram"):
        if on("x-ignore-shared"):
            raise QapiError("Postcopy is not compatible with ignore-shared")
        if on("multifd"):
            raise QapiError("Postcopy is not yet compatible with multifd")
    if on("background-snapshot"):
        for cap in _BACKGROUND_SNAPSHOT_INCOMPATIBLE:
            if on(cap):
                raise QapiError(f"Background-snapshot is not compatible with {cap}")
    if on("zero-copy-send"):
        compression = params is not None and params.get("multifd-compression", "none") != "none"
        tls = params is not None and bool(params.get("tls-creds"))
        if not on("multifd") or on("xbzrle") or compression or tls:
            raise QapiError(ZERO_COPY_NEEDS_PLAIN_MULTIFD)
    if on("postcopy-preempt"):
        if not on("postcopy-ram"):
            raise QapiError("Postcopy preempt requires postcopy-ram")
        if incoming_started:
            raise QapiError("Postcopy preempt must be set before incoming starts")
    # QEMU 10.0 tests the new value, so this fires on any later set (fixed in 10.1).
    if on("multifd") and incoming_started:
        raise QapiError("Multifd must be set before incoming starts")
    if on("switchover-ack") and not on("return-path"):
        raise QapiError("Capability 'switchover-ack' requires capability 'return-path'")
    if on("dirty-limit") and on("auto-converge"):
        raise QapiError(
            "dirty-limit conflicts with auto-converge either of then available currently"
        )
    if on("multifd") and on("xbzrle"):
        raise QapiError("Multifd is not compatible with xbzrle")
    if on("mapped-ram"):
        if on("xbzrle"):
            raise QapiError("Mapped-ram migration is incompatible with xbzrle")
        if on("postcopy-ram"):
            raise QapiError("Mapped-ram migration is incompatible with postcopy")
    for cap in CAPABILITIES:
        if on(cap) and cap not in IMPLEMENTED:
            raise QapiError(NOT_SUPPORTED % cap)
    return warnings


def _parse_items(items: object) -> list[tuple[str, bool]]:
    """Visit ``migrate-set-capabilities``'s ``capabilities`` (the one QAPI visitor)."""
    visited = visit(MIGRATION_CAPABILITY_STATUS_LIST, items, "capabilities")
    return [(item["capability"], item["state"]) for item in visited]


class Capabilities:
    """The migration object's capability set; every capability starts off."""

    def __init__(self, states: Mapping[str, bool] | None = None) -> None:
        """``states``: initial values, unchecked (see ``global_props.apply_globals``)."""
        self._state = dict.fromkeys(CAPABILITIES, False)
        for name, state in (states or {}).items():
            if name not in self._state:
                raise KeyError(name)
            self._state[name] = bool(state)

    def get(self, name: str) -> bool:
        """State of one capability; ``KeyError`` for an unknown name."""
        return self._state[name]

    # Typed accessors, one per capability (the name with '-' as '_').
    @property
    def xbzrle(self) -> bool:
        return self._state["xbzrle"]

    @property
    def rdma_pin_all(self) -> bool:
        return self._state["rdma-pin-all"]

    @property
    def auto_converge(self) -> bool:
        return self._state["auto-converge"]

    @property
    def zero_blocks(self) -> bool:
        return self._state["zero-blocks"]

    @property
    def events(self) -> bool:
        return self._state["events"]

    @property
    def postcopy_ram(self) -> bool:
        return self._state["postcopy-ram"]

    @property
    def x_colo(self) -> bool:
        return self._state["x-colo"]

    @property
    def release_ram(self) -> bool:
        return self._state["release-ram"]

    @property
    def return_path(self) -> bool:
        return self._state["return-path"]

    @property
    def pause_before_switchover(self) -> bool:
        return self._state["pause-before-switchover"]

    @property
    def multifd(self) -> bool:
        return self._state["multifd"]

    @property
    def dirty_bitmaps(self) -> bool:
        return self._state["dirty-bitmaps"]

    @property
    def postcopy_blocktime(self) -> bool:
        return self._state["postcopy-blocktime"]

    @property
    def late_block_activate(self) -> bool:
        return self._state["late-block-activate"]

    @property
    def x_ignore_shared(self) -> bool:
        return self._state["x-ignore-shared"]

    @property
    def validate_uuid(self) -> bool:
        return self._state["validate-uuid"]

    @property
    def background_snapshot(self) -> bool:
        return self._state["background-snapshot"]

    @property
    def zero_copy_send(self) -> bool:
        return self._state["zero-copy-send"]

    @property
    def postcopy_preempt(self) -> bool:
        return self._state["postcopy-preempt"]

    @property
    def switchover_ack(self) -> bool:
        return self._state["switchover-ack"]

    @property
    def dirty_limit(self) -> bool:
        return self._state["dirty-limit"]

    @property
    def mapped_ram(self) -> bool:
        return self._state["mapped-ram"]

    def as_dict(self) -> dict[str, bool]:
        """Name -> state, in enum order."""
        return dict(self._state)

    def as_qmp_list(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities`` return value (QEMU prints "state" first)."""
        return [{"state": state, "capability": name} for name, state in self._state.items()]

    def set_from_qmp(
        self,
        items: object,
        *,
        migration_running: bool,
        incoming_started: bool,
        params: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Apply ``migrate-set-capabilities``; all or nothing. Returns warnings.

        ``items`` is the ``capabilities`` argument. Later duplicates win,
        as in QEMU. On any error the set is unchanged.
        """
        updates = _parse_items(items)
        if migration_running:
            raise QapiError(MIGRATION_IN_PROGRESS)
        new = dict(self._state)
        new.update(updates)
        warnings = caps_check(self._state, new, incoming_started=incoming_started,
                              params=params)
        self._state = new
        return warnings

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Capabilities) and self._state == other._state

    def __repr__(self) -> str:
        enabled = [name for name, state in self._state.items() if state]
        return f"Capabilities(enabled={enabled!r})"


def parse_global_capability(prop: str, value: str) -> tuple[str, bool]:
    """Parse ``-global migration.<prop>=<value>`` for a capability property.

    Accepts QEMU's boolean words (on/yes/true, off/no/false, any case).
    Returns ``(capability, state)``; errors carry QEMU's texts.
    """
    prefix = GLOBAL_PREFIX % (prop, value)
    if prop not in GLOBAL_PROPERTY:
        raise QapiError(prefix + PROPERTY_NOT_FOUND % prop)
    try:
        return GLOBAL_PROPERTY[prop], parse_bool(prop, value)
    except QapiError as e:
        raise e.prefixed(prefix) from None
