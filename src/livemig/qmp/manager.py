"""What management software asks a VM before and while it runs it (libvirt 9.0's
capability probe and domain start), answered truthfully.

libvirt adapts to what the emulator says it has, so small honest answers
are enough: the QOM types livemig really has (its machine types, its CPU
models, the ``accel`` device, the objects ``-object`` makes, its chardev
backends), the command-line options it accepts with their parameters, one
vCPU that cannot be hot-plugged, no I/O threads and no block devices. The
texts of the refusals are QEMU 10.0's (``qom/qom-qmp-cmds.c``,
``hw/core/machine-qmp-cmds.c``); note that ``qom-list-properties`` answers
every type it lists (libvirt 9.0 crashes on ``DeviceNotFound`` there).

Also the two power buttons: ``system_reset`` restarts the guest as QEMU's
does (the vCPU back at its entry point, RAM kept, a RESET event);
``system_powerdown`` presses a power button the walk guest, which has no
ACPI, never reads (QEMU's POWERDOWN event, and nothing happens, as under
QEMU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from livemig.qapi import schema
from livemig.qapi.errors import DEVICE_NOT_FOUND
from livemig.qapi.schema import Array
from livemig.qmp.errors import QMPError
from livemig.qmp.registry import CommandRegistry

if TYPE_CHECKING:
    from livemig.cli.run import VmProcess

CPU_PATH = "/machine/unattached/device[0]"


@dataclass(frozen=True)
class QomType:
    """One QOM type livemig has: its parent, whether abstract, its properties
    (name, QOM property type, description or None)."""

    name: str
    parent: str | None
    abstract: bool = False
    props: tuple[tuple[str, str, str | None], ...] = ()


_MACHINE_PROPS = (("type", "string", None),
                  ("usb", "bool", "Set on/off to enable/disable usb"),
                  ("dump-guest-core", "bool", "Include guest memory in a core dump"),
                  ("memory-backend", "string",
                   "Set RAM backendValid value is ID of hostmem based backend"))
_CPU_PROPS = (("type", "string", None),)
_ACCEL_PROPS = (("type", "string", None),
                ("size", "size", "device memory migrated with the device"),
                ("init-size", "size", "initial data sent before the switchover"),
                ("prepare-ms", "uint32", "destination preparation time"),
                ("dirty-rate", "number", "MB/s the device dirties while running"))
_HOSTMEM_PROPS = (("type", "string", None),
                  ("size", "int", "Size of the memory region (ex: 500M)"),
                  ("dump", "bool", "Set to 'off' to exclude from core dump"),
                  ("prealloc", "bool", "Preallocate memory"))
_HOSTMEM_EXTRA = {
    "memory-backend-file": (("mem-path", "string", "Path to memory file"),
                            ("share", "bool", "Mark the memory as private to QEMU or shared")),
    "memory-backend-memfd": (("share", "bool", "Mark the memory as private to QEMU or shared"),)}
_SECRET_PROPS = (("type", "string", None), ("format", "QCryptoSecretFormat", None),
                 ("file", "string", None), ("data", "string", None))


def qom_types(machine_types: tuple[str, ...], cpu_models: tuple[str, ...],
              object_types: tuple[str, ...]) -> dict[str, QomType]:
    """The type tree, parents first (QEMU's names)."""
    out = [QomType("object", None, True, (("type", "string", None),)),
           QomType("machine", "object", True, _MACHINE_PROPS),
           QomType("device", "object", True, (("type", "string", None),)),
           QomType("cpu", "device", True, _CPU_PROPS),
           QomType("x86_64-cpu", "cpu", True, _CPU_PROPS),
           QomType("accel", "device", False, _ACCEL_PROPS),
           QomType("chardev", "object", True, (("type", "string", None),)),
           QomType("chardev-socket", "chardev"), QomType("chardev-file", "chardev"),
           QomType("chardev-null", "chardev"), QomType("container", "object")]
    out += [QomType(f"{name}-machine", "machine", False, _MACHINE_PROPS)
            for name in machine_types]
    out += [QomType(f"{name}-x86_64-cpu", "x86_64-cpu", False, _CPU_PROPS)
            for name in cpu_models]
    backends = [name for name in object_types if name.startswith("memory-backend-")]
    if backends:
        out.append(QomType("memory-backend", "object", True, _HOSTMEM_PROPS))
    out += [QomType(name, "memory-backend", False, _HOSTMEM_PROPS + _HOSTMEM_EXTRA.get(name, ()))
            for name in backends]
    if "secret" in object_types:
        out.append(QomType("secret", "object", False, _SECRET_PROPS))
    from livemig.qom import OBJECT_TYPES
    for name in object_types:      # the other -object types: props from their schema
        if name != "secret" and not name.startswith("memory-backend-"):
            members = OBJECT_TYPES[name].properties.members or ()
            out.append(QomType(name, "object", False, (("type", "string", None), *(
                (m.name, _qom_property_type(m.type), None) for m in members))))
    return {t.name: t for t in out}


def _qom_property_type(qtype: object) -> str:
    """A QAPI member type as QOM names a property's type."""
    if isinstance(qtype, str):
        return {"str": "string"}.get(qtype, qtype)
    return getattr(qtype, "name", None) or "any"


def _props(qtype: QomType) -> list[dict[str, Any]]:
    return [{"name": n, "type": t, **({"description": d} if d else {})}
            for n, t, d in qtype.props]


def _is_a(types: dict[str, QomType], name: str, ancestor: str) -> bool:
    current: str | None = name
    while current is not None:
        if current == ancestor:
            return True
        current = types[current].parent
    return False


# query-command-line-options: the QemuOpts lists of the options livemig takes, with
# the parameters it accepts (QEMU lists keyval options such as -object with none).
_STRING, _BOOL, _NUMBER, _SIZE = "string", "boolean", "number", "size"
COMMAND_LINE_OPTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("machine", (("type", _STRING), ("accel", _STRING), ("usb", _BOOL),
                 ("dump-guest-core", _BOOL), ("memory-backend", _STRING))),
    ("accel", (("accel", _STRING),)),
    ("memory", (("size", _SIZE),)),
    ("smp-opts", tuple((k, _NUMBER) for k in ("cpus", "maxcpus", "sockets", "dies",
                                              "clusters", "modules", "cores", "threads",
                                              "drawers", "books"))),
    ("boot-opts", (("order", _STRING), ("once", _STRING), ("menu", _BOOL),
                   ("splash", _STRING), ("splash-time", _NUMBER),
                   ("reboot-timeout", _NUMBER), ("strict", _BOOL))),
    ("rtc", (("base", _STRING), ("clock", _STRING), ("driftfix", _STRING))),
    ("overcommit", (("mem-lock", _STRING), ("cpu-pm", _BOOL))),
    ("msg", (("timestamp", _BOOL), ("guest-name", _BOOL))),
    ("name", (("guest", _STRING), ("process", _STRING), ("debug-threads", _BOOL))),
    ("chardev", (("backend", _STRING), ("path", _STRING), ("host", _STRING),
                 ("port", _STRING), ("fd", _STRING), ("server", _BOOL), ("wait", _BOOL),
                 ("reconnect-ms", _NUMBER))),
    ("mon", (("chardev", _STRING), ("mode", _STRING), ("pretty", _BOOL))),
    ("global", (("driver", _STRING), ("property", _STRING), ("value", _STRING))),
    ("add-fd", (("fd", _NUMBER), ("set", _NUMBER), ("opaque", _STRING))),
    ("drive", (("file", _STRING), ("format", _STRING))),
    ("device", ()), ("object", ()),
)


def register_manager_commands(reg: CommandRegistry, vm: VmProcess) -> None:
    """Registered after the object types (``qom.OBJECT_TYPES`` lists what -object makes)."""
    from livemig.cli.run_options import CPU_MODELS, MACHINE_TYPES
    from livemig.qom import OBJECT_TYPES
    object_types = tuple(OBJECT_TYPES)
    machine = vm.machine
    types = qom_types(tuple(n for n, _, _ in MACHINE_TYPES),
                      tuple(n for n, _ in CPU_MODELS), object_types)
    machine_type = f"{vm.opts.machine}-machine"
    cpu_type = f"{vm.opts.cpu}-x86_64-cpu"

    def qom_children(path: str) -> list[dict[str, Any]] | None:
        """qom-list: the composition tree livemig has (None: no such path)."""
        typed = [{"name": "type", "type": "string"}]
        if path == "/":
            return [*typed, {"name": "machine", "type": f"child<{machine_type}>"},
                    {"name": "objects", "type": "child<container>"},
                    {"name": "chardevs", "type": "child<container>"}]
        if path == "/machine":
            kids = [{"name": n, "type": "child<container>"}
                    for n in ("unattached", "peripheral", "peripheral-anon")]
            kids += [{"name": p["name"], "type": p["type"]} for p in _props(types[machine_type])
                     if p["name"] != "type"]
            return [*typed, *kids]
        if path == "/machine/unattached":
            cpu = [] if machine.empty else [{"name": "device[0]", "type": f"child<{cpu_type}>"}]
            return [*typed, *cpu]
        if path == "/machine/peripheral":    # devices with an id (all of livemig's)
            return [*typed, *({"name": ident, "type": "child<accel>"}
                              for ident in machine.devices)]
        if path.startswith("/machine/peripheral/") and path[20:] in machine.devices:
            return [*typed, *({"name": n, "type": t} for n, t, _ in types["accel"].props
                              if n != "type")]
        if path in (CPU_PATH, "/machine/peripheral-anon") and not machine.empty:
            return typed
        if path in ("/objects", "/chardevs"):
            return typed
        return None

    def qom_type_of(path: str) -> str:
        if path.startswith("/machine/peripheral/"):
            return "accel"
        return {"/": "container", "/machine": machine_type, CPU_PATH: cpu_type}.get(
            path, "container")

    @reg.register("qom-list-types", args={"*implements": "str", "*abstract": "bool"},
                  returns=Array(schema.OBJECT_TYPE_INFO), allow_preconfig=True)
    def qom_list_types(args: dict) -> list[dict[str, Any]]:
        implements, abstract = args.get("implements"), args.get("abstract", False)
        out = []
        for t in types.values():
            if (t.abstract and not abstract) or (
                    implements is not None and (implements not in types
                                                or not _is_a(types, t.name, implements))):
                continue
            out.append({"name": t.name, **({"abstract": True} if t.abstract else {}),
                        **({"parent": t.parent} if t.parent else {})})
        return out

    @reg.register("qom-list-properties", args={"typename": "str"},
                  returns=Array(schema.OBJECT_PROPERTY_INFO), allow_preconfig=True)
    def qom_list_properties(args: dict) -> list[dict[str, Any]]:
        qtype = types.get(args["typename"])
        if qtype is None:
            raise QMPError(f"Class '{args['typename']}' not found",
                           error_class=DEVICE_NOT_FOUND)
        return _props(qtype)

    @reg.register("device-list-properties", args={"typename": "str"},
                  returns=Array(schema.OBJECT_PROPERTY_INFO), allow_preconfig=True)
    def device_list_properties(args: dict) -> list[dict[str, Any]]:
        name = args["typename"]
        qtype = types.get(name)
        if qtype is None:
            raise QMPError(f"Device '{name}' not found", error_class=DEVICE_NOT_FOUND)
        if qtype.abstract or not _is_a(types, name, "device"):
            raise QMPError("Parameter 'typename' expects a non-abstract device type")
        return _props(qtype)

    @reg.register("qom-list", args={"path": "str"}, returns=Array(schema.OBJECT_PROPERTY_INFO),
                  allow_preconfig=True)
    def qom_list(args: dict) -> list[dict[str, Any]]:
        kids = qom_children(args["path"])
        if kids is None:
            raise QMPError(f"Device '{args['path']}' not found", error_class=DEVICE_NOT_FOUND)
        return kids

    @reg.register("qom-get", args={"path": "str", "property": "str"}, returns="any",
                  allow_preconfig=True)
    def qom_get(args: dict) -> Any:
        path, prop = args["path"], args["property"]
        if qom_children(path) is None:
            raise QMPError(f"Device '{path}' not found", error_class=DEVICE_NOT_FOUND)
        kind = qom_type_of(path)
        if prop == "type":
            return kind
        if path == "/machine":
            if prop == "usb":
                return False
            if prop == "dump-guest-core":
                return vm.opts.dump_guest_core
            if prop == "memory-backend":
                return vm.opts.memory_backend or ""
        raise QMPError(f"Property '{kind}.{prop}' not found")

    @reg.register("query-cpu-definitions", returns=Array(schema.CPU_DEFINITION_INFO),
                  allow_preconfig=True)
    def query_cpu_definitions(args: dict) -> list[dict[str, Any]]:
        # The walk needs no CPUID feature; 'host' needs KVM (as -cpu host does here).
        out = []
        for name, _ in CPU_MODELS:
            missing = ["kvm"] if name == "host" and machine.accel_name != "kvm" else []
            out.append({"name": name, "typename": f"{name}-x86_64-cpu",
                        "unavailable-features": missing, "static": False,
                        "migration-safe": False, "deprecated": False})
        return out

    @reg.register("query-command-line-options", args={"*option": "str"},
                  returns=Array(schema.COMMAND_LINE_OPTION_INFO), allow_preconfig=True)
    def query_command_line_options(args: dict) -> list[dict[str, Any]]:
        wanted = args.get("option")
        out = [{"option": option, "parameters": [{"name": n, "type": t} for n, t in params]}
               for option, params in COMMAND_LINE_OPTIONS if wanted in (None, option)]
        if wanted is not None and not out:
            raise QMPError(f"invalid option name: {wanted}")
        return out

    @reg.register("query-chardev", returns=Array(schema.CHARDEV_INFO), allow_preconfig=True)
    def query_chardev(args: dict) -> list[dict[str, Any]]:
        return [{"label": label, "filename": spec.describe(), "frontend-open": True}
                for label, spec in vm.opts.chardevs.items()]

    @reg.register("query-hotpluggable-cpus", returns=Array(schema.HOTPLUGGABLE_CPU_INFO),
                  allow_preconfig=True)
    def query_hotpluggable_cpus(args: dict) -> list[dict[str, Any]]:
        # The machine's one CPU slot, occupied (QEMU lists every possible slot).
        if machine.empty:
            return []
        return [{"type": cpu_type, "vcpus-count": 1, "qom-path": CPU_PATH,
                 "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}]

    @reg.register("query-iothreads", returns=Array(schema.IOTHREAD_INFO), allow_preconfig=True)
    def query_iothreads(args: dict) -> list[dict[str, Any]]:
        return []        # livemig has no I/O threads

    @reg.register("query-named-block-nodes", args={"*flat": "bool"},
                  returns=Array(schema.BLOCK_DEVICE_INFO))
    def query_named_block_nodes(args: dict) -> list[dict[str, Any]]:
        return []        # no block devices

    @reg.register("query-block", returns=Array(schema.BLOCK_INFO))
    def query_block(args: dict) -> list[dict[str, Any]]:
        return []

    @reg.register("query-blockstats", args={"*query-nodes": "bool"},
                  returns=Array(schema.BLOCK_STATS))
    def query_blockstats(args: dict) -> list[dict[str, Any]]:
        return []        # libvirt's domstats asks; no block devices

    @reg.register("system_reset")
    def system_reset(args: dict) -> None:
        machine.system_reset()
        vm.server.emit_event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    @reg.register("system_powerdown")
    def system_powerdown(args: dict) -> None:
        # The press is an ACPI event; the walk guest has no ACPI and never sees it.
        vm.server.emit_event("POWERDOWN", None)

