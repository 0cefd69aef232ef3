"""The defaults every daqif program agrees on: where servers listen and what the embedded detector is.

Clients, servers, `daqif serve` and the pytest plugin all read these; a port or detector default
written anywhere else is a bug.
"""

from __future__ import annotations

HOST = "127.0.0.1"
"""Servers bind loopback unless told otherwise."""

DPM_PORT = 12083
"""gRPC `DpmControl` + `DpmDaqControl` of `daqif-dpm-server`."""
WRITER_GRPC_PORT = 12084
"""gRPC `WriterControl` of `daqif-writer`."""
WRITER_REST_PORT = 5000
"""Standard DAQ REST API of `daqif-writer` (the port the published `std_daq_client` examples use)."""
SIM_STREAM_PORT = 12085
"""ZeroMQ endpoint port of the detector simulator under `daqif serve --simulate`."""
DPM_METRICS_PORT = 12086
"""Prometheus `/metrics` of the DPM under `daqif serve` (the bare server serves none by default)."""
WEB_PORT = 8080
"""The status page (`daqif web`, `daqif serve`)."""

DPM_ADDRESS = f"{HOST}:{DPM_PORT}"
WRITER_GRPC_ADDRESS = f"{HOST}:{WRITER_GRPC_PORT}"
WRITER_REST_URL = f"http://{HOST}:{WRITER_REST_PORT}"

# The embedded detector (`daqif serve`, `daqif demo`, the writer's config when none is given).
DETECTOR_NAME = "SIM1"
DETECTOR_TYPE = "eiger"
BIT_DEPTH = 16
IMAGE_PIXEL_HEIGHT = 512
IMAGE_PIXEL_WIDTH = 512
