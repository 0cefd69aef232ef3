"""A throw-away certificate authority for tests and trials of TLS (the `tls` fixtures of
`daqif.testing` use it; nothing here is meant for a production PKI).

    ca = ThrowawayCa.create(tmp_path / "pki")
    server = ca.issue("server", hosts=["127.0.0.1", "localhost"])   # server.cert, server.key
    client = ca.issue("client")                                     # a client certificate
    # ca.cert is what a client trusts, and what a server given --tls-client-ca asks clients for

Keys are EC P-256; certificates are valid for one day from a minute ago (so clocks a little apart
agree). Every file is PEM; keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict

VALIDITY = datetime.timedelta(days=1)
"""How long an issued certificate (and the CA's own) is valid."""


class CertificatePair(BaseModel):
    """A certificate and its private key, each a PEM file."""

    model_config = ConfigDict(frozen=True)

    cert: Path
    """The certificate (PEM)."""
    key: Path
    """Its private key (PEM, unencrypted, mode 0600)."""


class ThrowawayCa(BaseModel):
    """A certificate authority living in one directory: `ca.pem` and `ca.key`, and what it issued."""

    model_config = ConfigDict(frozen=True)

    directory: Path
    """Where the CA's files and every issued pair are written."""

    @property
    def cert(self) -> Path:
        """The CA certificate: what a client trusts (`--tls-ca`) and a server asks clients for
        (`--tls-client-ca`)."""
        return self.directory / "ca.pem"

    @property
    def key(self) -> Path:
        """The CA's private key."""
        return self.directory / "ca.key"

    @classmethod
    def create(cls, directory: Path, name: str = "daqif throw-away CA") -> Self:
        """Make a new CA (a fresh key and a self-signed certificate) in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory=directory)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_pair(ca.cert, ca.key, cert, key)
        return ca

    def issue(self, name: str, hosts: Sequence[str] = ()) -> CertificatePair:
        """Issue `name.pem` + `name.key`, signed by this CA.

        With `hosts` (IP addresses or DNS names) it is a server certificate for them; without, a
        client certificate whose common name is `name`.
        """
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{self.key} is not the EC key this CA writes")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
            )
        pair = CertificatePair(cert=self.directory / f"{name}.pem", key=self.directory / f"{name}.key")
        _write_pair(pair.cert, pair.key, builder.sign(ca_key, hashes.SHA256()), key)
        return pair


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + VALIDITY)
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start: a key must never be readable by others, not even for a moment.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
