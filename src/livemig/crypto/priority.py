"""The ``priority`` property of ``tls-creds-*``: the part of GnuTLS's priority
strings that has an exact OpenSSL meaning, the rest refused by name.

A GnuTLS priority string is a base keyword then ``:``-separated modifiers.
livemig takes the bases whose meaning OpenSSL's defaults (as Python's
``ssl`` sets them, TLS 1.2 at least) meet or exceed: ``NORMAL``,
``PERFORMANCE``, ``@SYSTEM``; the protocol-version modifiers (``-VERS-ALL``,
``+VERS-TLS1.2``, ``+VERS-TLS1.3``, ``-VERS-TLS1.2``, ``-VERS-TLS1.3``, and
the removals of versions livemig never speaks: ``-VERS-TLS1.1``,
``-VERS-TLS1.0``, ``-VERS-SSL3.0``, ``-VERS-DTLS-ALL``); and
``%SERVER_PRECEDENCE``. Cipher, MAC, group, signature and key-exchange
modifiers, security-level bases (``SECURE128``...) and other flags have no
one-to-one OpenSSL setting: refused (``object-add`` fails) rather than
approximated. QEMU checks the string only when a session starts; livemig at
``object-add``, since what it cannot honour it should not accept.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final

UNSUPPORTED: Final = ("Property 'priority' value '%s': '%s' has no OpenSSL equivalent in "
                      "livemig (it takes NORMAL, PERFORMANCE or @SYSTEM, then "
                      "+/-VERS-TLS1.2, +/-VERS-TLS1.3, -VERS-ALL, %%SERVER_PRECEDENCE)")
NO_VERSION: Final = "Property 'priority' value '%s' leaves no TLS version (livemig: 1.2, 1.3)"

_BASES: Final = frozenset(("NORMAL", "PERFORMANCE", "@SYSTEM"))
_VERSIONS: Final = {"TLS1.2": ssl.TLSVersion.TLSv1_2, "TLS1.3": ssl.TLSVersion.TLSv1_3}
_NEVER_SPOKEN: Final = frozenset(("-VERS-TLS1.1", "-VERS-TLS1.0", "-VERS-SSL3.0",
                                  "-VERS-DTLS-ALL", "-VERS-DTLS1.0", "-VERS-DTLS1.2"))


@dataclass(frozen=True)
class Priority:
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    server_precedence: bool

    def apply(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = self.minimum
        ctx.maximum_version = self.maximum
        if self.server_precedence:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


class PriorityError(ValueError):
    pass


def parse_priority(text: str) -> Priority:
    """``text`` as the OpenSSL settings it means, or :class:`PriorityError`."""
    tokens = text.split(":")
    if tokens[0] not in _BASES:
        raise PriorityError(UNSUPPORTED % (text, tokens[0]))
    versions = set(_VERSIONS)
    server_precedence = False
    for token in tokens[1:]:
        if token == "-VERS-ALL":
            versions.clear()
        elif token[:1] in "+-!" and token[1:].startswith("VERS-") and token[6:] in _VERSIONS:
            (versions.add if token[0] == "+" else versions.discard)(token[6:])
        elif token in _NEVER_SPOKEN:
            pass
        elif token == "%SERVER_PRECEDENCE":
            server_precedence = True
        else:
            raise PriorityError(UNSUPPORTED % (text, token))
    if not versions:
        raise PriorityError(NO_VERSION % text)
    chosen = sorted(_VERSIONS[v] for v in versions)
    return Priority(chosen[0], chosen[-1], server_precedence)
