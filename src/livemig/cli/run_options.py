"""``livemig run`` options, in QEMU's spelling (``-m``, ``-qmp``, ``-incoming``...).

Each option is accepted as ``-opt`` and ``--opt`` (and ``--opt=value``), so a
QEMU command line for this subset works unchanged. Parsing is pure: it
returns a :class:`RunOptions` or raises :class:`OptionError` with the one
line the process prints before exiting non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livemig.machine.accel_device import AccelDeviceConfig
from livemig.machine.guest import MIB, GuestConfig, parse_size


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
    if name == "m":
        v = value.split(",")[0].removeprefix("size=")  # type: ignore[union-attr]
        try:
            size = parse_size(v, default_unit="m")
        except ValueError:
            raise OptionError(f"-m {value}: Parameter 'size' expects a non-negative number "
                              "below 2^64") from None
        if size < MIB or size % 4096:
            raise OptionError(f"-m {value}: RAM size must be at least 1M and page aligned")
        opts.ram_size = size
    elif name == "accel":
        accel = value.split(",")[0]  # type: ignore[union-attr]
        if accel not in ("soft", "kvm", "auto", "tcg"):
            raise OptionError(f"-accel {value}: invalid accelerator {accel}")
        opts.accel = "soft" if accel == "tcg" else accel
    elif name in ("machine", "M"):
        for item in value.split(","):  # type: ignore[union-attr]
            if item.startswith("accel="):
                _apply(opts, "accel", item[len("accel="):])
    elif name == "qmp":
        opts.qmp.append(value)  # type: ignore[arg-type]
    elif name == "incoming":
        opts.incoming = value
    elif name == "S":
        opts.start_paused = True
    elif name == "name":
        first = value.split(",")[0]  # type: ignore[union-attr]
        opts.name = first.removeprefix("guest=")
    elif name == "uuid":
        import uuid
        try:
            uuid.UUID(value)
        except ValueError:
            raise OptionError(f"-uuid {value}: Fail to parse UUID string") from None
        opts.uuid = value
    elif name == "global":
        drv_prop, sep, val = value.partition("=")  # type: ignore[union-attr]
        driver, dot, prop = drv_prop.partition(".")
        if not sep or not dot or not driver or not prop:
            raise OptionError(f"-global {value}: Invalid format (expected driver.property=value)")
        opts.globals.append((driver, prop, val))
    elif name == "guest":
        try:
            opts.guest = GuestConfig.parse_walk(value)  # type: ignore[arg-type]
        except ValueError as exc:
            raise OptionError(f"-guest {value}: {exc}") from None
    elif name == "drive":
        opts.guest = _parse_drive(value)  # type: ignore[arg-type]
    elif name == "device":
        try:
            opts.devices.append(AccelDeviceConfig.parse(value))  # type: ignore[arg-type]
        except ValueError as exc:
            raise OptionError(f"-device {value}: {exc}") from None
    elif name == "serial":
        if value == "none":
            opts.serial = None
        elif value.startswith("file:"):  # type: ignore[union-attr]
            opts.serial = value[len("file:"):]  # type: ignore[index]
        else:
            raise OptionError(f"-serial {value}: only file:PATH and none are supported")
    elif name == "mem-prealloc":
        opts.mem_prealloc = True
    # -display, -nodefaults, -nographic: accepted for QEMU compatibility, nothing to do.


def _parse_drive(spec: str) -> GuestConfig:
    kv = dict(item.partition("=")[::2] for item in spec.split(","))
    path = kv.get("file")
    if not path:
        raise OptionError(f"-drive {spec}: needs file=IMG")
    if kv.get("format", "raw") != "raw":
        raise OptionError(f"-drive {spec}: only format=raw is supported")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise OptionError(f"-drive {spec}: Could not open '{path}': {exc.strerror}") from None
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise OptionError(f"-drive {spec}: '{path}' is not a 512-byte boot sector (no 55 AA)")
    return GuestConfig(kind="image", image_path=path)
