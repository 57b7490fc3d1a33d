"""QAPI types as plain data: what the one visitor (``livemig.qapi.visitor``) walks.

A type is a built-in name (``"str"``, ``"uint8"``, ``"size"``...) or one of
the frozen dataclasses below, mirroring QAPI's meta-types (enum, array,
object, alternate). Command argument schemas, ``MigrateSetParameters`` and
``MigrationCapability`` are all values of these types, so they can be walked
(validated, listed, or turned into ``query-qmp-schema`` later) without code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

# QAPI built-in types. ``int`` is ``int64``; ``size`` is ``uint64`` on QMP.
SIGNED_RANGES: Final[dict[str, tuple[int, int, str]]] = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
}
UNSIGNED_RANGES: Final[dict[str, tuple[int, str]]] = {
    "uint8": ((1 << 8) - 1, "uint8_t"),
    "uint16": ((1 << 16) - 1, "uint16_t"),
    "uint32": ((1 << 32) - 1, "uint32_t"),
}
BUILTINS: Final = frozenset(
    {"str", "int", "int64", "uint64", "size", "bool", "number", "any", "null"}
    | set(SIGNED_RANGES) | set(UNSIGNED_RANGES)
)


@dataclass(frozen=True)
class Enum:
    """A QAPI enum: a string out of ``members``."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Array:
    """A QAPI list; ``element`` is every element's type (``"any"``: unchecked)."""

    element: QapiType


@dataclass(frozen=True)
class Member:
    """One member of an object; ``optional`` is QAPI's ``'*name'``."""

    name: str
    type: QapiType
    optional: bool = False


@dataclass(frozen=True)
class Object:
    """A QAPI struct (or a command's arguments: ``name`` None).

    ``members`` None means any JSON object, unchecked.
    """

    name: str | None
    members: tuple[Member, ...] | None = ()

    def member(self, name: str) -> Member | None:
        for m in self.members or ():
            if m.name == name:
                return m
        return None

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members or ())


@dataclass(frozen=True)
class Alternate:
    """A QAPI alternate: one of ``choices``, told apart by JSON type (``StrOrNull``)."""

    name: str
    choices: tuple[QapiType, ...]


@dataclass(frozen=True)
class Union:
    """A QAPI flat union: the ``base`` members, then the members of the variant
    that the ``discriminator`` member (an enum of ``base``) names, in the same
    JSON object (a variant may be a union itself: ``MigrationAddress``'s
    ``socket`` is ``SocketAddress``); a value with no variant listed has the
    base members only. Unexpected keys are checked against all of them, as
    QEMU's visitor does."""

    name: str
    base: Object
    discriminator: str
    variants: tuple[tuple[str, Object | Union], ...]

    def variant(self, tag: str) -> Object | Union | None:
        for name, obj in self.variants:
            if name == tag:
                return obj
        return None


QapiType = str | Enum | Array | Object | Alternate | Union


def members(spec: Mapping[str, QapiType]) -> tuple[Member, ...]:
    """Members from a QAPI-style map: ``{"uri": "str", "*detach": "bool"}``."""
    out: list[Member] = []
    for key, qtype in spec.items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if not name:
            raise ValueError("empty member name")
        if any(m.name == name for m in out):
            raise ValueError(f"member {name!r} declared twice")
        check_type(qtype)
        out.append(Member(name, qtype, optional))
    return tuple(out)


def struct(name: str | None, spec: Mapping[str, QapiType]) -> Object:
    """An :class:`Object` from a QAPI-style member map."""
    return Object(name, members(spec))


def check_type(qtype: object) -> None:
    """Refuse a malformed schema early (at registration, not at the first call)."""
    if isinstance(qtype, str):
        if qtype not in BUILTINS:
            raise ValueError(f"unknown QAPI type {qtype!r}")
    elif not isinstance(qtype, (Enum, Array, Object, Alternate, Union)):
        raise TypeError(f"not a QAPI type: {qtype!r}")


STR_OR_NULL: Final = Alternate("StrOrNull", ("str", "null"))


# -- MigrationChannel (qapi/migration.json, qapi/sockets.json; QEMU 10.0) -----------
INET_SOCKET_ADDRESS: Final = struct("InetSocketAddress", {
    "host": "str", "port": "str", "*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
    "*ipv6": "bool", "*keep-alive": "bool", "*keep-alive-count": "uint32",
    "*keep-alive-idle": "uint32", "*keep-alive-interval": "uint32", "*mptcp": "bool"})
UNIX_SOCKET_ADDRESS: Final = struct("UnixSocketAddress", {
    "path": "str", "*abstract": "bool", "*tight": "bool"})
VSOCK_SOCKET_ADDRESS: Final = struct("VsockSocketAddress", {"cid": "str", "port": "str"})
STRING: Final = struct("String", {"str": "str"})
SOCKET_ADDRESS_TYPE: Final = Enum("SocketAddressType", ("inet", "unix", "vsock", "fd"))
SOCKET_ADDRESS: Final = Union(
    "SocketAddress", struct(None, {"type": SOCKET_ADDRESS_TYPE}), "type",
    (("inet", INET_SOCKET_ADDRESS), ("unix", UNIX_SOCKET_ADDRESS),
     ("vsock", VSOCK_SOCKET_ADDRESS), ("fd", STRING)))
MIGRATION_ADDRESS_TYPE: Final = Enum("MigrationAddressType",
                                     ("socket", "exec", "rdma", "file"))
MIGRATION_EXEC_COMMAND: Final = struct("MigrationExecCommand", {"args": Array("str")})
FILE_MIGRATION_ARGS: Final = struct("FileMigrationArgs", {"filename": "str",
                                                          "offset": "uint64"})
MIGRATION_ADDRESS: Final = Union(
    "MigrationAddress", struct(None, {"transport": MIGRATION_ADDRESS_TYPE}), "transport",
    (("socket", SOCKET_ADDRESS), ("exec", MIGRATION_EXEC_COMMAND),
     ("rdma", INET_SOCKET_ADDRESS), ("file", FILE_MIGRATION_ARGS)))
MIGRATION_CHANNEL_TYPE: Final = Enum("MigrationChannelType", ("main", "cpr"))
MIGRATION_CHANNEL: Final = struct("MigrationChannel", {
    "channel-type": MIGRATION_CHANNEL_TYPE, "addr": MIGRATION_ADDRESS})
MIGRATION_CHANNEL_LIST: Final = Array(MIGRATION_CHANNEL)


# -- return types of livemig's commands (QEMU 10.0's names; the members livemig returns) --
# Each is the shape the handler really returns; tests/unit/test_qmp_schema.py calls
# every command and checks the answer against query-qmp-schema's ret-type.
VERSION_TRIPLE: Final = struct("VersionTriple", {"major": "int", "minor": "int",
                                                 "micro": "int"})
VERSION_INFO: Final = struct("VersionInfo", {"qemu": VERSION_TRIPLE, "package": "str"})
COMMAND_INFO: Final = struct("CommandInfo", {"name": "str"})
NAME_INFO: Final = struct("NameInfo", {"*name": "str"})
RUN_STATE: Final = Enum("RunState", (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
    "suspended", "watchdog", "guest-panicked", "colo"))
STATUS_INFO: Final = struct("StatusInfo", {"running": "bool", "status": RUN_STATE})
KVM_INFO: Final = struct("KvmInfo", {"enabled": "bool", "present": "bool"})
UUID_INFO: Final = struct("UuidInfo", {"UUID": "str"})
SYS_EMU_TARGET: Final = Enum("SysEmuTarget", ("x86_64",))  # the one target livemig has
# -- what management software (libvirt) asks of the machine (qapi/qom.json,
# qapi/machine*.json, qapi/misc.json, qapi/char.json, qapi/block-core.json) --
OBJECT_TYPE_INFO: Final = struct("ObjectTypeInfo", {"name": "str", "*abstract": "bool",
                                                    "*parent": "str"})
OBJECT_PROPERTY_INFO: Final = struct("ObjectPropertyInfo", {
    "name": "str", "type": "str", "*description": "str", "*default-value": "any"})
CPU_DEFINITION_INFO: Final = struct("CpuDefinitionInfo", {
    "name": "str", "*migration-safe": "bool", "static": "bool",
    "*unavailable-features": Array("str"), "typename": "str", "*alias-of": "str",
    "deprecated": "bool"})
COMMAND_LINE_PARAMETER_INFO: Final = struct("CommandLineParameterInfo", {
    "name": "str",
    "type": Enum("CommandLineParameterType", ("string", "boolean", "number", "size")),
    "*help": "str", "*default": "str"})
COMMAND_LINE_OPTION_INFO: Final = struct("CommandLineOptionInfo", {
    "option": "str", "parameters": Array(COMMAND_LINE_PARAMETER_INFO)})
CHARDEV_INFO: Final = struct("ChardevInfo", {"label": "str", "filename": "str",
                                             "frontend-open": "bool"})

TARGET_INFO: Final = struct("TargetInfo", {"arch": SYS_EMU_TARGET})
MACHINE_INFO: Final = struct("MachineInfo", {
    "name": "str", "*alias": "str", "*is-default": "bool", "cpu-max": "int",
    "hotpluggable-cpus": "bool", "numa-mem-supported": "bool", "deprecated": "bool",
    "*default-cpu-type": "str", "*default-ram-id": "str", "acpi": "bool"})
CPU_INSTANCE_PROPERTIES: Final = struct("CpuInstanceProperties", {
    "*node-id": "int", "*drawer-id": "int", "*book-id": "int", "*socket-id": "int",
    "*die-id": "int", "*cluster-id": "int", "*module-id": "int", "*core-id": "int",
    "*thread-id": "int"})
HOTPLUGGABLE_CPU_INFO: Final = struct("HotpluggableCPU", {
    "type": "str", "vcpus-count": "int", "props": CPU_INSTANCE_PROPERTIES,
    "*qom-path": "str"})
IOTHREAD_INFO: Final = struct("IOThreadInfo", {
    "id": "str", "thread-id": "int", "poll-max-ns": "int", "poll-grow": "int",
    "poll-shrink": "int", "aio-max-batch": "int"})
# livemig has no block devices: these lists are always empty; their element types
# carry QEMU's required members only.
BLOCK_DEVICE_INFO: Final = struct("BlockDeviceInfo", {
    "file": "str", "*node-name": "str", "ro": "bool", "drv": "str", "encrypted": "bool"})
BLOCK_INFO: Final = struct("BlockInfo", {
    "device": "str", "*qdev": "str", "type": "str", "removable": "bool", "locked": "bool"})
BLOCK_STATS: Final = struct("BlockStats", {"*device": "str", "*qdev": "str",
                                           "*node-name": "str", "stats": "any"})
CPU_INFO_FAST: Final = struct("CpuInfoFast", {
    "cpu-index": "int", "qom-path": "str", "thread-id": "int",
    "*props": CPU_INSTANCE_PROPERTIES, "target": SYS_EMU_TARGET})
MIGRATION_THREAD_INFO: Final = struct("MigrationThreadInfo", {"name": "str",
                                                              "thread-id": "int"})
ADDFD_INFO: Final = struct("AddfdInfo", {"fdset-id": "int", "fd": "int"})
FDSET_FD_INFO: Final = struct("FdsetFdInfo", {"fd": "int", "*opaque": "str"})
FDSET_INFO: Final = struct("FdsetInfo", {"fdset-id": "int", "fds": Array(FDSET_FD_INFO)})
MIGRATION_STATUS: Final = Enum("MigrationStatus", (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
    "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed",
    "failed", "colo", "pre-switchover", "device", "wait-unplug"))
MIGRATION_STATS: Final = struct("MigrationStats", {
    "transferred": "int", "remaining": "int", "total": "int", "duplicate": "int",
    "normal": "int", "normal-bytes": "int", "dirty-pages-rate": "int", "mbps": "number",
    "dirty-sync-count": "int", "postcopy-requests": "int", "page-size": "int",
    "multifd-bytes": "uint64", "pages-per-second": "uint64", "precopy-bytes": "uint64",
    "downtime-bytes": "uint64", "postcopy-bytes": "uint64",
    "dirty-sync-missed-zero-copy": "uint64"})
# livemig's own members (x-): the switchover-ack view of either side; QAPI has no
# map type, so name -> milliseconds maps are 'any', and so are the engine's evolving
# diagnostics (x-windows entries, x-downtime-estimate, x-convergence).
X_SWITCHOVER_ACK_INFO: Final = struct("XSwitchoverAckInfo", {
    "*users": "int", "*acked": "bool", "*ack-time": "int", "*waiting": "bool",
    "*pending": "int", "*approved": "any"})
MIGRATION_INFO: Final = struct("MigrationInfo", {
    "*status": MIGRATION_STATUS, "*ram": MIGRATION_STATS, "*total-time": "int",
    "*expected-downtime": "int", "*downtime": "int", "*setup-time": "int",
    "*error-desc": "str", "*socket-address": Array(SOCKET_ADDRESS),
    "*cpu-throttle-percentage": "int",
    "*x-switchover-ack": X_SWITCHOVER_ACK_INFO, "*x-windows": Array("any"),
    "*x-downtime-estimate": "any", "*x-convergence": "any",
    "*x-downtime-checkpoints": "any", "*x-load-checkpoints": "any",
    "*x-load-costs": "any", "*postcopy-blocktime": "uint32",
    "*postcopy-vcpu-blocktime": Array("uint32"), "*x-postcopy": "any"})
X_ACCEL_DIGEST_INFO: Final = struct("XAccelDigestInfo", {"sha256": "str"})

# SchemaInfo (qapi/introspect.json): query-qmp-schema's own return type.
SCHEMA_META_TYPE: Final = Enum("SchemaMetaType", (
    "builtin", "enum", "array", "object", "alternate", "command", "event"))
JSON_TYPE: Final = Enum("JSONType", ("string", "number", "int", "boolean", "null",
                                     "object", "array", "value"))
_FEATURES: Final = Array("str")
SCHEMA_INFO_ENUM_MEMBER: Final = struct("SchemaInfoEnumMember",
                                        {"name": "str", "*features": _FEATURES})
SCHEMA_INFO_OBJECT_MEMBER: Final = struct("SchemaInfoObjectMember", {
    "name": "str", "type": "str", "*default": "any", "*features": _FEATURES})
SCHEMA_INFO_OBJECT_VARIANT: Final = struct("SchemaInfoObjectVariant",
                                           {"case": "str", "type": "str"})
SCHEMA_INFO: Final = Union(
    "SchemaInfo", struct(None, {"name": "str", "meta-type": SCHEMA_META_TYPE,
                                "*features": _FEATURES}), "meta-type",
    (("builtin", struct("SchemaInfoBuiltin", {"json-type": JSON_TYPE})),
     ("enum", struct("SchemaInfoEnum", {"members": Array(SCHEMA_INFO_ENUM_MEMBER),
                                        "values": Array("str")})),
     ("array", struct("SchemaInfoArray", {"element-type": "str"})),
     ("object", struct("SchemaInfoObject", {
         "members": Array(SCHEMA_INFO_OBJECT_MEMBER), "*tag": "str",
         "*variants": Array(SCHEMA_INFO_OBJECT_VARIANT)})),
     ("alternate", struct("SchemaInfoAlternate", {
         "members": Array(struct("SchemaInfoAlternateMember", {"type": "str"}))})),
     ("command", struct("SchemaInfoCommand", {"arg-type": "str", "ret-type": "str",
                                              "*allow-oob": "bool"})),
     ("event", struct("SchemaInfoEvent", {"arg-type": "str"}))))

# -- events livemig emits, with their data (qapi/run-state.json, qapi/migration.json) --
SHUTDOWN_CAUSE: Final = Enum("ShutdownCause", (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
    "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
    "snapshot-load"))
EVENTS: Final[dict[str, Object]] = {
    "SHUTDOWN": struct(None, {"guest": "bool", "reason": SHUTDOWN_CAUSE}),
    "STOP": struct(None, {}),
    "RESUME": struct(None, {}),
    "MIGRATION": struct(None, {"status": MIGRATION_STATUS}),
    "MIGRATION_PASS": struct(None, {"pass": "int"}),
    "RESET": struct(None, {"guest": "bool", "reason": SHUTDOWN_CAUSE}),
    "POWERDOWN": struct(None, {}),
}
