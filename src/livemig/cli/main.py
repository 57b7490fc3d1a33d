"""The ``livemig`` command: ``run`` a VM, or drive migrations (``migrate``,
``demo``, ``bench``) as a QMP client of livemig or QEMU, or ``analyze`` a stream file."""

from __future__ import annotations

import sys

USAGE = """usage: livemig COMMAND [ARGS]

commands:
  run      run one VM process (QEMU-style options: -m, -accel, -qmp, -incoming, ...)
  migrate  migrate a running VM (livemig or QEMU) over QMP and report the figures
  demo     migrate a VM twice on this machine, without and with switchover-ack
  bench    migration benchmark, livemig and QEMU side by side
  analyze  inspect a migration stream file (livemig or QEMU 10.0): sections, RAM, VM description
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from livemig.cli.run import run_main
        return run_main(rest)
    if cmd == "migrate":
        from livemig.cli.migrate import migrate_main
        return migrate_main(rest)
    if cmd == "demo":
        from livemig.cli.demo import demo_main
        return demo_main(rest)
    if cmd == "bench":
        from livemig.cli.bench import bench_main
        return bench_main(rest)
    if cmd == "analyze":
        from livemig.cli.analyze import main as analyze_main
        return analyze_main(rest)
    print(f"livemig: unknown command '{cmd}'\n{USAGE}", file=sys.stderr, end="")
    return 2
