"""QEMU's TLS credentials objects (``crypto/tlscreds*.c``) over Python's ``ssl`` (OpenSSL)."""
