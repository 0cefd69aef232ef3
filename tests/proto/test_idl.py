"""The IDL in proto/ is the source of truth: it lints clean, the committed stubs match it, and the
names other programs are written against stay pinned."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from daqif.v1 import dpm_pb2, frame_pb2, writer_pb2

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"


def test_buf_lint_passes_on_proto_tree() -> None:
    assert BUF.exists(), "buf is not installed: run tools/setup.sh --test (npm install --prefix tools/buf)"
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_rejects_a_violation(tmp_path: Path) -> None:
    """Guards the lint test itself: a proto breaking the STANDARD rules must fail."""
    module = tmp_path / "proto"
    (module / "daqif" / "v1").mkdir(parents=True)
    (module / "buf.yaml").write_text((ROOT / "proto" / "buf.yaml").read_text())
    (module / "daqif" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage daqif.v1;\nenum Color { RED = 0; }\n'
    )
    result = subprocess.run([str(BUF), "lint"], cwd=module, capture_output=True, text=True)
    assert result.returncode != 0
    assert "RED" in result.stdout + result.stderr


def test_committed_stubs_match_what_the_protos_generate(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen
    spec.loader.exec_module(gen)
    generated = gen.generate(tmp_path)
    assert generated, "nothing was generated"
    committed_dir = ROOT / "src" / "daqif" / "v1"
    stale = [p.name for p in generated if not filecmp.cmp(p, committed_dir / p.name, shallow=False)]
    missing = [p.name for p in generated if not (committed_dir / p.name).exists()]
    extra = sorted(
        p.name for p in committed_dir.glob("*_pb2*") if not (tmp_path / "daqif" / "v1" / p.name).exists()
    )
    assert not (stale or missing or extra), (
        f"stubs out of date (stale {stale}, missing {missing}, extra {extra}): run tools/gen_protos.py"
    )


@pytest.mark.parametrize(
    ("service", "method", "request_type", "response_type", "server_streaming"),
    [
        ("DpmDaqControl", "QueueDaq", "QueueDaqRequest", "DaqReply", False),
        ("DpmDaqControl", "AbortDaq", "AbortDaqRequest", "DaqReply", False),
        ("DpmDaqControl", "RetryMergeDaq", "RetryMergeDaqRequest", "Empty", False),
        ("DpmDaqControl", "GetDaqStatus", "GetDaqStatusRequest", "DaqStatus", False),
        ("DpmDaqControl", "GetActiveDaqs", "GetActiveDaqsRequest", "GetActiveDaqsResponse", False),
        ("DpmDaqControl", "GetInternalDaqStatus", "GetInternalDaqStatusRequest", "InternalDaqStatus", False),
        ("DpmDaqControl", "WatchDaqStatus", "WatchDaqStatusRequest", "DaqStatus", True),
        ("DpmControl", "QueryStorageStatus", "QueryStorageStatusRequest", "StorageStatus", False),
        ("DpmControl", "Exit", "ExitRequest", "ExitResponse", False),
        ("DpmControl", "WatchStorageStatus", "WatchStorageStatusRequest", "StorageStatus", True),
    ],
)
def test_dpm_rpc_signatures_are_pinned(
    service: str, method: str, request_type: str, response_type: str, server_streaming: bool
) -> None:
    rpc = dpm_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert rpc.input_type.name == request_type
    assert rpc.output_type.name == response_type
    assert rpc.server_streaming is server_streaming


def test_dpm_message_fields_are_pinned() -> None:
    fields = {
        m: [f.name for f in dpm_pb2.DESCRIPTOR.message_types_by_name[m].fields]
        for m in ("DaqStatus", "DaqReply", "QueueDaqRequest", "ExitResponse", "StorageStatus", "DaqException")
    }
    assert fields["DaqStatus"][:9] == [
        "id",
        "file_id",
        "state",
        "substate",
        "error",
        "alerts",
        "result",
        "message",
        "timestamp",
    ]
    assert fields["DaqReply"] == ["id", "error"]
    assert fields["QueueDaqRequest"] == ["specification"]
    assert fields["ExitResponse"] == ["message"]
    assert fields["StorageStatus"] == ["path", "capacity", "free", "available", "timestamp"]
    assert fields["DaqException"] == ["id", "message"]


def test_enum_values_end_with_the_seed_names() -> None:
    substates = [v.name for v in dpm_pb2.DaqSubState.DESCRIPTOR.values]
    for seed in (
        "NOT_STARTED",
        "STARTING",
        "ACQUIRING",
        "STOPPING",
        "STOPPED",
        "ABORTING",
        "ABORTED",
        "NOT_SCHEDULED",
        "SCHEDULED",
        "COLLECTING",
        "MERGING",
        "RELEASING",
        "COMPLETED",
    ):
        assert f"DAQ_SUB_STATE_{seed}" in substates
    states = [v.name for v in dpm_pb2.DaqState.DESCRIPTOR.values]
    assert states == [
        "DAQ_STATE_UNDEFINED",
        "DAQ_STATE_ACQUIRING",
        "DAQ_STATE_MERGING",
        "DAQ_STATE_COMPLETED",
    ]


def test_writer_and_frame_interfaces_exist() -> None:
    writer = writer_pb2.DESCRIPTOR.services_by_name["WriterControl"]
    assert {m.name for m in writer.methods} == {
        "GetStatus",
        "GetConfig",
        "SetConfig",
        "GetLogs",
        "GetStats",
        "GetDeploymentStatus",
        "StartWriterAsync",
        "StartWriterSync",
        "StopWriter",
        "WatchStatus",
    }
    header = frame_pb2.FrameHeader.DESCRIPTOR
    assert [f.name for f in header.fields][:7] == [
        "image_id",
        "height",
        "width",
        "dtype",
        "status",
        "compression",
        "timestamp",
    ]
    # dtype numbers are the Standard DAQ codes, so both header forms share one table
    assert frame_pb2.DTYPE_UINT16 == 2 and frame_pb2.DTYPE_FLOAT32 == 24 and frame_pb2.DTYPE_INT64 == 18
