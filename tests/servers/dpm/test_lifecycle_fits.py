"""FITS products through a real DPM server: ESO's specification shape with a remote FITS source
(rsync through the remote-shell shim), retry after a missing FITS source, kill -9 during a FITS
merge, refusals at QueueDaq."""

from __future__ import annotations

import os
import subprocess

from astropy.io import fits

from daqif.errors import ErrorCode
from daqif.testing import fits_file_source, wait_for, write_fits_detector_file
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    error_of,
    freeze_running_merge,
    hdf5_source,
    make_spec,
    visible_files,
    wait_alert,
    wait_archived,
)
from .fits_samples import EXPECTED_CARDS, OCM, eso_spec, raw_hdus, write_dcs, write_fcs


def test_eso_example_with_a_remote_fits_source_completes_with_a_valid_fits_product(
    dpm: DpmHarness, remote_shell: str
) -> None:
    dcs = write_dcs(dpm.data / "dcs" / "dcs.fits")
    remote_dir = dpm.base / "fcs-host"  # outside the allowed roots: reached through rsync only
    fcs = write_fcs(remote_dir / "fcs.fits")
    server = dpm.start({"rsync_remote_shell": remote_shell})
    client = dpm.client(server)
    client.queue_daq(eso_spec("ESO.2026-11-22T10:00:00.000", dcs, f"fcs-host:{fcs}", [str(dpm.receiver)]))

    record = wait_archived(client, server, "ESO.2026-11-22T10:00:00.000")
    assert record["substate"] == "COMPLETED"
    assert [(s["source_name"], s["outcome"]) for s in record["sources"]] == [
        ("dcs", "copied"),
        ("fcs", "rsync"),
    ]
    product = dpm.receiver / "ESO.2026-11-22T10:00:00.000.fits"
    assert visible_files(dpm.receiver) == [product.name]
    header = fits.getheader(product)
    assert [c.keyword for c in header.cards][4:] == [k for k, _ in EXPECTED_CARDS]
    assert header["ARCFILE"] == product.name
    assert [name for name, _, _ in raw_hdus(product)] == ["PRIMARY", "CHIP1", "CHIP2", "CHIP1"]
    sources = raw_hdus(dcs)[1:] + raw_hdus(fcs)[1:]
    assert [data for _, _, data in raw_hdus(product)[1:]] == [data for _, _, data in sources]
    assert verify(product).ok
    done = subprocess.run(["fitsverify", "-q", str(product)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_a_missing_fits_source_waits_for_retry_then_completes_with_an_unmerged_warning(
    dpm: DpmHarness,
) -> None:
    fcs = dpm.data / "late" / "fcs.fits"
    server = dpm.start()
    client = dpm.client(server)
    spec = {"id": "LATE1", "target": {"fileId": "LATE1"}, "sources": [OCM, fits_file_source("fcs", fcs)]}
    spec["receivers"] = [{"type": "olasReceiver", "path": str(dpm.receiver)}]
    client.queue_daq(spec)
    status = wait_alert(client, "LATE1", "collecting:fcs")
    assert "does not exist" in next(a.description for a in status.alerts if a.id == "collecting:fcs")

    write_fcs(fcs, primary_data=True)  # the primary data cannot be merged: a warning, not an error
    client.retry_merge_daq("LATE1")
    record = wait_archived(client, server, "LATE1")
    assert record["substate"] == "COMPLETED"
    (alert,) = [a for a in record["alerts"] if a["id"] == "unmerged:fcs"]
    assert alert["severity"] == "WARNING" and "primary HDU" in alert["description"]
    assert verify(dpm.receiver / "LATE1.fits").ok


REFUSED = [
    (
        [fits_file_source("fcs", "/x/fcs.fits"), hdf5_source("det", "/x/det.h5")],
        "mixes hdf5File (sources[1] 'det') and fitsFile (sources[0] 'fcs')",
    ),
    (
        [
            {
                "type": "fitsKeywords",
                "sourceName": "tcs",
                "keywords": [
                    {"type": "esoKeyword", "name": "TEL " + "ABCDEFGHIJ " * 5 + "X", "value": 1.5e-300}
                ],
            },
            fits_file_source("fcs", "fcs-host:/x/fcs.fits"),
        ],
        "sources[0] 'tcs' keywords[0] 'ESO TEL ABCDEFGHIJ",
    ),
]


def test_queue_daq_refuses_a_mixed_or_unrepresentable_fits_specification(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    for sources, problem in REFUSED:
        document = make_spec("BAD1", sources)
        error = error_of(lambda: client.queue_daq(document))  # noqa: B023 (called at once)
        assert error.code is ErrorCode.INVALID_ARGUMENT
        assert problem in str(error)
    assert client.get_active_daqs() == []


def test_kill_9_while_the_fits_merge_process_runs_then_the_product_is_released_once_and_valid(
    dpm: DpmHarness,
) -> None:
    # The merge is frozen (SIGSTOP) once it writes to merge.log, then the server is killed.
    dcs = write_fits_detector_file(dpm.data / "big.fits", chips=8, shape=(1024, 2048), seed=3)
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(eso_spec("FKILL", dcs, write_fcs(dpm.data / "fcs.fits"), [str(dpm.receiver)]))

    wait_for(lambda: freeze_running_merge(server.pid), 60, "a running FITS merge")
    server.kill()
    server.start()
    record = wait_archived(client, server, "FKILL")
    assert record["substate"] == "COMPLETED"
    assert record["attempts"]["merge"] == 2
    assert visible_files(dpm.receiver) == ["FKILL.fits"]  # no duplicate, no temporary file
    product = server.workspace / "products" / "FKILL" / "FKILL.fits"
    assert os.listdir(product.parent) == [product.name]  # the cut-short part file is gone
    assert os.stat(product).st_nlink == 2  # the workspace and the one receiver: released once
    assert verify(dpm.receiver / "FKILL.fits").ok
    assert [name for name, _, _ in raw_hdus(dpm.receiver / "FKILL.fits")][:3] == ["PRIMARY", "CHIP1", "CHIP2"]
