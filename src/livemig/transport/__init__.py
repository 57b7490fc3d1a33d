"""Transport: migration addresses, and the byte streams they open.

``uri`` parses QEMU's URI and ``channels`` forms into typed addresses;
``connect.open_outgoing`` (source) and ``listen.listen`` (destination) turn
an address into a ``Channel``, the one bidirectional byte stream the
migration engine writes to and reads from. Knows nothing of what the bytes
mean.
"""

from livemig.transport.channel import (
    Channel,
    CommandChannel,
    FdChannel,
    SocketChannel,
    byte_view,
    tune_socket,
)
from livemig.transport.connect import open_outgoing
from livemig.transport.errors import TransportError, UnexpectedEOF
from livemig.transport.listen import Listener, listen
from livemig.transport.uri import (
    Address,
    ExecAddress,
    FdAddress,
    FileAddress,
    InetAddress,
    UnixAddress,
    address_from_channels,
    address_to_channel,
    format_uri,
    parse_size,
    parse_uri,
    resolve_migrate_args,
)

__all__ = [
    "Address",
    "Channel",
    "CommandChannel",
    "ExecAddress",
    "FdAddress",
    "FdChannel",
    "FileAddress",
    "InetAddress",
    "Listener",
    "SocketChannel",
    "TransportError",
    "UnexpectedEOF",
    "UnixAddress",
    "address_from_channels",
    "address_to_channel",
    "byte_view",
    "format_uri",
    "listen",
    "open_outgoing",
    "parse_size",
    "parse_uri",
    "resolve_migrate_args",
    "tune_socket",
]
