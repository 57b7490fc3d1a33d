"""QEMU's authorization objects (``authz/``): who may talk to a TLS listener."""
