"""``tls-creds-x509`` and ``tls-creds-psk``: QEMU's properties, file names and
checks, each object ready with the ``ssl.SSLContext`` its endpoint needs.

The files are QEMU's, in ``dir``: ``ca-cert.pem`` (required), ``ca-crl.pem``
(optional), ``server-cert.pem``/``server-key.pem`` (server, required),
``client-cert.pem``/``client-key.pem`` (client, optional), ``keys.psk``
(PSK). A missing required file fails ``object-add`` with QEMU's
``Unable to access credentials PATH: strerror``. ``sanity-check`` (default
on) refuses an expired or not yet active certificate of our own or of the
CA with QEMU's texts; OpenSSL then checks that the key matches the
certificate. ``verify-peer`` (default on): a server asks for and verifies
the client's certificate, a client verifies the server's and its hostname.
GnuTLS's ``priority`` strings mean nothing to OpenSSL: refused, not ignored.
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Any, Final

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
PSK_NO_USERNAME: Final = "Username '%s' not found in PSK file '%s'"
PSK_BAD_KEY: Final = "Invalid hex key for username '%s' in PSK file '%s'"
PRIORITY_NOT_SUPPORTED: Final = ("Property 'priority' is not supported by livemig "
                                 "(a GnuTLS priority string; livemig's TLS is OpenSSL)")
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
        if "priority" in self.props:
            raise QapiError(PRIORITY_NOT_SUPPORTED)
        self.context = self._load()

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


def parse_psk_file(path: str, username: str | None) -> dict[str, bytes]:
    """``keys.psk``: ``username:hexkey`` lines (QEMU's ``qcrypto_tls_creds_psk``); with
    ``username`` (a client), that user's line must be there and its key valid."""
    keys: dict[str, bytes] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            name, sep, hexkey = line.rstrip("\r\n").partition(":")
            if not sep:
                continue
            try:
                keys.setdefault(name, bytes.fromhex(hexkey))
            except ValueError:
                if name == username:
                    raise QapiError(PSK_BAD_KEY % (name, path)) from None
    if username is not None and username not in keys:
        raise QapiError(PSK_NO_USERNAME % (username, path))
    return keys


@register_object_type
class TLSCredsPSK(QCryptoTLSCreds):
    """Pre-shared keys. The object and its file checks are QEMU's; Python 3.11's
    ``ssl`` has no PSK callbacks, so a migration with it is refused (see
    ``migration/tls.py``), never run without the key."""

    qom_type = "tls-creds-psk"
    properties = struct("TlsCredsPskProperties", {
        "*verify-peer": "bool", "*dir": "str", "*endpoint": ENDPOINT, "*priority": "str",
        "*username": "str"})

    def _load(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        if server and "username" in self.props:
            raise QapiError(PSK_USERNAME_ON_SERVER)
        path = self.get_path(PSK_FILE, True)
        assert path is not None
        self.username = None if server else str(self.props.get("username",
                                                                PSK_DEFAULT_USERNAME))
        self.keys = parse_psk_file(path, self.username)
        return self._base_context()
