"""Migration parameters: QEMU 10.0's ``MigrationParameters`` and ``migrate_params_check``.

Members, defaults and texts are QEMU's (``qapi/migration.json``,
``migration/options.c``), as ``query-migrate-parameters`` shows them on
10.0.2. ``migrate-set-parameters`` is atomic: the given members are applied
to a copy, the whole copy is checked, and only then committed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Final

from livemig.qapi.errors import (
    BBM_NOT_SUPPORTED,
    GLOBAL_PREFIX,
    INVALID_ENUM_VALUE,
    INVALID_PARAMETER_VALUE,
    MAPPED_RAM_NEEDS_PLAIN_MULTIFD,
    PROPERTY_NOT_FOUND,
    ZERO_COPY_NEEDS_PLAIN_MULTIFD,
    QapiError,
)
from livemig.qapi.schema import STR_OR_NULL, UNSIGNED_RANGES, Array, Enum, QapiType, struct
from livemig.qapi.string_input import parse_bool, parse_size, parse_uint64
from livemig.qapi.visitor import visit_members

# x86 TARGET_PAGE_SIZE: the lower bound of xbzrle-cache-size (bytes).
TARGET_PAGE_SIZE: Final = 4096
MAX_MIGRATE_DOWNTIME_MS: Final = 2000 * 1000

# QAPI enums as built in Debian's 10.0.2 (qatzip/qpl/uadk are build options
# that build lacks; a QAPI enum member absent from the build does not exist).
ENUMS: Final[dict[str, tuple[str, ...]]] = {
    "MultiFDCompression": ("none", "zlib", "zstd"),
    "MigMode": ("normal", "cpr-reboot", "cpr-transfer"),
    "ZeroPageDetection": ("none", "legacy", "multifd"),
}
ENUM_TYPES: Final[dict[str, Enum]] = {name: Enum(name, values) for name, values in ENUMS.items()}

# BitmapMigrationNodeAlias and its members (qapi/migration.json).
BITMAP_MIGRATION_BITMAP_ALIAS: Final = struct("BitmapMigrationBitmapAlias", {
    "name": "str", "alias": "str",
    "*transform": struct("BitmapMigrationBitmapAliasTransform", {"*persistent": "bool"}),
})
BITMAP_MIGRATION_NODE_ALIAS: Final = struct("BitmapMigrationNodeAlias", {
    "node-name": "str", "alias": "str", "bitmaps": Array(BITMAP_MIGRATION_BITMAP_ALIAS),
})

# MigrationParameters members in qapi/migration.json order -> QAPI type.
# On input (MigrateSetParameters) the tls-* members are StrOrNull.
SCHEMA: Final[dict[str, str]] = {
    "announce-initial": "size",
    "announce-max": "size",
    "announce-rounds": "size",
    "announce-step": "size",
    "throttle-trigger-threshold": "uint8",
    "cpu-throttle-initial": "uint8",
    "cpu-throttle-increment": "uint8",
    "cpu-throttle-tailslow": "bool",
    "tls-creds": "StrOrNull",
    "tls-hostname": "StrOrNull",
    "tls-authz": "StrOrNull",
    "max-bandwidth": "size",
    "avail-switchover-bandwidth": "size",
    "downtime-limit": "uint64",
    "x-checkpoint-delay": "uint32",
    "multifd-channels": "uint8",
    "xbzrle-cache-size": "size",
    "max-postcopy-bandwidth": "size",
    "max-cpu-throttle": "uint8",
    "multifd-compression": "MultiFDCompression",
    "multifd-zlib-level": "uint8",
    "multifd-qatzip-level": "uint8",
    "multifd-zstd-level": "uint8",
    "block-bitmap-mapping": "BitmapMigrationNodeAliasList",
    "x-vcpu-dirty-limit-period": "uint64",
    "vcpu-dirty-limit": "uint64",
    "mode": "MigMode",
    "zero-page-detection": "ZeroPageDetection",
    "direct-io": "bool",
    # livemig's own, after QEMU's (an x- member, as QEMU names experimental ones):
    "x-stall-timeout": "uint64",
}
LIVEMIG_PARAMETERS: Final = ("x-stall-timeout",)


def _qapi_type(qtype: str, *, output: bool = False) -> QapiType:
    if qtype == "StrOrNull":
        return "str" if output else STR_OR_NULL
    if qtype == "BitmapMigrationNodeAliasList":
        return Array(BITMAP_MIGRATION_NODE_ALIAS)
    return ENUM_TYPES.get(qtype, qtype)


# The same members as schema data: migrate-set-parameters' arguments (every
# member optional) and query-migrate-parameters' return type.
MIGRATE_SET_PARAMETERS: Final = struct(
    "MigrateSetParameters", {f"*{name}": _qapi_type(qtype) for name, qtype in SCHEMA.items()})
MIGRATION_PARAMETERS: Final = struct(
    "MigrationParameters",
    {f"*{name}": _qapi_type(qtype, output=True) for name, qtype in SCHEMA.items()})

# query-migrate-parameters on a fresh QEMU 10.0 (block-bitmap-mapping is
# absent until set). Units: bandwidths bytes/s, times ms, vcpu-dirty-limit MB/s.
DEFAULTS: Final[dict[str, Any]] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 128 << 20,
    "avail-switchover-bandwidth": 0,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "multifd-channels": 2,
    "xbzrle-cache-size": 64 << 20,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1,
    "multifd-zstd-level": 1,
    "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1,
    "mode": "normal",
    "zero-page-detection": "multifd",
    "direct-io": False,
    "x-stall-timeout": 0,     # ms a stalled migration may go on before it fails; 0: forever
}
# What QEMU 10.0.2 itself shows: the same, less livemig's own members.
QEMU_DEFAULTS: Final[dict[str, Any]] = {k: v for k, v in DEFAULTS.items()
                                        if k not in LIVEMIG_PARAMETERS}

# ``-global migration.<prop>=<value>`` property -> parameter (migration_properties[]).
GLOBAL_PROPERTY: Final[dict[str, str]] = {
    "x-throttle-trigger-threshold": "throttle-trigger-threshold",
    "x-cpu-throttle-initial": "cpu-throttle-initial",
    "x-cpu-throttle-increment": "cpu-throttle-increment",
    "x-cpu-throttle-tailslow": "cpu-throttle-tailslow",
    "x-max-bandwidth": "max-bandwidth",
    "avail-switchover-bandwidth": "avail-switchover-bandwidth",
    "x-downtime-limit": "downtime-limit",
    "x-checkpoint-delay": "x-checkpoint-delay",
    "multifd-channels": "multifd-channels",
    "multifd-compression": "multifd-compression",
    "multifd-zlib-level": "multifd-zlib-level",
    "multifd-qatzip-level": "multifd-qatzip-level",
    "multifd-zstd-level": "multifd-zstd-level",
    "xbzrle-cache-size": "xbzrle-cache-size",
    "max-postcopy-bandwidth": "max-postcopy-bandwidth",
    "max-cpu-throttle": "max-cpu-throttle",
    "announce-initial": "announce-initial",
    "announce-max": "announce-max",
    "announce-rounds": "announce-rounds",
    "announce-step": "announce-step",
    "tls-creds": "tls-creds",
    "tls-hostname": "tls-hostname",
    "tls-authz": "tls-authz",
    "x-vcpu-dirty-limit-period": "x-vcpu-dirty-limit-period",
    "vcpu-dirty-limit": "vcpu-dirty-limit",
    "mode": "mode",
    "zero-page-detection": "zero-page-detection",
}
# livemig also accepts the parameter's own name where QEMU's property has an
# "x-" prefix (downtime-limit, max-bandwidth, ...). Not QEMU behaviour.
_GLOBAL_ALIAS: Final = {param: param for param in GLOBAL_PROPERTY.values()}



def _expects(c_name: str, what: str) -> QapiError:
    return QapiError(INVALID_PARAMETER_VALUE % (c_name, what))


def visit_set_parameters(args: Mapping[str, Any]) -> dict[str, Any]:
    """``migrate-set-parameters`` arguments, visited and converted like QEMU stores them.

    Members in schema order, then unknown keys (the visitor); then what
    ``qmp_migrate_set_parameters`` does before the check: a null tls-* is
    ``""``. A non-empty block-bitmap-mapping is refused (not implemented).
    """
    given = visit_members(MIGRATE_SET_PARAMETERS, args)
    for name in ("tls-creds", "tls-hostname", "tls-authz"):
        if name in given and given[name] is None:
            given[name] = ""
    if given.get("block-bitmap-mapping"):
        raise QapiError(BBM_NOT_SUPPORTED)
    return given


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# migrate_params_check range rules in QEMU's order: (broken?, C name, what it expects).
_Rule = tuple[Callable[[Mapping[str, Any]], bool], str, str]
_RULES: Final[tuple[_Rule, ...]] = (
    (lambda p: not 1 <= p["throttle-trigger-threshold"] <= 100,
     "throttle_trigger_threshold", "an integer in the range of 1 to 100"),
    (lambda p: not 1 <= p["cpu-throttle-initial"] <= 99,
     "cpu_throttle_initial", "an integer in the range of 1 to 99"),
    (lambda p: not 1 <= p["cpu-throttle-increment"] <= 99,
     "cpu_throttle_increment", "an integer in the range of 1 to 99"),
    # max_bandwidth / avail_switchover_bandwidth <= SIZE_MAX: never false on 64-bit.
    (lambda p: p["downtime-limit"] > MAX_MIGRATE_DOWNTIME_MS,
     "downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms"),
    (lambda p: p["multifd-channels"] < 1, "multifd_channels", "a value between 1 and 255"),
    (lambda p: p["multifd-zlib-level"] > 9, "multifd_zlib_level", "a value between 0 and 9"),
    (lambda p: not 1 <= p["multifd-qatzip-level"] <= 9,
     "multifd_qatzip_level", "a value between 1 and 9"),
    (lambda p: p["multifd-zstd-level"] > 20, "multifd_zstd_level", "a value between 0 and 20"),
    (lambda p: p["xbzrle-cache-size"] < TARGET_PAGE_SIZE or not _is_pow2(p["xbzrle-cache-size"]),
     "xbzrle_cache_size", "a power of two no less than the target page size"),
    (lambda p: not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99,
     "max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99"),
    (lambda p: p["announce-initial"] > 100000, "announce_initial", "a value between 0 and 100000"),
    (lambda p: p["announce-max"] > 100000, "announce_max", "a value between 0 and 100000"),
    (lambda p: p["announce-rounds"] > 1000, "announce_rounds", "a value between 0 and 1000"),
    # QEMU's text says 0 though 0 is refused.
    (lambda p: not 1 <= p["announce-step"] <= 10000,
     "announce_step", "a value between 0 and 10000"),
)


def params_check(
    new: Mapping[str, Any],
    *,
    caps: Mapping[str, bool] | None = None,
    current: Mapping[str, Any] | None = None,
) -> None:
    """Validate a complete parameter set like QEMU 10.0's ``migrate_params_check``.

    ``caps``: the current capabilities (zero-copy-send, mapped-ram).
    ``current``: the parameters in force before this change; QEMU's mapped-ram
    rule looks at those, not at ``new`` (defaults to ``new``).
    Raises :class:`QapiError` with QEMU's text for the first rule broken.
    """
    caps = caps or {}
    current = new if current is None else current
    for broken, c_name, what in _RULES:
        if broken(new):
            raise _expects(c_name, what)
    # block-bitmap-mapping: only [] is accepted (see visit_set_parameters).
    if caps.get("zero-copy-send") and (new["multifd-compression"] != "none" or new["tls-creds"]):
        raise QapiError(ZERO_COPY_NEEDS_PLAIN_MULTIFD)
    if caps.get("mapped-ram") and (current["multifd-compression"] != "none"
                                   or current["tls-creds"]):
        raise QapiError(MAPPED_RAM_NEEDS_PLAIN_MULTIFD)
    if not 1 <= new["x-vcpu-dirty-limit-period"] <= 1000:
        raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if new["vcpu-dirty-limit"] < 1:
        raise QapiError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")
    # direct-io: Linux builds support O_DIRECT, so "No build-time support" never fires.


class Parameters:
    """The migration object's parameters (QEMU 10.0 defaults at start)."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        """``values``: overrides of :data:`DEFAULTS`, unchecked (see ``apply_globals``)."""
        self._values: dict[str, Any] = dict(DEFAULTS)
        for name, value in (values or {}).items():
            if name not in SCHEMA:
                raise KeyError(name)
            self._values[name] = copy.deepcopy(value)

    def get(self, name: str) -> Any:
        """Current value of one member; ``KeyError`` if unknown (or unset mapping)."""
        return copy.deepcopy(self._values[name])

    def as_qmp(self) -> dict[str, Any]:
        """``query-migrate-parameters`` return value, in member order."""
        return {name: copy.deepcopy(self._values[name]) for name in SCHEMA
                if name in self._values}

    def set_from_qmp(self, args: Mapping[str, Any], *,
                     caps: Mapping[str, bool] | None = None) -> None:
        """Apply ``migrate-set-parameters`` arguments; all or nothing.

        Members are visited in schema order (the first bad one is reported),
        then unknown keys, then the whole new set is checked. ``caps``: the
        current capabilities, for QEMU's zero-copy and mapped-ram rules.
        There is no "migration in progress" check, as in QEMU.
        """
        given = visit_set_parameters(args)
        new = {**self._values, **given}
        params_check(new, caps=caps, current=self._values)
        self._values = new

    @property
    def downtime_limit_ms(self) -> int:
        """Maximum tolerated downtime (ms)."""
        return int(self._values["downtime-limit"])

    @property
    def stall_timeout_s(self) -> float:
        """``x-stall-timeout`` (livemig): seconds a stalled migration goes on; 0 = forever."""
        return int(self._values["x-stall-timeout"]) / 1000

    @property
    def max_bandwidth_bytes_per_s(self) -> int:
        """Precopy rate limit (bytes/s)."""
        return int(self._values["max-bandwidth"])

    @property
    def avail_switchover_bandwidth_bytes_per_s(self) -> int:
        """Bandwidth to assume at switchover (bytes/s); 0 means use the estimate."""
        return int(self._values["avail-switchover-bandwidth"])

    @property
    def multifd_channels(self) -> int:
        """Number of multifd channels (when the multifd capability is on)."""
        return int(self._values["multifd-channels"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parameters) and self.as_qmp() == other.as_qmp()

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.as_qmp().items() if DEFAULTS.get(k) != v}
        return f"Parameters({changed!r})"


def parse_global_parameter(prop: str, value: str) -> tuple[str, Any]:
    """Parse ``-global migration.<prop>=<value>`` for a parameter property.

    ``prop`` is QEMU's property name (``x-downtime-limit``, ``multifd-channels``)
    or, as a livemig extension, the parameter name (``downtime-limit``).
    Sizes take QEMU's units (k, M, G, T, P, E: powers of 1024).
    Returns ``(parameter, value)`` typed as QMP would carry it; errors carry
    QEMU's texts. Ranges are checked later, by :func:`params_check`.
    """
    prefix = GLOBAL_PREFIX % (prop, value)
    param = GLOBAL_PROPERTY.get(prop) or _GLOBAL_ALIAS.get(prop)
    try:
        if param is None:
            raise QapiError(PROPERTY_NOT_FOUND % prop)
        qtype = SCHEMA[param]
        if qtype == "size":
            return param, parse_size(prop, value)
        if qtype in ("uint8", "uint32", "uint64"):
            number = parse_uint64(prop, value)
            if qtype in UNSIGNED_RANGES and number > UNSIGNED_RANGES[qtype][0]:
                raise _expects(prop, UNSIGNED_RANGES[qtype][1])
            return param, number
        if qtype == "bool":
            return param, parse_bool(prop, value)
        if qtype in ENUMS and value not in ENUMS[qtype]:
            raise QapiError(INVALID_ENUM_VALUE % (prop, value))
        return param, value  # enum member or tls-* string
    except QapiError as e:
        raise e.prefixed(prefix) from None
