"""livemig: live migration of virtual machines with QEMU's switchover-ack."""

__version__ = "0.1.0"

# The QEMU release whose protocol, names and texts livemig speaks.
QEMU_VERSION = (10, 0, 2)
