"""The Node.js example client loads proto/ as it is and drives a real DPM server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
from astropy.io import fits

from daqif.testing import DpmServer, write_fits_detector_file

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "node-client" / "dpm-client.js"


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    assert path, "node is required for the second-language client test"
    assert (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").exists(), "run tools/setup.sh --test"
    return path


@pytest.mark.parametrize("source_type", ["hdf5File", "fitsFile"])
def test_node_client_queues_follows_to_completed_and_reads_storage(
    node: str, dpm_server: DpmServer, tmp_path: Path, source_type: str
) -> None:
    if source_type == "hdf5File":
        source = dpm_server.data_root / "raw" / "node.h5"
        with h5py.File(source, "w") as f:
            f["frames"] = list(range(10))
    else:
        source = write_fits_detector_file(dpm_server.data_root / "raw" / "node.fits", chips=1)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "id": "NODE.1",
                "target": {"fileId": "NODE.1"},
                "sources": [
                    {"type": source_type, "sourceName": "det", "location": str(source)},
                    {
                        "type": "fitsKeywords",
                        "sourceName": "tcs",
                        "keywords": [{"type": "esoKeyword", "name": "TEL AIRM START", "value": 1.23456}],
                    },
                ],
                "receivers": [{"type": "olasReceiver", "path": str(dpm_server.receiver_dir)}],
                # DAQIF_DCS defines the DET CHIPn ID of the FITS source's chip extensions.
                "keywordDictionaries": ["ESO-VLT-DIC.DAQIF_TCS", "ESO-VLT-DIC.DAQIF_DCS"],
            }
        )
    )
    result = subprocess.run(
        [node, str(CLIENT), "--address", dpm_server.address, "--spec", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0] == {"event": "queued", "reply": {"id": "NODE.1", "error": False}}
    substates = [e["status"]["substate"] for e in events if e["event"] == "status"]
    assert substates[-1] == "DAQ_SUB_STATE_COMPLETED"
    assert events[-1]["event"] == "storage" and events[-1]["storage"]["capacity"] > 0
    if source_type == "hdf5File":
        with h5py.File(dpm_server.receiver_dir / "NODE.1.h5", "r") as f:
            assert f.attrs["ESO TEL AIRM START"] == 1.235  # the dictionary's Value Format, %.3f
    else:
        header = fits.getheader(dpm_server.receiver_dir / "NODE.1.fits")
        assert header["HIERARCH ESO TEL AIRM START"] == 1.235
        assert header.comments["HIERARCH ESO TEL AIRM START"] == "Airmass at start"


def test_node_client_reports_the_daq_exception_of_a_refused_spec(
    node: str, dpm_server: DpmServer, tmp_path: Path
) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(
        json.dumps(
            {
                "id": "NODE.2",
                "target": {"fileId": "NODE.2"},
                "sources": [{"type": "hdf5File", "sourceName": "det", "location": "relative.h5"}],
            }
        )
    )
    result = subprocess.run(
        [node, str(CLIENT), "--address", dpm_server.address, "--spec", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "DaqException INVALID_ARGUMENT" in result.stderr
    assert 'id="NODE.2"' in result.stderr
    assert "sources[0].location" in result.stderr


def node_spec(server: DpmServer, tmp_path: Path, daq_id: str) -> Path:
    source = server.data_root / "raw" / f"{daq_id}.h5"
    with h5py.File(source, "w") as f:
        f["frames"] = list(range(10))
    spec = tmp_path / f"{daq_id}.json"
    spec.write_text(
        json.dumps(
            {
                "id": daq_id,
                "target": {"fileId": daq_id},
                "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
                "receivers": [{"type": "olasReceiver", "path": str(server.receiver_dir)}],
            }
        )
    )
    return spec


def test_node_client_completes_a_daq_over_mutual_tls_and_is_refused_without_a_certificate(
    node: str, tls_dpm_server: DpmServer, tmp_path: Path
) -> None:
    tls = tls_dpm_server.tls
    assert tls is not None and tls_dpm_server.address.startswith("grpcs://")
    argv = [node, str(CLIENT), "--address", tls_dpm_server.address, "--tls-ca", str(tls.ca_cert)]
    mine = ["--tls-cert", str(tls.client.cert), "--tls-key", str(tls.client.key)]
    spec = node_spec(tls_dpm_server, tmp_path, "NODE.TLS")
    result = subprocess.run([*argv, *mine, "--spec", str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tls_dpm_server.receiver_dir / "NODE.TLS.h5").exists()
    refused = subprocess.run(
        [*argv, "--spec", str(node_spec(tls_dpm_server, tmp_path, "NODE.NOCERT"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr
    assert not (tls_dpm_server.receiver_dir / "NODE.NOCERT.h5").exists()


def test_node_client_names_a_missing_ca_file(node: str, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    result = subprocess.run(
        [node, str(CLIENT), "--tls-ca", str(missing), "--spec", str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot read the CA certificate {missing}: ENOENT")
