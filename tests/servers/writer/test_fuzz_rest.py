"""schemathesis against a real writer's REST API, driven by the writer's own `/openapi.json`.

Every operation gets generated requests, both of its declared shape and not. No answer may be a
5xx, and answers must conform to what the schema says. Afterwards the writer is READY again (the
config it had restored) and a real write of frames from the simulator completes in full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from daqif.testing import wait_for
from servers.common.launch import WriterProcess

from .conftest import DETECTOR_NAME, rest_status

EXAMPLES_PER_OPERATION = 40
N_FRAMES = 20


def test_generated_requests_never_get_a_server_error_and_the_writer_still_writes(
    writer: WriterProcess, data_root: Path
) -> None:
    base = writer.rest_url
    config_before = requests.get(base + "/daq/config", timeout=10).json()["config"]
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the writer's OpenAPI has an invalid operation: {result.err()}"
        operations.append(result.ok())
    assert {op.path for op in operations} >= {"/writer/status", "/writer/write_async", "/daq/config"}
    session = requests.Session()
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def call(case: Any) -> None:
            # A sync write that got through waits for its frames: bounded by the request timeout.
            response = case.call(base_url=base, session=session, timeout=30)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            if response.status_code < 300 and case.operation.path.startswith("/writer/write"):
                session.post(base + "/writer/stop", json={}, timeout=30)  # the next request finds it READY

        call()

    session.post(base + "/writer/stop", json={}, timeout=30)
    restored = requests.post(base + "/daq/config", json=config_before, timeout=30).json()
    assert restored["status"] == "ok", restored
    assert requests.get(base + "/daq/config", timeout=10).json()["config"] == config_before
    wait_for(lambda: rest_status(writer)["state"] == "READY", timeout=60)
    output = data_root / "after-fuzz.h5"
    answer = requests.post(
        base + "/writer/write_sync", json={"output_file": str(output), "n_images": N_FRAMES}, timeout=120
    ).json()
    assert answer["status"] == "ok", answer
    with h5py.File(output, "r") as f:
        assert f[f"{DETECTOR_NAME}/data"].shape[0] == N_FRAMES
        assert len(set(f[f"{DETECTOR_NAME}/image_id"][:].tolist())) == N_FRAMES
