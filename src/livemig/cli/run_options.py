"""``livemig run`` options, in QEMU's spelling (``-m``, ``-qmp``, ``-incoming``...).

Each option is accepted as ``-opt`` and ``--opt`` (and ``--opt=value``), so a
QEMU command line for this subset works unchanged. Parsing is pure: it
returns a :class:`RunOptions` or raises :class:`OptionError` with the one
line the process prints before exiting non-zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from livemig.machine.accel_device import AccelDeviceConfig
from livemig.machine.guest import MIB, GuestConfig
from livemig.qapi.errors import INVALID_PARAMETER, QapiError
from livemig.qapi.opts import Opts, format_opt_value
from livemig.qapi.string_input import UINT64_MAX, parse_option_size


class OptionError(Exception):
    pass


@dataclass
class RunOptions:
    ram_size: int = 128 * MIB
    accel: str = "auto"
    qmp: list[str] = field(default_factory=list)
    incoming: str | None = None
    start_paused: bool = False
    name: str | None = None
    uuid: str | None = None
    globals: list[tuple[str, str, str]] = field(default_factory=list)  # (driver, prop, value)
    guest: GuestConfig = field(default_factory=GuestConfig)
    devices: list[AccelDeviceConfig] = field(default_factory=list)
    serial: str | None = None
    mem_prealloc: bool = False          # -mem-prealloc: fault all guest RAM in at start


# qemu_global_option()'s fast path: sscanf("%63[^.=].%63[^=]%n") then '='.
_GLOBAL_SHORT = re.compile(r"([^.=]{1,63})\.([^=]{1,63})=")
_GLOBAL_KEYS = ("driver", "property", "value")

# option -> takes a value?
_OPTIONS = {"m": True, "accel": True, "qmp": True, "incoming": True, "S": False,
            "name": True, "global": True, "guest": True, "device": True, "serial": True,
            "drive": True, "uuid": True, "machine": True, "M": True, "display": True,
            "nodefaults": False, "nographic": False, "mem-prealloc": False}


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
    if opts.guest.kind == "walk":
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
    elif name == "accel":
        assert value is not None
        accel = Opts.parse(value, "accel").get("accel") or ""
        if accel not in ("soft", "kvm", "auto", "tcg"):
            raise OptionError(f"-accel {value}: invalid accelerator {accel}")
        opts.accel = "soft" if accel == "tcg" else accel
    elif name in ("machine", "M"):
        assert value is not None
        machine_accel = Opts.parse(value, "type").get("accel")
        if machine_accel is not None:
            _apply(opts, "accel", format_opt_value(machine_accel))
    elif name == "qmp":
        assert value is not None
        opts.qmp.append(value)
    elif name == "incoming":
        opts.incoming = value
    elif name == "S":
        opts.start_paused = True
    elif name == "name":
        assert value is not None
        opts.name = Opts.parse(value, "guest").get("guest")
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
        # A chardev spec, not QemuOpts: QEMU takes "file:PATH" verbatim (no ',,').
        assert value is not None
        if value == "none":
            opts.serial = None
        elif value.startswith("file:"):
            opts.serial = value[len("file:"):]
        else:
            raise OptionError(f"-serial {value}: only file:PATH and none are supported")
    elif name == "mem-prealloc":
        opts.mem_prealloc = True
    # -display, -nodefaults, -nographic: accepted for QEMU compatibility, nothing to do.


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
