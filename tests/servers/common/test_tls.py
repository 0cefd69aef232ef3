"""TLS and mutual TLS of the gRPC servers: real DPM and writer processes on loopback, certificates
from a throw-away CA made in the test; a client without the right certificate is refused, and a
certificate or key that cannot be used stops a server with one line naming the file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daqif.certificates import ThrowawayCa
from daqif.dpm_client import AsyncDpmClient, DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.testing import DpmServer, TlsFiles
from daqif.tls import TlsConfig
from daqif.writer_client import WriterClient
from servers.common.launch import DpmOptions, DpmProcess, SimOptions, SimProcess, WriterOptions, WriterProcess
from servers.common.tls import ServerTls


@pytest.fixture
def tls_only_dpm(tmp_path: Path, tls_files: TlsFiles) -> Iterator[DpmProcess]:
    """A DPM serving TLS without asking clients for a certificate."""
    tls = ServerTls(cert=tls_files.server.cert, key=tls_files.server.key)
    options = DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,), tls=tls)
    with DpmProcess(options, log_file=tmp_path / "dpm.log") as dpm:
        yield dpm


def refused(client: DpmClient) -> DaqException:
    with pytest.raises(DaqException) as caught:
        client.query_storage_status()
    return caught.value


def test_a_tls_dpm_prints_grpcs_and_answers_a_client_trusting_its_ca(
    tls_only_dpm: DpmProcess, tls_files: TlsFiles
) -> None:
    assert tls_only_dpm.address.startswith("grpcs://127.0.0.1:")
    assert tls_only_dpm.ready.endpoint("grpc").tls
    with DpmClient(tls_only_dpm.address, tls=TlsConfig(ca=tls_files.ca_cert)) as client:
        assert client.tls
        assert client.query_storage_status().capacity > 0


def test_a_tls_dpm_refuses_a_plain_text_client(tls_only_dpm: DpmProcess) -> None:
    host_port = tls_only_dpm.address.removeprefix("grpcs://")
    with DpmClient(host_port, timeout=5) as client:
        assert not client.tls
        assert refused(client).code == ErrorCode.UNAVAILABLE


def test_a_client_trusting_another_ca_refuses_the_server(tls_only_dpm: DpmProcess, tmp_path: Path) -> None:
    stranger = ThrowawayCa.create(tmp_path / "stranger")
    with DpmClient(tls_only_dpm.address, timeout=5, tls=TlsConfig(ca=stranger.cert)) as client:
        assert refused(client).code == ErrorCode.UNAVAILABLE


def test_mutual_tls_answers_the_client_certificate_its_ca_signed(tls_dpm_server: DpmServer) -> None:
    assert tls_dpm_server.client.query_storage_status().capacity > 0


def test_mutual_tls_refuses_a_client_without_a_certificate(
    tls_dpm_server: DpmServer, tls_files: TlsFiles
) -> None:
    with DpmClient(tls_dpm_server.address, timeout=5, tls=TlsConfig(ca=tls_files.ca_cert)) as client:
        assert refused(client).code == ErrorCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(
    tls_dpm_server: DpmServer, tls_files: TlsFiles, tmp_path: Path
) -> None:
    impostor = ThrowawayCa.create(tmp_path / "impostor").issue("client")
    tls = TlsConfig(ca=tls_files.ca_cert, cert=impostor.cert, key=impostor.key)
    with DpmClient(tls_dpm_server.address, timeout=5, tls=tls) as client:
        assert refused(client).code == ErrorCode.UNAVAILABLE


def test_the_asyncio_client_speaks_mutual_tls(tls_dpm_server: DpmServer, tls_files: TlsFiles) -> None:

    async def capacity() -> int:
        async with AsyncDpmClient(tls_dpm_server.address, tls=tls_files.client_tls) as client:
            return int((await client.query_storage_status()).capacity)

    assert asyncio.run(capacity()) > 0


def test_the_writer_serves_grpc_over_mutual_tls_and_refuses_a_client_without_a_certificate(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    with SimProcess(SimOptions(shape=(8, 8), rate=10, linger=0)) as sim:
        options = WriterOptions(stream=sim.endpoint, data_root=tmp_path / "data", tls=tls_files.server_tls)
        with WriterProcess(options, log_file=tmp_path / "writer.log") as writer:
            assert writer.grpc_address.startswith("grpcs://")
            assert writer.rest_url.startswith("http://")  # REST stays plain HTTP
            with WriterClient(writer.grpc_address, tls=tls_files.client_tls) as client:
                assert client.get_status().state
            without = TlsConfig(ca=tls_files.ca_cert)
            with WriterClient(writer.grpc_address, timeout=5, tls=without) as client:
                with pytest.raises(DaqException) as caught:
                    client.get_status()
                assert caught.value.code == ErrorCode.UNAVAILABLE


def dpm_server(tmp_path: Path, *tls_flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "servers.dpm.main", "--port", "0", "--workspace", str(tmp_path / "ws")]
    return subprocess.run([*argv, *tls_flags], capture_output=True, text=True, timeout=60)


def test_a_missing_certificate_stops_the_dpm_with_one_line_naming_it(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    missing = tmp_path / "nowhere.pem"
    result = dpm_server(tmp_path, "--tls-cert", str(missing), "--tls-key", str(tls_files.server.key))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"daqif-dpm-server: cannot read the certificate {missing}: No such file or directory"
    )
    assert not (tmp_path / "ws").exists()


def test_a_key_of_another_certificate_stops_the_dpm_naming_both(tmp_path: Path, tls_files: TlsFiles) -> None:
    result = dpm_server(
        tmp_path, "--tls-cert", str(tls_files.server.cert), "--tls-key", str(tls_files.client.key)
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"daqif-dpm-server: the private key {tls_files.client.key} does not belong to the certificate "
        f"{tls_files.server.cert}"
    )


def test_an_unreadable_client_ca_stops_the_writer_naming_it(tmp_path: Path, tls_files: TlsFiles) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    argv = [sys.executable, "-m", "servers.writer.main", "--stream", "tcp://127.0.0.1:1"]
    argv += ["--data-root", str(tmp_path / "data"), "--rest-port", "0", "--grpc-port", "0"]
    argv += tls_files.server_tls.model_copy(update={"client_ca": garbage}).flags()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"daqif-writer: the client CA {garbage} is not a PEM certificate"


def test_a_client_ca_without_a_certificate_is_a_usage_error(tmp_path: Path, tls_files: TlsFiles) -> None:
    result = dpm_server(tmp_path, "--tls-client-ca", str(tls_files.ca_cert))
    assert result.returncode == 2
    assert result.stderr.strip() == "daqif-dpm-server: --tls-client-ca needs --tls-cert and --tls-key"


def test_tls_options_become_the_server_flags(tls_files: TlsFiles) -> None:
    argv = DpmOptions(tls=tls_files.server_tls).command()
    assert argv[-6:] == [
        "--tls-cert",
        str(tls_files.server.cert),
        "--tls-key",
        str(tls_files.server.key),
        "--tls-client-ca",
        str(tls_files.ca_cert),
    ]
    assert "--tls-cert" not in DpmOptions().command()
