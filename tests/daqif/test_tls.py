"""The client side of TLS: `TlsConfig` names a file it cannot use in one line, `grpcs://`
addresses ask for TLS, and the throw-away CA issues what a TLS handshake needs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from pydantic import ValidationError

from daqif.certificates import ThrowawayCa
from daqif.dpm_client import DpmClient
from daqif.tls import TlsConfig, TlsError, split_address


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path / "pki")


def test_a_grpcs_address_asks_for_tls_and_loses_its_scheme() -> None:
    assert split_address("grpcs://127.0.0.1:5000") == ("127.0.0.1:5000", True)
    assert split_address("127.0.0.1:5000") == ("127.0.0.1:5000", False)


def test_a_client_certificate_without_its_key_is_refused(ca: ThrowawayCa) -> None:
    with pytest.raises(ValidationError, match="give both or neither"):
        TlsConfig(ca=ca.cert, cert=ca.cert)


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(TlsError) as caught:
        DpmClient("127.0.0.1:1", tls=TlsConfig(ca=missing))
    assert str(caught.value) == f"cannot read the CA certificate {missing}: No such file or directory"


def test_a_key_given_as_certificate_is_named(ca: ThrowawayCa) -> None:
    pair = ca.issue("client")
    with pytest.raises(TlsError) as caught:
        TlsConfig(ca=ca.cert, cert=pair.key, key=pair.key).channel_credentials()
    assert str(caught.value) == f"the certificate {pair.key} is not a PEM certificate"


def test_a_key_of_another_certificate_is_named(ca: ThrowawayCa) -> None:
    mine, other = ca.issue("mine"), ca.issue("other")
    with pytest.raises(TlsError) as caught:
        TlsConfig(cert=mine.cert, key=other.key).channel_credentials()
    assert str(caught.value) == f"the private key {other.key} does not belong to the certificate {mine.cert}"


def test_the_ca_issues_server_certificates_for_the_hosts_given_and_private_keys(ca: ThrowawayCa) -> None:
    server = ca.issue("server", hosts=["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert.read_bytes()))
    assert stat.S_IMODE(server.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
