"""Transport security of every daqif gRPC server: `--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]`.

Without the flags a server listens in plain text as before. With `--tls-cert` and `--tls-key` it
serves TLS only; with `--tls-client-ca` too, it asks every client for a certificate signed by that CA
and refuses a client without one (mutual TLS). A TLS server's ready line writes its gRPC address as
`grpcs://HOST:PORT`. The files are read and checked (a key that does not belong to the certificate
included) before the port is bound, and a bad one stops the server with one line naming it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict

from daqif.tls import TlsError, read_certificates, read_matching_pair

__all__ = ["ServerTls", "TlsError", "add_tls_arguments", "security_of", "tls_from_args"]


class ServerTls(BaseModel):
    """The certificate a server shows and, for mutual TLS, the CA its clients' certificates must
    chain to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: Path
    """The server's certificate chain (PEM), its subject alternative names covering the host clients
    connect to."""
    key: Path
    """The private key of `cert` (PEM, unencrypted)."""
    client_ca: Path | None = None
    """Require client certificates signed by this CA (PEM): mutual TLS. `None`: any client."""

    def credentials(self) -> grpc.ServerCredentials:
        """The gRPC server credentials; `TlsError` naming the file that cannot be used."""
        chain, key = read_matching_pair(self.cert, self.key)
        client_ca = read_certificates(self.client_ca, "client CA") if self.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def flags(self) -> list[str]:
        """These settings as server command-line flags."""
        argv = ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        if self.client_ca is not None:
            argv += ["--tls-client-ca", str(self.client_ca)]
        return argv


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--tls-cert`, `--tls-key` and `--tls-client-ca` to a server's parser."""
    group = parser.add_argument_group(
        "transport security (gRPC)",
        "Without these flags gRPC is plain text. With --tls-cert and --tls-key it is TLS only "
        "(the ready line prints grpcs://HOST:PORT); --tls-client-ca makes it mutual TLS.",
    )
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate chain (PEM)")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert (PEM)")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )


def tls_from_args(args: argparse.Namespace) -> ServerTls | None:
    """The TLS the flags ask for (`None`: plain text); `TlsError` for an incomplete set."""
    cert: Path | None = args.tls_cert
    key: Path | None = args.tls_key
    client_ca: Path | None = args.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise TlsError("--tls-cert and --tls-key go together: give both")
    return ServerTls(cert=cert, key=key, client_ca=client_ca)


def security_of(tls: ServerTls | None) -> str:
    """ "plain text", "TLS" or "mutual TLS", for a server's log."""
    if tls is None:
        return "plain text"
    return "mutual TLS" if tls.client_ca is not None else "TLS"
