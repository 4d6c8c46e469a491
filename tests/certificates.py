"""Certificates for the TLS tests, made on the spot with ``cryptography``.

A CA; a server certificate it signed for 127.0.0.1 and localhost; a client
certificate it signed; and a client certificate signed by another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Files:
    """Paths of PEM files: each certificate and its key, apart."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: Signed by :attr:`ca`, with no subjectAltName and no extended key usage.
    bare_cert: Path
    bare_key: Path
    #: Signed by another CA than :attr:`ca`.
    stranger_cert: Path
    stranger_key: Path
    other_ca: Path


def _key() -> _Key:
    # Elliptic-curve keys: made in microseconds, where RSA takes a while.
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    name: str, key: _Key, issuer: Optional[tuple[x509.Certificate, _Key]] = None,
    server: bool = False, bare: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    elif bare:
        pass  # as `openssl x509 -req` makes one by default: no names, no purpose
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            ]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: _Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make(directory: Path) -> Files:
    """Write a fresh set of certificates and keys into ``directory``."""
    ca_key, other_key = _key(), _key()
    ca = _certificate("mqmq test CA", ca_key)
    other = _certificate("someone else's CA", other_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _certificate("localhost", server_key, (ca, ca_key), server=True)
    client = _certificate("client", client_key, (ca, ca_key))
    stranger = _certificate("stranger", stranger_key, (other, other_key))
    bare_key = _key()
    bare = _certificate("127.0.0.1", bare_key, (ca, ca_key), bare=True)
    return Files(
        ca=_write(directory / "ca.pem", _cert_pem(ca)),
        server_cert=_write(directory / "server.pem", _cert_pem(server)),
        server_key=_write(directory / "server.key", _key_pem(server_key)),
        client_cert=_write(directory / "client.pem", _cert_pem(client)),
        client_key=_write(directory / "client.key", _key_pem(client_key)),
        bare_cert=_write(directory / "bare.pem", _cert_pem(bare)),
        bare_key=_write(directory / "bare.key", _key_pem(bare_key)),
        stranger_cert=_write(directory / "stranger.pem", _cert_pem(stranger)),
        stranger_key=_write(directory / "stranger.key", _key_pem(stranger_key)),
        other_ca=_write(directory / "other-ca.pem", _cert_pem(other)),
    )
