"""Migration over TLS, QEMU's ``migration/tls.c`` and ``crypto/tlssession.c`` checks.

``tls-creds`` (empty: off) names a ``tls-creds-*`` object whose endpoint is
``client`` on the source and ``server`` on the destination. The source
checks the server's certificate against ``tls-hostname``, else the host of
a ``tcp:`` URI (none: ``No hostname for certificate validation`` when it
verifies, QEMU 10's text; QEMU says it after the handshake, livemig
before). The destination, when its credentials verify the peer, hands the
client certificate's distinguished name to the ``tls-authz`` object,
spelled as QEMU 10.0.2's GnuTLS (``gnutls_x509_crt_get_dn2``) spells it:
RFC 4514 escapes, but the RDNs in the certificate's own order
(``C=GB,O=Example,CN=host``; checked against QEMU in
tests/e2e/test_tls_qemu_interop.py). With ``tls-creds-psk`` the key is the
authentication: no certificate, no hostname; the session must be the
key's (``psk_was_used``), and the destination asks ``tls-authz`` about the
client's username (QEMU 10.0.2 asks nothing there). The main channel, its return path
(the same TLS stream) and every multifd channel go through
:func:`tls_client` / :func:`tls_server`. A failed check is a
``TransportError`` in QEMU's words.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Any, Final

from livemig.authz.authz import QAuthZ
from livemig.crypto.psk import PskServer, psk_was_used
from livemig.crypto.tlscreds import PSK_FILE, PSK_NO_USERNAME, QCryptoTLSCreds, TLSCredsPSK
from livemig.qapi.errors import QapiError
from livemig.transport import Channel, TransportError
from livemig.transport.channel import SocketChannel
from livemig.transport.tls import TlsChannel

NO_CREDS: Final = "No TLS credentials with id '%s'"
NOT_CREDS: Final = "Object with id '%s' is not TLS credentials"
WRONG_ENDPOINT: Final = "Expected TLS credentials for a %s endpoint"
# QEMU 10 dropped migration/tls.c's "No hostname available for TLS": the session's
# certificate check says this instead (crypto/tlssession.c), for a verifying client.
NO_HOSTNAME: Final = "No hostname for certificate validation"
AUTHZ_DENIED: Final = "TLS x509 authz check for %s is denied"
HOSTNAME_MISMATCH: Final = "Certificate does not match the hostname %s"
NO_PEER_CERT: Final = "No certificate peers"
NO_AUTHZ: Final = "Cannot find QAuthZ object ID %s"   # authz/base.c
NOT_AUTHZ: Final = "Object '%s' is not a QAuthZ subclass"
HANDSHAKE_FAILED: Final = "TLS handshake failed: %s"
NEEDS_SOCKET: Final = "TLS needs a socket migration channel (tcp, unix or a socket fd)"
# QEMU 10.0.2 asks no authz about a PSK session; livemig asks it about the username
# (stricter, QEMU-CONFORMANCE.md), in the x509 check's words.
PSK_AUTHZ_DENIED: Final = "TLS PSK authz check for %s is denied"
PSK_NOT_USED: Final = "the peer did not authenticate with the pre-shared key"
# How long a peer may take over its handshake before the destination drops it.
HANDSHAKE_TIMEOUT_S: Final = 30.0

# X509_V_ERR_* -> QEMU's qcrypto_tls_session_check_certificate() reasons.
_VERIFY_REASONS: Final = {
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    2: "The certificate hasn't got a known issuer",
    18: "The certificate hasn't got a known issuer",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}
# Short names GnuTLS prints in a DN, by Python's ssl long names.
_DN_NAMES: Final = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAIL", "serialNumber": "serialNumber", "title": "title",
    "givenName": "givenName", "surname": "surName", "initials": "initials",
    "generationQualifier": "generationQualifier", "dnQualifier": "dnQualifier",
    "pseudonym": "pseudonym", "name": "name",
}


def tls_enabled(params: Any) -> bool:
    return bool(params.get("tls-creds"))


def migration_tls_get_creds(objects: Any, creds_id: str, endpoint: str) -> QCryptoTLSCreds:
    """The ``tls-creds`` object for ``endpoint``, with QEMU's three texts."""
    creds = objects.get(creds_id) if objects is not None else None
    if creds is None:
        raise TransportError(NO_CREDS % creds_id)
    if not isinstance(creds, QCryptoTLSCreds):
        raise TransportError(NOT_CREDS % creds_id)
    if creds.endpoint != endpoint:
        raise TransportError(WRONG_ENDPOINT % endpoint)
    return creds


def _dn_escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def peer_name(cert: dict[str, Any]) -> str:
    """The subject of ``getpeercert()``'s answer as QEMU's GnuTLS prints it: RFC 4514
    attribute spelling and escapes, RDNs in the certificate's order (not reversed)."""
    rdns = []
    for rdn in cert.get("subject", ()):
        rdns.append("+".join(f"{_DN_NAMES.get(key, key)}={_dn_escape(value)}"
                             for key, value in rdn))
    return ",".join(rdns)


def _handshake_error(exc: BaseException, hostname: str | None) -> TransportError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 62 and hostname:        # X509_V_ERR_HOSTNAME_MISMATCH
            return TransportError(HOSTNAME_MISMATCH % hostname, errno.EPROTO)
        return TransportError(_VERIFY_REASONS.get(code, "The certificate is not trusted"),
                              errno.EPROTO)
    if isinstance(exc, ssl.SSLError):
        return TransportError(HANDSHAKE_FAILED % (exc.reason or exc), errno.EPROTO)
    if isinstance(exc, TimeoutError):
        return TransportError(HANDSHAKE_FAILED % "timed out", errno.ETIMEDOUT)
    if isinstance(exc, OSError):
        code = exc.errno or errno.EIO
        return TransportError(HANDSHAKE_FAILED % os.strerror(code), code)
    return TransportError(HANDSHAKE_FAILED % exc)


def _take_socket(channel: Channel) -> socket.socket:
    if not isinstance(channel, SocketChannel):
        channel.close()
        raise TransportError(NEEDS_SOCKET)
    return channel.sock


def _handshake(ssock: ssl.SSLSocket, timeout: float | None, hostname: str | None) -> None:
    ssock.settimeout(timeout)
    try:
        ssock.do_handshake()
    except (OSError, ValueError) as exc:
        ssock.close()
        raise _handshake_error(exc, hostname) from None


def _require_psk(ssock: ssl.SSLSocket) -> None:
    if not psk_was_used(ssock):
        ssock.close()
        raise TransportError(HANDSHAKE_FAILED % PSK_NOT_USED, errno.EPROTO)


def tls_client(channel: Channel, creds: QCryptoTLSCreds, hostname: str | None,
               timeout: float | None = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The source's side: handshake, then the server's certificate and hostname
    (x509), or that the session is the pre-shared key's (PSK: no certificate,
    no hostname, as in QEMU)."""
    psk = isinstance(creds, TLSCredsPSK)
    if not hostname and creds.verify_peer and not psk:
        channel.close()
        raise TransportError(NO_HOSTNAME)
    sock = _take_socket(channel)
    ssock = creds.context.wrap_socket(sock, server_hostname=hostname or None,
                                      do_handshake_on_connect=False)
    _handshake(ssock, timeout, hostname)
    if psk:
        _require_psk(ssock)
    return TlsChannel(ssock)


def _psk_handshake(ssock: ssl.SSLSocket, creds: TLSCredsPSK,
                   timeout: float | None) -> str:
    """The server's PSK handshake; the client's username, which it proved."""
    assert isinstance(creds.psk, PskServer)
    with creds.psk.handshake(ssock) as seen:
        try:
            _handshake(ssock, timeout, None)
        except TransportError as exc:
            saw = seen()
            if saw is not None and not saw[1]:   # say which name, as QEMU's client does
                raise TransportError(f"{exc.desc}: " + PSK_NO_USERNAME % (
                    saw[0], os.path.join(creds.dir, PSK_FILE)), exc.errno) from None
            raise
        saw = seen()
    if saw is None or not saw[1]:
        ssock.close()
        raise TransportError(HANDSHAKE_FAILED % PSK_NOT_USED, errno.EPROTO)
    _require_psk(ssock)
    return saw[0]


def tls_server(channel: Channel, creds: QCryptoTLSCreds, authz_id: str, objects: Any,
               timeout: float | None = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The destination's side: handshake, then the client's name against ``tls-authz``:
    its certificate's DN (x509, when it verifies peers) or its PSK username."""
    sock = _take_socket(channel)
    ssock = creds.context.wrap_socket(sock, server_side=True,
                                      do_handshake_on_connect=False)
    psk = isinstance(creds, TLSCredsPSK)
    name: str | None = None
    if isinstance(creds, TLSCredsPSK):
        name = _psk_handshake(ssock, creds, timeout)
    else:
        _handshake(ssock, timeout, None)
    try:
        if not psk and creds.verify_peer:
            cert = ssock.getpeercert()
            if not cert:
                raise TransportError(NO_PEER_CERT)
            name = peer_name(cert)
        if name is not None and authz_id:
            authz = objects.get(authz_id) if objects is not None else None
            if authz is None:
                raise TransportError(NO_AUTHZ % authz_id)
            if not isinstance(authz, QAuthZ):
                raise TransportError(NOT_AUTHZ % authz_id)
            try:
                allowed = authz.is_allowed(name)
            except QapiError as exc:
                raise TransportError(exc.desc) from None
            if not allowed:
                raise TransportError((PSK_AUTHZ_DENIED if psk else AUTHZ_DENIED) % name)
    except BaseException:
        ssock.close()
        raise
    return TlsChannel(ssock)
