"""``livemig run`` options, in QEMU's spelling (``-m``, ``-qmp``, ``-incoming``...).

Each option is accepted as ``-opt`` and ``--opt`` (and ``--opt=value``), so a
QEMU command line for this subset works unchanged. Parsing is pure: it
returns a :class:`RunOptions` or raises :class:`OptionError` with the one
line the process prints before exiting non-zero.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from livemig import QEMU_VERSION, __version__
from livemig.machine.accel_device import AccelDeviceConfig
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.microvm import MicrovmOptions
from livemig.qapi.errors import (
    INVALID_ENUM_VALUE,
    INVALID_PARAMETER,
    INVALID_PARAMETER_TYPE,
    INVALID_PARAMETER_VALUE,
    JSON_PARSE_ERROR,
    MISSING_PARAMETER,
    QapiError,
)
from livemig.qapi.opts import Opts, parse_opts
from livemig.qapi.string_input import UINT64_MAX, parse_option_size
from livemig.qmp.chardev import (
    ChardevError,
    ChardevSpec,
    parse_chardev,
    parse_compat,
    parse_qmp_spec,
)
from livemig.qmp.qjson import JSONMessageParser
from livemig.qom.object import DUPLICATE_ID, id_wellformed, visit_object_options


class OptionError(Exception):
    pass


@dataclass
class RunOptions:
    ram_size: int = 128 * MIB
    ram_size_given: bool = False        # -m given (else a memory backend's size wins)
    accel: str = "auto"
    qmp: list[str] = field(default_factory=list)
    incoming: str | None = None
    start_paused: bool = False
    name: str | None = None
    uuid: str | None = None
    globals: list[tuple[str, str, str]] = field(default_factory=list)  # (driver, prop, value)
    guest: GuestConfig = field(default_factory=GuestConfig)
    devices: list[AccelDeviceConfig] = field(default_factory=list)
    serial: str | None = None           # -serial file:PATH (or a file chardev): its path
    serial_chardev: str | None = None   # -serial on a socket chardev: that chardev's id
    mem_prealloc: bool = False          # -mem-prealloc: fault all guest RAM in at start
    chardevs: dict[str, ChardevSpec] = field(default_factory=dict)  # by id, in order
    monitors: list[str] = field(default_factory=list)   # QMP monitors: chardev ids, in order
    help: str | None = None             # -M help, -accel help, -cpu help, -version: print, exit 0
    machine: str = "livemig-pc-10.0"
    cpu: str = "max"
    no_shutdown: bool = False
    add_fds: list[tuple[int, int, str | None]] = field(default_factory=list)  # -add-fd
    pidfile: str | None = None          # -pidfile: written (and locked) at start
    daemonize: bool = False             # -daemonize: fork once the monitors listen
    mem_lock: str = "off"               # -overcommit mem-lock=on|off|on-fault
    msg_timestamp: bool = False         # -msg timestamp=on: messages start with the time
    dump_guest_core: bool = True        # -machine dump-guest-core=off: RAM left out of cores
    memory_backend: str | None = None   # -machine memory-backend=ID: the guest RAM's object
    microvm: MicrovmOptions = field(default_factory=MicrovmOptions)   # -M microvm,...
    bios: str | None = None             # -bios FILE (microvm's pc.bios)
    _microvm_props: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    warnings: list[str] = field(default_factory=list)   # printed as "livemig: warning: ..."
    objects: list[dict[str, Any]] = field(default_factory=list)   # -object, checked ObjectOptions
    _serials: list[str] = field(default_factory=list, repr=False, compare=False)
    _mon_refs: list[tuple[str, str]] = field(default_factory=list, repr=False, compare=False)


# livemig's machine types, as -M help lists them: (name, description, alias).
MACHINE_TYPES = (("livemig-pc-10.0", "livemig PC (one vCPU, walk guest, accel devices)",
                  "livemig-pc"),
                 ("microvm", "microvm (i386)", None),
                 ("none", "empty machine", None))
DEFAULT_MACHINE = "livemig-pc-10.0"
# -cpu models: the vCPU runs the walk guest, which needs no CPUID feature.
CPU_MODELS = (("host", "KVM processor with all supported host features"),
              ("max", "Enables all features supported by the accelerator in the current host"))
ACCELERATORS = ("tcg", "kvm", "soft")    # tcg is livemig's soft accelerator
# QEMU 10.0.2's -vga types (vl.c's vga_interfaces): accepted with QEMU's warning for a
# machine without VGA (livemig's has none); anything else is QEMU's "unknown vga type".
_VGA_TYPES = ("std", "cirrus", "vmware", "qxl", "xenfb", "tcx", "cg3", "virtio")
_DISPLAY_TYPES = ("sdl", "gtk", "curses", "vnc", "egl-headless", "dbus", "spice-app")
_SMP_KEYS = ("cpus", "maxcpus", "sockets", "dies", "clusters", "modules", "cores",
             "threads", "drawers", "books")
_MON_MODES = ("readline", "control")
_HMP = "livemig has no human monitor (HMP); use QMP (mode=control)"
# -machine properties livemig's machines have (QEMU's names), beyond type and accel.
MACHINE_PROPS = ("usb", "dump-guest-core", "memory-backend")
# QEMU 10.0's microvm properties: bool, or OnOffAuto (on/off/auto).
MICROVM_BOOL_PROPS = ("x-option-roms", "isa-serial", "auto-kernel-cmdline")
MICROVM_AUTO_PROPS = ("pit", "pic", "rtc", "ioapic2", "acpi", "pcie")
# What livemig's microvm lacks: the property must say so (QEMU's default is on/auto).
_MICROVM_MUST_BE_OFF = {"x-option-roms": "option ROMs", "pit": "PIT", "pic": "PIC",
                        "rtc": "RTC"}
# QEMU 10.0's -rtc, -overcommit, -boot, -msg keys (vl.c's QemuOptsList) and values.
_RTC_KEYS = ("base", "clock", "driftfix")
_BOOT_KEYS = ("order", "once", "menu", "splash", "splash-time", "reboot-timeout", "strict")
_MEM_LOCK = ("on", "off", "on-fault")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?")


# qemu_global_option()'s fast path: sscanf("%63[^.=].%63[^=]%n") then '='.
_GLOBAL_SHORT = re.compile(r"([^.=]{1,63})\.([^=]{1,63})=")
_GLOBAL_KEYS = ("driver", "property", "value")

# option -> takes a value?
_OPTIONS = {"m": True, "accel": True, "qmp": True, "incoming": True, "S": False,
            "name": True, "global": True, "guest": True, "device": True, "serial": True,
            "drive": True, "uuid": True, "machine": True, "M": True, "display": True,
            "nodefaults": False, "nographic": False, "mem-prealloc": False,
            "chardev": True, "mon": True, "monitor": True, "vga": True, "cpu": True,
            "smp": True, "no-shutdown": False, "add-fd": True, "version": False,
            "no-user-config": False, "pidfile": True, "daemonize": False,
            "overcommit": True, "rtc": True, "boot": True, "audiodev": True, "msg": True,
            "no-acpi": False, "object": True, "bios": True}


def parse_run_args(argv: list[str]) -> RunOptions:
    opts = RunOptions()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise OptionError(f"{arg}: invalid option")
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name and arg.startswith("--"):
            name, value = name.split("=", 1)
        if name not in _OPTIONS:
            raise OptionError(f"{arg}: invalid option")
        if _OPTIONS[name] and value is None:
            i += 1
            if i >= len(argv):
                raise OptionError(f"{arg}: requires an argument")
            value = argv[i]
        i += 1
        _apply(opts, name, value)
        if opts.help == "version":
            return opts
    _resolve_chardevs(opts)
    _resolve_microvm(opts)
    if opts.guest.kind == "walk" and opts.machine != "none":
        try:
            opts.guest.validate(opts.ram_size)
        except ValueError as exc:
            raise OptionError(f"-guest: {exc}") from None
    return opts


def _apply(opts: RunOptions, name: str, value: str | None) -> None:
    assert value is not None or not _OPTIONS[name]
    try:
        _apply_value(opts, name, value)
    except QapiError as exc:
        raise OptionError(f"-{name} {value}: {exc.desc}") from None
    except ChardevError as exc:
        text = str(exc)
        if text and not text.startswith(f"-{name} "):
            text = f"-{name} {value}: {text}"
        if name == "serial":   # QEMU's (last) line for a serial backend it cannot make
            text = serial_failure(value or "", text)
        raise OptionError(text) from None


def _ram_size(value: str) -> int:
    """``-m [size=]N[unit]`` as QEMU's parse_memory_options: a bare number is MiB."""
    text = Opts.parse(value, "size").get("size") or ""
    size = parse_option_size("size", text)
    if text[-1:].isdigit():  # "Fix up legacy suffix-less format"
        size *= MIB
        if size > UINT64_MAX:
            raise QapiError("too large 'size' option value")
    return size


def _apply_value(opts: RunOptions, name: str, value: str | None) -> None:
    if name == "m":
        assert value is not None
        size = _ram_size(value)
        if size < MIB or size % 4096:
            raise OptionError(f"-m {value}: RAM size must be at least 1M and page aligned")
        opts.ram_size = size
        opts.ram_size_given = True
    elif name == "accel":
        assert value is not None
        accel = Opts.parse(value, "accel").get("accel") or ""
        if accel == "help":
            opts.help = "accel"
            return
        if accel not in _ACCEL_NAMES:
            raise OptionError(f"-accel {value}: invalid accelerator {accel}")
        opts.accel = _ACCEL_NAMES[accel]
    elif name in ("machine", "M"):
        assert value is not None
        machine = Opts.parse(value, "type")
        kind = machine.get("type")
        if kind == "help":
            opts.help = "machine"
            return
        if kind is not None:
            names = {n: n for n, _, _ in MACHINE_TYPES} | {a: n for n, _, a in MACHINE_TYPES}
            if kind not in names:
                raise OptionError(f'unsupported machine type: "{kind}"\n'
                                  "Use -machine help to list supported machines")
            opts.machine = names[kind]
        _machine_props(opts, machine)
    elif name == "qmp":
        # QEMU's shorthand: a socket chardev "compat_monitorN" + -mon mode=control.
        assert value is not None
        chardev = parse_qmp_spec(value)
        label = f"compat_monitor{len(opts.qmp)}"
        opts.qmp.append(value)
        _add_chardev(opts, dataclasses.replace(chardev, id=label))
        opts.monitors.append(label)
    elif name == "chardev":
        assert value is not None
        _add_chardev(opts, parse_chardev(value))
    elif name == "mon":
        assert value is not None
        _parse_mon(opts, value)
    elif name == "monitor":
        # HMP: only "none"/"null" (QEMU's machine class adds -monitor null) mean nothing here.
        if value not in ("none", "null"):
            raise OptionError(f"-monitor {value}: {_HMP}")
    elif name == "vga":
        assert value is not None
        if value == "none":
            return
        if value not in _VGA_TYPES:
            raise OptionError(f"unknown vga type: {value}")
        opts.warnings.append("A -vga option was passed but this machine type does not use "
                             "that option; No VGA device has been created")
    elif name == "display":
        assert value is not None
        display = Opts.parse(value, "type")
        kind = display.get("type") or ""
        if kind not in ("none", *_DISPLAY_TYPES):
            raise QapiError(INVALID_ENUM_VALUE % ("type", kind))
        if kind != "none":
            raise OptionError(f"-display {value}: livemig has no display; use -display none")
        for key, _ in display.pairs[1:]:
            raise OptionError(f"-display {value}: Parameter '{key}' is unexpected")
    elif name == "cpu":
        assert value is not None
        _parse_cpu(opts, value)
    elif name == "smp":
        assert value is not None
        _parse_smp(opts, value)
    elif name == "no-shutdown":
        opts.no_shutdown = True      # the walk guest never shuts down: nothing to keep
    elif name == "version":
        opts.help = "version"
    elif name == "incoming":
        opts.incoming = value
    elif name == "S":
        opts.start_paused = True
    elif name == "name":
        assert value is not None
        opts.name = Opts.parse(value, "guest").get("guest")
    elif name == "add-fd":
        assert value is not None
        opts.add_fds.append(_parse_add_fd(value))
    elif name == "uuid":
        import uuid
        try:
            uuid.UUID(value)
        except ValueError:
            raise OptionError(f"-uuid {value}: Fail to parse UUID string") from None
        opts.uuid = value
    elif name == "global":
        assert value is not None
        opts.globals.append(_parse_global(value))
    elif name == "guest":
        assert value is not None
        try:
            opts.guest = GuestConfig.parse_walk(value)
        except ValueError as exc:
            raise OptionError(f"-guest {value}: {exc}") from None
    elif name == "drive":
        assert value is not None
        opts.guest = _parse_drive(value)
    elif name == "device":
        assert value is not None
        try:
            opts.devices.append(_parse_device(value))
        except ValueError as exc:
            raise OptionError(f"-device {value}: {exc}") from None
    elif name == "serial":
        # A compat chardev spec (QEMU takes "file:PATH" verbatim, no ',,'), or chardev:ID.
        assert value is not None
        index = len(opts._serials)
        if index and value not in ("none", "null"):
            raise OptionError(f"-serial {value}: livemig has one serial port (COM1); "
                              "a second -serial can only be none or null")
        if value.startswith("chardev:"):
            opts._serials.append(value)
            return
        chardev = dataclasses.replace(parse_compat(value, f"serial{index}"), option="-serial")
        opts._serials.append("none" if chardev.backend == "none" else f"chardev:{chardev.id}")
        if chardev.backend != "none":
            _add_chardev(opts, chardev)
    elif name == "bios":
        opts.bios = value
    elif name == "mem-prealloc":
        opts.mem_prealloc = True
    elif name == "object":
        assert value is not None
        options = parse_object_option(value)
        if any(o["id"] == options["id"] for o in opts.objects):
            raise QapiError(DUPLICATE_ID % options["id"])
        opts.objects.append(options)
    elif name == "pidfile":
        opts.pidfile = value
    elif name == "daemonize":
        opts.daemonize = True
    elif name in ("overcommit", "rtc", "boot", "msg", "audiodev"):
        assert value is not None
        _PARSERS[name](opts, value)
    # -nodefaults, -nographic: accepted for QEMU compatibility, nothing to do;
    # -no-user-config: livemig reads no configuration files; -no-acpi: its
    # machines have no ACPI (QEMU 10.0 dropped the option; libvirt 9.0 sends it).


_ACCEL_NAMES = {"soft": "soft", "kvm": "kvm", "auto": "auto", "tcg": "soft"}


def _machine_accel(text: str) -> str:
    """``-machine accel=kvm:tcg``: the first of the list this host can run (QEMU's
    do_configure_accelerator order); a single name is taken as ``-accel`` takes it."""
    names = text.split(":")
    for name in names:
        if name not in _ACCEL_NAMES or name == "auto":
            raise OptionError(f"invalid accelerator {name}")
    if len(names) == 1:
        return _ACCEL_NAMES[names[0]]
    from livemig.machine.machine import kvm_usable
    for name in names:
        if name != "kvm" or kvm_usable()[0]:
            return _ACCEL_NAMES[name]
    raise OptionError("no accelerator found")


def _resolve_microvm(opts: RunOptions) -> None:
    """``-M microvm,...``: its properties checked in QEMU's terms, then what livemig's
    microvm honours; ``-bios`` belongs to it."""
    props = opts._microvm_props
    if opts.machine != "microvm":
        if props:
            key = next(iter(props))
            raise OptionError(f"Property '{opts.machine}-machine.{key}' not found")
        if opts.bios is not None:
            raise OptionError(f"-bios: machine '{opts.machine}' boots without firmware "
                              "(-bios is for -M microvm)")
        return
    value: dict[str, str] = {}
    for key, text in props.items():
        if key in MICROVM_BOOL_PROPS:
            if text not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
                raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")
            value[key] = "on" if text in ("on", "yes", "true", "y") else "off"
        else:
            if text not in ("on", "off", "auto"):
                raise OptionError(f"Parameter '{key}' does not accept value '{text}'")
            value[key] = text
    for key, what in _MICROVM_MUST_BE_OFF.items():
        if value.get(key, "on" if key == "x-option-roms" else "auto") != "off":
            raise OptionError(f"livemig's microvm has no {what}: pass -M microvm,{key}=off")
    if value.get("acpi", "auto") == "off":
        raise OptionError("livemig's microvm has QEMU's ACPI devices and tables: acpi=off "
                          "is not supported")
    if value.get("pcie", "auto") == "on":
        raise OptionError("livemig's microvm has no PCIe host bridge: pcie=on is not supported")
    opts.microvm = MicrovmOptions(isa_serial=value.get("isa-serial", "on") == "on",
                                  ioapic2=value.get("ioapic2", "auto") != "off")


def _machine_props(opts: RunOptions, machine: Opts) -> None:
    """``-machine TYPE,accel=,usb=,dump-guest-core=,memory-backend=`` (QEMU's names)."""
    for key, text in machine.pairs:
        if key in ("type", "accel"):
            continue
        if key in MICROVM_BOOL_PROPS or key in MICROVM_AUTO_PROPS:
            opts._microvm_props[key] = text     # checked once the machine type is known
            continue
        if key not in MACHINE_PROPS:
            raise OptionError(f"Property '{opts.machine}-machine.{key}' not found")
        if key == "memory-backend":
            opts.memory_backend = text
            continue
        on = machine.get_bool(key, False)
        if key == "usb" and on:
            raise OptionError("livemig's machines have no USB controller (usb=on)")
        if key == "dump-guest-core":
            opts.dump_guest_core = on
    machine_accel = machine.get("accel")
    if machine_accel is not None:
        opts.accel = _machine_accel(machine_accel)


def _parse_overcommit(opts: RunOptions, value: str) -> None:
    """``-overcommit mem-lock=on|off|on-fault,cpu-pm=on|off``: mem-lock is mlockall(2)
    as in QEMU; cpu-pm=on (guest-owned HLT/MWAIT) is not something livemig's vCPU has."""
    over = Opts.parse(value)
    for key, _ in over:
        if key not in ("mem-lock", "cpu-pm"):
            raise OptionError(f"-overcommit {value}: Invalid parameter '{key}'")
    lock = over.get("mem-lock")
    if lock is not None:
        if lock not in _MEM_LOCK:
            raise OptionError(f"-overcommit {value}: parameter 'mem-lock' expects one of "
                              "'on', 'off', 'on-fault'")
        opts.mem_lock = lock
    try:
        cpu_pm = over.get_bool("cpu-pm", False)
    except QapiError as exc:
        raise OptionError(f"-overcommit {value}: {exc.desc}") from None
    if cpu_pm:
        raise OptionError(f"-overcommit {value}: livemig's vCPU has no cpu-pm=on "
                          "(guest-owned idle); use cpu-pm=off")


def _parse_rtc(opts: RunOptions, value: str) -> None:
    """``-rtc base=utc|localtime|DATE,clock=host|rt|vm,driftfix=none|slew``: checked as
    QEMU checks it; livemig's machines have no RTC, so nothing reads it."""
    rtc = Opts.parse(value)
    for key, text in rtc:
        if key not in _RTC_KEYS:
            raise OptionError(f"-rtc {value}: Invalid parameter '{key}'")
        if key == "base" and text not in ("utc", "localtime") and not _DATE.fullmatch(text):
            raise OptionError("invalid datetime format\n"
                              "valid formats: '2006-06-17T16:01:21' or '2006-06-17'")
        if ((key == "clock" and text not in ("host", "rt", "vm"))
                or (key == "driftfix" and text not in ("none", "slew"))):
            raise OptionError(f"invalid option value '{text}'")


def _parse_boot(opts: RunOptions, value: str) -> None:
    """``-boot [order=]...,strict=on...``: checked; the walk guest boots from livemig's
    own boot sector, so there is no boot order to follow."""
    boot = Opts.parse(value, "order")
    for key, _ in boot:
        if key not in _BOOT_KEYS:
            raise OptionError(f"Parameter 'boot.{key}' is unexpected")
    for key in ("menu", "splash", "strict"):
        try:
            boot.get_bool(key, False)
        except QapiError:
            raise OptionError(f"Parameter 'boot.{key}' expects 'on' or 'off'") from None


def _parse_msg(opts: RunOptions, value: str) -> None:
    """``-msg timestamp=on,guest-name=on``: error and warning lines as QEMU prints them."""
    msg = Opts.parse(value)
    for key, _ in msg:
        if key not in ("timestamp", "guest-name"):
            raise OptionError(f"-msg {value}: Invalid parameter '{key}'")
    try:
        opts.msg_timestamp = msg.get_bool("timestamp", False)
        msg.get_bool("guest-name", False)
    except QapiError as exc:
        raise OptionError(f"-msg {value}: {exc.desc}") from None


def _parse_audiodev(opts: RunOptions, value: str) -> None:
    """``-audiodev`` (JSON or key=value): livemig has no sound hardware, so its one
    backend is QEMU's ``none``; checked with QEMU's texts."""
    spec = _json_or_opts(value, "driver")
    if "driver" not in spec:
        raise OptionError(f"-audiodev {value}: Parameter 'driver' is missing")
    if spec["driver"] != "none":
        raise OptionError(f"-audiodev {value}: Parameter 'driver' does not accept value "
                          f"'{spec['driver']}'")
    if "id" not in spec:
        raise OptionError(f"-audiodev {value}: Parameter 'id' is missing")
    for key in spec:
        if key not in ("id", "driver", "timer-period", "in", "out"):
            raise OptionError(f"-audiodev {value}: Parameter '{key}' is unexpected")


def _json_or_opts(value: str, implied_key: str) -> dict[str, object]:
    """An option given as JSON (``{...}``, QEMU's keyval-or-JSON options) or key=value."""
    if value.lstrip().startswith("{"):
        import json
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise OptionError(f"{value}: {exc}") from None
        if not isinstance(parsed, dict):
            raise OptionError(f"{value}: JSON object expected")
        return parsed
    return dict(Opts.parse(value, implied_key).pairs)


_PARSERS = {"overcommit": _parse_overcommit, "rtc": _parse_rtc, "boot": _parse_boot,
            "msg": _parse_msg, "audiodev": _parse_audiodev}


def parse_object_option(text: str) -> dict[str, Any]:
    """One ``-object`` argument as checked ObjectOptions (QEMU's ``user_creatable_parse_str``):
    JSON when it starts with ``{``, else keyval with ``qom-type`` implied."""
    import livemig.cli.object_types  # noqa: F401  (registers every object type)
    if text.startswith("{"):
        parser = JSONMessageParser()
        messages = parser.feed(text.encode("utf-8"))
        if not messages:
            raise QapiError(JSON_PARSE_ERROR % "premature EOI")
        value, error = messages[0]
        if error is not None:
            raise QapiError(error)
        if len(messages) > 1 or parser.pending():
            raise QapiError("Expecting at most one JSON value")
        if not isinstance(value, dict):
            raise QapiError(INVALID_PARAMETER_TYPE % ("<anonymous>", "object"))
        options = visit_object_options(value)
    else:
        options = visit_object_options(dict(parse_opts(text, "qom-type")), keyval=True)
    if not id_wellformed(options["id"]):   # vl.c checks it here, with a hint
        raise QapiError(INVALID_PARAMETER_VALUE % ("id", "an identifier") + "\n"
                        "Identifiers consist of letters, digits, '-', '.', '_', "
                        "starting with a letter.")
    return options


def serial_failure(value: str, first: str = "") -> str:
    """QEMU's two lines when ``-serial VALUE`` cannot be made (``first`` may be empty)."""
    last = f"-serial {value}: could not connect serial device to character backend '{value}'"
    return f"{first}\n{last}" if first else last


def _add_chardev(opts: RunOptions, chardev: ChardevSpec) -> None:
    if chardev.id in opts.chardevs:
        raise ChardevError(f"Duplicate ID '{chardev.id}' for chardev")
    opts.chardevs[chardev.id] = chardev


def _parse_mon(opts: RunOptions, value: str) -> None:
    """``-mon [chardev=]ID,mode=control[,pretty=off]`` (QEMU's qemu_mon_opts)."""
    mon = Opts.parse(value, "chardev")
    mon.check(("id", "chardev", "mode", "pretty", "default"))
    mode = mon.get("mode", "readline") or ""
    if mode not in _MON_MODES:
        raise QapiError(INVALID_ENUM_VALUE % ("mode", mode))
    pretty = mon.get_bool("pretty", False)
    chardev = mon.get("chardev")
    if chardev is None:
        raise QapiError(MISSING_PARAMETER % "chardev")
    if mode == "readline":
        raise OptionError(f"-mon {value}: {_HMP}")
    if pretty:
        raise OptionError(f"-mon {value}: livemig's QMP monitor has no pretty=on")
    opts._mon_refs.append((value, chardev))


def _parse_cpu(opts: RunOptions, value: str) -> None:
    """``-cpu MODEL[,prop=value...]``: the models livemig's vCPU can honestly be."""
    model, _, props = value.partition(",")
    if model == "help":
        opts.help = "cpu"
        return
    if model not in {name for name, _ in CPU_MODELS}:
        raise OptionError(f"unable to find CPU model '{model}'")
    for key, val in Opts.parse(props):
        raise OptionError(f"can't apply global {model}-x86_64-cpu.{key}={val}: "
                          f"Property '{model}-x86_64-cpu.{key}' not found")
    opts.cpu = model


def _parse_smp(opts: RunOptions, value: str) -> None:
    """``-smp [cpus=]N[,maxcpus=,sockets=,cores=,threads=...]``: livemig has one vCPU."""
    smp = Opts.parse(value, "cpus")
    numbers: dict[str, int] = {}
    for key, text in smp:
        if key not in _SMP_KEYS:
            raise OptionError(f"Parameter 'smp.{key}' is unexpected")
        if not text.isdigit():
            raise OptionError(f"Parameter 'smp.{key}' expects integer")
        numbers[key] = int(text)
    topology = 1
    for key in _SMP_KEYS[2:]:
        topology *= numbers.get(key, 1) or 1
    cpus = max(numbers.get("cpus") or topology, numbers.get("maxcpus") or 0, topology)
    if cpus > 1:
        raise OptionError(f"Invalid SMP CPUs {cpus}. The max CPUs supported by machine "
                          f"'{opts.machine}' is 1")


def _parse_add_fd(value: str) -> tuple[int, int, str | None]:
    """``-add-fd fd=N,set=M[,opaque=S]`` (QEMU's parse_add_fd checks that need no
    descriptor; the VM checks and duplicates the descriptor: ``qmp/fds.py``)."""
    add = Opts.parse(value)
    add.check(("fd", "set", "opaque"))

    def signed(number: int) -> int:  # QEMU stores the uint64 in an int
        return number - (1 << 64) if number >= 1 << 63 else number
    fd = signed(add.get_number("fd", UINT64_MAX))
    if fd < 0:
        raise OptionError(f"-add-fd {value}: fd option is required and must be non-negative")
    if fd <= 2:
        raise OptionError(f"-add-fd {value}: fd cannot be a standard I/O stream")
    return fd, signed(add.get_number("set", UINT64_MAX)), add.get("opaque")


def _resolve_chardevs(opts: RunOptions) -> None:
    """After every option (QEMU creates chardevs before their frontends): -mon and
    -serial find their chardev; one chardev has one frontend."""
    users = {chardev: "mon" for chardev in opts.monitors}   # the -qmp ones
    for value, chardev in opts._mon_refs:
        spec = opts.chardevs.get(chardev)
        if spec is None:
            raise OptionError(f'-mon {value}: chardev "{chardev}" not found')
        if spec.backend != "socket":
            raise OptionError(f"-mon {value}: livemig's QMP monitor needs a socket chardev, "
                              f"'{chardev}' is {spec.backend}")
        if chardev in users:
            raise OptionError(f"-mon {value}: Device '{chardev}' is in use")
        users[chardev] = "mon"
        opts.monitors.append(chardev)
    if opts._serials and opts._serials[0] != "none":
        ref = opts._serials[0]
        chardev = ref[len("chardev:"):]
        spec = opts.chardevs.get(chardev)
        if spec is None:
            raise OptionError(serial_failure(ref))
        if chardev in users:
            raise OptionError(f"-serial {ref}: Device '{chardev}' is in use")
        users[chardev] = "serial"
        if spec.backend == "file":
            opts.serial = spec.path
        elif spec.backend == "socket":
            opts.serial_chardev = chardev
    elif opts._serials:
        opts.serial = None


def help_text(opts: RunOptions) -> str:
    """What ``-M help``, ``-accel help``, ``-cpu help`` and ``-version`` print (QEMU's format)."""
    if opts.help == "machine":
        lines = ["Supported machines are:"]
        for name, desc, alias in MACHINE_TYPES:
            if alias:
                lines.append(f"{alias:<20} {desc} (alias of {name})")
            lines.append(f"{name:<20} {desc}" + (" (default)" if name == DEFAULT_MACHINE else ""))
        return "\n".join(lines)
    if opts.help == "accel":
        return "\n".join(["Accelerators supported in QEMU binary:", *ACCELERATORS])
    if opts.help == "cpu":
        return "\n".join(["Available CPUs:", *(f"  {n:<20}  {d}" for n, d in CPU_MODELS)])
    major, minor, micro = QEMU_VERSION
    return (f"QEMU emulator version {major}.{minor}.{micro} (livemig {__version__})\n"
            "livemig: live migration in Python; QEMU's command line, QMP and migration stream")


def _parse_global(value: str) -> tuple[str, str, str]:
    """``driver.prop=value`` (value verbatim), else ``driver=,property=,value=`` QemuOpts."""
    m = _GLOBAL_SHORT.match(value)
    if m is not None:
        return m.group(1), m.group(2), value[m.end():]
    opts = Opts.parse(value)
    opts.check(_GLOBAL_KEYS)
    driver, prop, val = opts.get("driver"), opts.get("property"), opts.get("value")
    if driver is None or prop is None or val is None:
        raise QapiError("options 'driver', 'property', and 'value' are required")
    return driver, prop, val


def _parse_device(spec: str) -> AccelDeviceConfig:
    """``-device accel,id=...`` through the QemuOpts parser (``driver`` implied)."""
    opts = Opts.parse(spec, "driver")
    driver = opts.get("driver")
    if driver is None or not opts.pairs or opts.pairs[0][0] != "driver":
        raise QapiError("Parameter 'driver' is missing")
    for key, _ in opts.pairs[1:]:
        if key == "driver":
            raise QapiError(INVALID_PARAMETER % key)
    return AccelDeviceConfig.from_opts(driver, opts.pairs[1:])


def _parse_drive(spec: str) -> GuestConfig:
    opts = Opts.parse(spec)
    path = opts.get("file")
    if not path:
        raise OptionError(f"-drive {spec}: needs file=IMG")
    if opts.get("format", "raw") != "raw":
        raise OptionError(f"-drive {spec}: only format=raw is supported")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise OptionError(f"-drive {spec}: Could not open '{path}': {exc.strerror}") from None
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise OptionError(f"-drive {spec}: '{path}' is not a 512-byte boot sector (no 55 AA)")
    return GuestConfig(kind="image", image_path=path)
