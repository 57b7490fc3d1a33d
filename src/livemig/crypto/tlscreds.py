"""``tls-creds-x509`` and ``tls-creds-psk``: QEMU's properties, file names and
checks, each object ready with the ``ssl.SSLContext`` its endpoint needs.

The files are QEMU's, in ``dir``: ``ca-cert.pem`` (required), ``ca-crl.pem``
(optional), ``server-cert.pem``/``server-key.pem`` (server, required),
``client-cert.pem``/``client-key.pem`` (client, optional), ``keys.psk``
(PSK, see ``TLSCredsPSK``). A missing required file fails ``object-add`` with QEMU's
``Unable to access credentials PATH: strerror``. ``sanity-check`` (default
on) refuses an expired or not yet active certificate of our own or of the
CA with QEMU's texts; OpenSSL then checks that the key matches the
certificate. ``verify-peer`` (default on): a server asks for and verifies
the client's certificate, a client verifies the server's and its hostname.
``priority``: the part of GnuTLS's strings OpenSSL can honour exactly
(``crypto/priority.py``), the rest refused, never ignored.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

from livemig.crypto.priority import PriorityError, parse_priority
from livemig.crypto.psk import PskClient, PskServer, PskUnavailable
from livemig.qapi.errors import QapiError
from livemig.qapi.schema import Enum, struct
from livemig.qom.object import UserCreatable, register_object_type

ENDPOINT: Final = Enum("QCryptoTLSCredsEndpoint", ("client", "server"))
CA_CERT: Final = "ca-cert.pem"
CA_CRL: Final = "ca-crl.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"
PSK_FILE: Final = "keys.psk"
PSK_DEFAULT_USERNAME: Final = "qemu"

# crypto/tlscreds.c, tlscredsx509.c, tlscredspsk.c
MISSING_DIR: Final = "Missing 'dir' property value"
UNABLE_TO_ACCESS: Final = "Unable to access credentials %s: %s"
CANNOT_LOAD_PAIR: Final = "Cannot load certificate '%s' & key '%s': %s"
CANNOT_LOAD_CA: Final = "Cannot load CA certificate '%s': %s"
CANNOT_LOAD_CRL: Final = "Cannot load CRL '%s': %s"
PSK_USERNAME_ON_SERVER: Final = "username should not be set when endpoint=server"
PSK_NO_USERNAME: Final = "Username %s not found in PSK file %s"
PSK_CANNOT_READ: Final = "Cannot read PSK file %s: %s"
# QEMU hands the key's text to gnutls_psk_set_client_credentials(GNUTLS_PSK_KEY_HEX).
PSK_BAD_KEY: Final = "Cannot set PSK client credentials: Error in parsing."
PSK_CIPHERS: Final = ("kECDHEPSK:kDHEPSK+AESGCM:kDHEPSK+CHACHA20:kPSK+AESGCM:kPSK+CHACHA20:"
                      "!SHA1:!eNULL")
_HEX: Final = re.compile(r"[0-9a-fA-F]+")
PASSWORDID_NOT_SUPPORTED: Final = "Property 'passwordid' is not supported by livemig"


class QCryptoTLSCreds(UserCreatable):
    """QEMU's ``QCryptoTLSCreds``: endpoint (default client), dir, verify-peer (default on)."""

    @property
    def endpoint(self) -> str:
        return str(self.props.get("endpoint", "client"))

    @property
    def verify_peer(self) -> bool:
        return bool(self.props.get("verify-peer", True))

    @property
    def dir(self) -> str:
        return str(self.props.get("dir") or "")

    def get_path(self, name: str, required: bool) -> str | None:
        """``qcrypto_tls_creds_get_path``: the file's path, None if optional and absent."""
        path = os.path.join(self.dir, name)
        if os.access(path, os.R_OK):
            return path
        code = _access_errno(path)
        if code == 2 and not required:   # ENOENT
            return None
        raise QapiError(UNABLE_TO_ACCESS % (path, os.strerror(code)))

    def complete(self) -> None:
        if not self.dir:
            raise QapiError(MISSING_DIR)
        priority = None
        if "priority" in self.props:
            try:
                priority = parse_priority(str(self.props["priority"]))
            except PriorityError as exc:
                raise QapiError(str(exc)) from None
        self.context = self._load()
        if priority is not None:
            priority.apply(self.context)

    def _load(self) -> ssl.SSLContext:
        raise NotImplementedError

    def _base_context(self) -> ssl.SSLContext:
        if self.endpoint == "server":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.num_tickets = 0    # nothing arrives after the handshake but the stream
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def _access_errno(path: str) -> int:
    try:
        with open(path, "rb"):
            return 13                       # readable by open() but not access(): EACCES
    except OSError as exc:
        return exc.errno or 2


def _check_cert_times(path: str, what: str) -> None:
    """QEMU's ``qcrypto_tls_creds_check_cert_times`` on the first certificate of ``path``."""
    try:
        info: dict[str, Any] = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError) as exc:
        raise QapiError(f"Unable to import {what} certificate {path}: "
                        f"{getattr(exc, 'reason', None) or exc}") from None
    now = time.time()
    if ssl.cert_time_to_seconds(info["notAfter"]) < now:
        raise QapiError(f"The {what} certificate {path} has expired")
    if ssl.cert_time_to_seconds(info["notBefore"]) > now:
        raise QapiError(f"The {what} certificate {path} is not yet active")


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)


@register_object_type
class TLSCredsX509(QCryptoTLSCreds):
    qom_type = "tls-creds-x509"
    properties = struct("TlsCredsX509Properties", {
        "*verify-peer": "bool", "*dir": "str", "*endpoint": ENDPOINT, "*priority": "str",
        "*sanity-check": "bool", "*passwordid": "str"})

    def _load(self) -> ssl.SSLContext:
        if "passwordid" in self.props:
            raise QapiError(PASSWORDID_NOT_SUPPORTED)
        server = self.endpoint == "server"
        cacert = self.get_path(CA_CERT, True)
        assert cacert is not None
        if server:
            cacrl = self.get_path(CA_CRL, False)
            cert = self.get_path(SERVER_CERT, True)
            key = self.get_path(SERVER_KEY, True)
        else:
            cacrl = None
            cert = self.get_path(CLIENT_CERT, False)
            key = self.get_path(CLIENT_KEY, False)
        if self.props.get("sanity-check", True):
            if cert is not None:
                _check_cert_times(cert, "server" if server else "client")
            _check_cert_times(cacert, "CA")
        ctx = self._base_context()
        try:
            ctx.load_verify_locations(cafile=cacert)
        except (ssl.SSLError, OSError) as exc:
            raise QapiError(CANNOT_LOAD_CA % (cacert, _ssl_reason(exc))) from None
        if cacrl is not None:
            try:
                ctx.load_verify_locations(cafile=cacrl)
            except (ssl.SSLError, OSError) as exc:
                raise QapiError(CANNOT_LOAD_CRL % (cacrl, _ssl_reason(exc))) from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise QapiError(CANNOT_LOAD_PAIR % (cert, key, _ssl_reason(exc))) from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        else:
            ctx.check_hostname = self.verify_peer
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx


def psk_lookup(path: str, username: str) -> str | None:
    """QEMU's ``lookup_key``: the text after ``username:`` on the first line that
    starts so (lines split at ``\\n`` only), None if no line does."""
    with open(path, "rb") as f:
        content = f.read()
    prefix = username.encode() + b":"
    for line in content.split(b"\n"):
        if line.startswith(prefix):
            return line[len(prefix):].decode("utf-8", errors="replace")
    return None


def psk_decode(hexkey: str) -> bytes | None:
    """A ``keys.psk`` key: hex digits, an even count, not empty (GnuTLS's hex
    decoding, which takes no spaces, unlike ``bytes.fromhex``); None if not."""
    if not hexkey or len(hexkey) % 2 or not _HEX.fullmatch(hexkey):
        return None
    return bytes.fromhex(hexkey)


def _server_lookup(path: str) -> Callable[[bytes], bytes | None]:
    """The server's key for an identity, read from ``keys.psk`` at each handshake
    as GnuTLS's ``gnutls_psk_set_server_credentials_file`` does (an edited file
    counts for the next connection)."""
    def lookup(identity: bytes) -> bytes | None:
        try:
            hexkey = psk_lookup(path, identity.decode())
        except (OSError, UnicodeDecodeError):
            return None
        return None if hexkey is None else psk_decode(hexkey.rstrip("\r"))
    return lookup


@register_object_type
class TLSCredsPSK(QCryptoTLSCreds):
    """Pre-shared keys (``keys.psk``: ``username:hexkey`` lines). OpenSSL's PSK
    callbacks, reached through ``crypto/psk.py``, carry them; the server takes
    the client's username as the identity ``tls-authz`` is asked about."""

    qom_type = "tls-creds-psk"
    properties = struct("TlsCredsPskProperties", {
        "*verify-peer": "bool", "*dir": "str", "*endpoint": ENDPOINT, "*priority": "str",
        "*username": "str"})

    psk: PskClient | PskServer

    def _load(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        if server and "username" in self.props:
            raise QapiError(PSK_USERNAME_ON_SERVER)
        path = self.get_path(PSK_FILE, True)
        assert path is not None
        ctx = self._base_context()
        # TLS 1.2 peers: the PSK suites (Python's default list has none); TLS 1.3
        # uses its own suites, TLS_AES_128_GCM_SHA256 for an external PSK.
        ctx.set_ciphers(PSK_CIPHERS)
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        try:
            if server:
                self.username = None
                self.psk = PskServer(ctx, _server_lookup(path))
                return ctx
            self.username = str(self.props.get("username", PSK_DEFAULT_USERNAME))
            try:
                hexkey = psk_lookup(path, self.username)
            except OSError as exc:
                raise QapiError(PSK_CANNOT_READ % (
                    path, f"Failed to open file \u201c{path}\u201d: {exc.strerror}")) from None
            if hexkey is None:
                raise QapiError(PSK_NO_USERNAME % (self.username, path))
            key = psk_decode(hexkey)
            if key is None:
                raise QapiError(PSK_BAD_KEY)
            # No CA is loaded and the peer must verify: a server that answers with
            # a certificate instead of the key fails, as GnuTLS's PSK-only client.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.psk = PskClient(ctx, self.username, key)
        except PskUnavailable as exc:
            raise QapiError(exc.desc) from None
        return ctx
