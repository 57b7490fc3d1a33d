"""QEMU's VMState payloads, field by field (sans-IO): the generic codec
(``codec``), the x86 ``cpu`` section (``cpu``), the other devices of QEMU's
microvm (``devices``), and the machine's section table (``microvm``)."""
