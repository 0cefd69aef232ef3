"""The client TLS flags of the `daqif` commands that speak gRPC: `--tls-ca`, `--tls-cert`, `--tls-key`."""

from __future__ import annotations

import argparse
from pathlib import Path

from daqif.tls import TlsConfig


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the client TLS flags; without them the channel is plain text (unless the address is
    written `grpcs://HOST:PORT`)."""
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="use TLS, trusting the server certificates this CA signed"
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="client certificate for mutual TLS (with --tls-key)"
    )
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert")


def client_tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS the flags ask for (`None`: none given); `ValueError` with one line for a half pair."""
    ca: Path | None = args.tls_ca
    cert: Path | None = args.tls_cert
    key: Path | None = args.tls_key
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both")
    return TlsConfig(ca=ca, cert=cert, key=key)
