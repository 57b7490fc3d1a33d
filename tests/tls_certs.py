"""Test X.509 credentials made on the spot with ``cryptography`` (never checked in).

:func:`make_pki` writes QEMU's layout: ``<root>/server/{ca-cert,server-cert,
server-key}.pem`` and ``<root>/client/{ca-cert,client-cert,client-key}.pem``,
plus whatever variant a test asks for (an expired client, a server whose
names do not match, credentials from another CA). :func:`write_psk_dir`
writes a ``tls-creds-psk`` dir (``keys.psk``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The client's DN as QEMU 10.0.2 (GnuTLS's gnutls_x509_crt_get_dn2) prints it for
# tls-authz: the certificate's own RDN order, C first here.
CLIENT_DN = "C=GB,O=livemig tests,CN=livemig-client"
SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass
class Pki:
    root: Path
    server: Path        # tls-creds-x509 endpoint=server dir
    client: Path        # tls-creds-x509 endpoint=client dir


def _name(cn: str, org: str = "livemig tests") -> x509.Name:
    # ASN.1 order C, O, CN (QEMU's tls-authz identity is "C=GB,O=...,CN=...").
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _times(expired: bool) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        return now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)


def make_ca(cn: str = "livemig test CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    start, end = _times(False)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_cert(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, *,
              server: bool, names: tuple[str, ...] = (), expired: bool = False,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    start, end = _times(expired)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names:
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_dir(path: Path, ca_cert: x509.Certificate, role: str,
              pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "ca-cert.pem").write_bytes(_pem(ca_cert))
    if pair is not None:
        (path / f"{role}-cert.pem").write_bytes(_pem(pair[0]))
        key_path = path / f"{role}-key.pem"
        key_path.write_bytes(_pem_key(pair[1]))
        key_path.chmod(0o600)
    return path


def make_pki(root: Path, *, server_names: tuple[str, ...] = SERVER_NAMES,
             client_cn: str = "livemig-client") -> Pki:
    """A CA, a server certificate for ``server_names``, a client certificate."""
    ca = make_ca()
    root.mkdir(parents=True, exist_ok=True)
    (root / "ca-key.pem").write_bytes(_pem_key(ca[1]))
    server = make_cert(ca, "livemig-server", server=True, names=server_names)
    client = make_cert(ca, client_cn, server=False)
    return Pki(root, write_dir(root / "server", ca[0], "server", server),
               write_dir(root / "client", ca[0], "client", client))


def client_dir_variant(root: Path, pki: Pki, name: str, *, other_ca: bool = False,
                       expired: bool = False, cn: str = "livemig-client") -> Path:
    """A client dir trusting ``pki``'s CA whose own certificate is odd in one way:
    signed by another CA, or expired."""
    ca_cert = x509.load_pem_x509_certificate((pki.client / "ca-cert.pem").read_bytes())
    if other_ca:
        signer = make_ca("some other CA")
    else:
        ca_key = serialization.load_pem_private_key(
            (pki.root / "ca-key.pem").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        signer = (ca_cert, ca_key)
    pair = make_cert(signer, cn, server=False, expired=expired)
    return write_dir(root / name, ca_cert, "client", pair)


def write_psk_dir(path: Path, keys: dict[str, str]) -> Path:
    """A ``tls-creds-psk`` dir: ``keys.psk`` with one ``username:hexkey`` line each."""
    path.mkdir(parents=True, exist_ok=True)
    key_path = path / "keys.psk"
    key_path.write_text("".join(f"{user}:{key}\n" for user, key in keys.items()))
    key_path.chmod(0o600)
    return path
