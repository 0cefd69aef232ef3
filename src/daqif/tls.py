"""Transport security of the gRPC clients: which certificates a client trusts and shows.

    with DpmClient("127.0.0.1:12083", tls=TlsConfig(ca=Path("ca.pem"))) as dpm: ...          # TLS
    tls = TlsConfig(ca=Path("ca.pem"), cert=Path("me.pem"), key=Path("me.key"))             # mutual TLS

An address written `grpcs://HOST:PORT` (as a TLS server prints it in its ready line) asks for TLS
too; without a `ca` the system's trusted roots are used. Every file is read when the credentials are
made, and a file that is missing, unreadable or not what it should be (or a key that does not
belong to its certificate) raises `TlsError` with one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

# cryptography (~0.3 s to import) is imported where a certificate or key is read: a server or
# client without TLS does not pay for it.

TLS_SCHEME = "grpcs://"
"""The scheme of a gRPC address served over TLS (ready lines print it; clients accept it)."""


class TlsError(ValueError):
    """A certificate or key file cannot be used; the message is one line naming the file."""


class TlsConfig(BaseModel):
    """A client's TLS: the CA it trusts and, for mutual TLS, the certificate it shows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: Path | None = None
    """CA certificate(s) the server's certificate must chain to (PEM); `None`: the system's roots."""
    cert: Path | None = None
    """The client's own certificate (PEM), for a server that asks for one (mutual TLS)."""
    key: Path | None = None
    """The private key of `cert` (PEM, unencrypted)."""

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both or neither")
        return self

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials; `TlsError` naming the file that cannot be used."""
        ca = read_certificates(self.ca, "CA certificate") if self.ca is not None else None
        cert = key = None
        if self.cert is not None and self.key is not None:
            cert, key = read_matching_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def split_address(address: str) -> tuple[str, bool]:
    """`grpcs://HOST:PORT` → (`HOST:PORT`, True); any other address → (it, False)."""
    if address.startswith(TLS_SCHEME):
        return address.removeprefix(TLS_SCHEME), True
    return address, False


def tls_address(host_port: str) -> str:
    """The address of a TLS gRPC endpoint as a ready line prints it."""
    return TLS_SCHEME + host_port


def read_file(path: Path, what: str) -> bytes:
    """The bytes of `path`; `TlsError` "cannot read the WHAT PATH: why" otherwise."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def read_certificates(path: Path, what: str) -> bytes:
    """The PEM bytes of `path`, checked to hold at least one certificate (and only certificates)."""
    from cryptography import x509

    data = read_file(path, what)
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except ValueError:
        raise TlsError(f"the {what} {path} is not a PEM certificate") from None
    return data


def read_private_key(path: Path, what: str) -> tuple[bytes, PrivateKeyTypes]:
    """The PEM bytes of `path` and the key they hold (unencrypted)."""
    from cryptography.hazmat.primitives import serialization

    data = read_file(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(f"the {what} {path} is encrypted; give an unencrypted key") from None
    except ValueError:
        raise TlsError(f"the {what} {path} is not a PEM private key") from None
    return data, key


def read_matching_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM), checked to belong together.

    gRPC itself would only fail later, and with a message that does not name the files.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain = read_certificates(cert_path, "certificate")
    key_pem, key = read_private_key(key_path, "private key")
    leaf = x509.load_pem_x509_certificates(chain)[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise TlsError(f"the private key {key_path} does not belong to the certificate {cert_path}")
    return chain, key_pem
