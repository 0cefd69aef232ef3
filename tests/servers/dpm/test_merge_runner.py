"""The merge runner: every merge's own exit code, whatever runs beside it; 1,000 DAQs, no false failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import grpc
import pytest

from daqif.testing import wait_for
from daqif.v1 import dpm_pb2, dpm_pb2_grpc
from servers.dpm.merge_launcher import MergeSetup
from servers.dpm.merge_runner import LauncherMergeRunner

from .dpm_helpers import DpmHarness, keyword_source, make_spec, substate, visible_files


def _merge_argv(tmp_path: Path, name: str, valid: bool) -> tuple[list[str], Path]:
    """A keyword-only merge that succeeds, or one whose specification is unreadable (exit 3)."""
    root = tmp_path / name
    root.mkdir()
    spec = root / "specification.json"
    spec.write_text(json.dumps(make_spec(name, [keyword_source()])) if valid else "{not json")
    return [str(spec), "--root", str(root), "--outfile", str(root / f"{name}.h5")], root / "merge.log"


@pytest.mark.parametrize("jobs_per_worker", [None, 2])
def test_concurrent_merges_each_get_their_own_exit_code(tmp_path: Path, jobs_per_worker: int | None) -> None:
    # Starting one merge while others end is where multiprocessing lost exit codes (exit 255);
    # with 2 merges per worker, requests also meet workers being replaced.
    n = 24

    async def main() -> list[int]:
        runner = LauncherMergeRunner(jobs_per_worker)
        runner.warm_up()
        try:
            runs = [_merge_argv(tmp_path, f"M{i:03d}", valid=i % 3 != 0) for i in range(n)]
            codes = []
            for wave in range(0, n, 4):  # 4 at a time, as with max_merges 4
                batch = runs[wave : wave + 4]
                results = await asyncio.gather(*(runner.run(argv, log) for argv, log in batch))
                codes += [r.returncode for r in results]
            return codes
        finally:
            runner.close()

    codes = asyncio.run(main())
    assert codes == [3 if i % 3 == 0 else 0 for i in range(n)]
    for i in range(n):
        assert (tmp_path / f"M{i:03d}" / f"M{i:03d}.h5").is_file() == (i % 3 != 0)


def test_a_failed_merge_reports_its_last_line(tmp_path: Path) -> None:
    async def main() -> tuple[int, str]:
        runner = LauncherMergeRunner()
        try:
            argv, log = _merge_argv(tmp_path, "BAD", valid=False)
            result = await runner.run(argv, log)
            return result.returncode, result.last_error_line
        finally:
            runner.close()

    code, line = asyncio.run(main())
    assert code == 3
    assert line.startswith("daqif-dpm-merge: error: ") and "specification.json" in line


def test_the_merge_process_makes_the_files_of_its_attempt_before_it_merges(tmp_path: Path) -> None:
    # The server no longer makes them in one of its threads: a fresh output directory (what an
    # earlier attempt left is gone), the specification, the earlier report removed, the log header.
    root = tmp_path / "D"
    out = root / "products" / "D"
    out.mkdir(parents=True)
    (out / ".D.h5.part").write_bytes(b"left by a merge cut short")
    report = root / "merge-report.json"
    report.write_text("{}")
    spec = root / "specification.json"
    log = root / "logs" / "merge.log"
    argv = [str(spec), "--root", str(root), "--outfile", str(out / "D.h5")]
    setup = MergeSetup(
        output_dir=str(out),
        spec_path=str(spec),
        specification=json.dumps(make_spec("D", [keyword_source()])),
        header="=== merge attempt 2 at now ===",
        remove=(str(report),),
    )
    (tmp_path / "file").write_text("a file, not a directory")
    broken = MergeSetup(str(tmp_path / "file" / "out"), str(spec), "{}", "=== merge attempt 3 ===")

    async def main() -> tuple[int, int]:
        runner = LauncherMergeRunner()
        try:
            first = await runner.run(argv, log, setup)
            return first.returncode, (await runner.run(argv, log, broken)).returncode
        finally:
            runner.close()

    done, failed = asyncio.run(main())
    assert done == 0
    assert sorted(p.name for p in out.iterdir()) == ["D.h5"]  # the leftover part file is gone
    assert not report.exists()
    assert json.loads(spec.read_text())["id"] == "D"
    lines = log.read_text().splitlines()
    assert lines[0] == "=== merge attempt 2 at now ==="
    assert failed == 1
    last = log.read_text().splitlines()
    assert last[-2] == "=== merge attempt 3 ==="
    assert last[-1].startswith("daqif-dpm-merge: error: cannot prepare the merge: ") and "file" in last[-1]


def test_the_log_header_the_worker_writes_is_not_among_the_merge_error_lines(tmp_path: Path) -> None:
    # A merge that dies without a word must be reported by its exit status, not by the header.
    root = tmp_path / "D"
    (root / "products").mkdir(parents=True)
    spec, log = root / "specification.json", root / "logs" / "merge.log"
    setup = MergeSetup(str(root / "products" / "D"), str(spec), "{not json", "=== merge attempt 1 ===")

    async def main() -> tuple[int, tuple[str, ...]]:
        runner = LauncherMergeRunner()
        try:
            # A specification that fails to parse: exit 3 and its one-line error after the header.
            result = await runner.run([str(spec), "--root", str(root)], log, setup)
            return result.returncode, result.error_lines
        finally:
            runner.close()

    code, lines = asyncio.run(main())
    assert code == 3
    assert "=== merge attempt 1 ===" not in lines and lines[-1].startswith("daqif-dpm-merge: error: ")


def test_a_dead_launcher_fails_its_merges_and_the_next_merge_starts_a_new_one(tmp_path: Path) -> None:
    async def main() -> tuple[str, int]:
        runner = LauncherMergeRunner()
        runner.warm_up()
        try:
            first = runner._launcher
            assert first is not None
            os.kill(first.process.pid, signal.SIGKILL)
            argv, log = _merge_argv(tmp_path, "AFTER", valid=True)
            with pytest.raises(OSError) as failed:
                await runner.run(argv, log)  # sent to the dead launcher, or refused by it
            result = await runner.run(argv, log)
            return str(failed.value), result.returncode
        finally:
            runner.close()

    error, code = asyncio.run(main())
    assert "merge launcher" in error
    assert code == 0


async def _queue_all(address: str, texts: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dpm_pb2_grpc.DpmDaqControlStub(channel)
        todo = iter(texts)

        async def worker() -> None:
            for text in todo:
                await stub.QueueDaq(dpm_pb2.QueueDaqRequest(specification=text))

        await asyncio.gather(*(worker() for _ in range(16)))


def test_a_thousand_small_daqs_with_four_merges_all_complete_without_an_error(dpm: DpmHarness) -> None:
    n = 1000
    server = dpm.start({"max_merges": 4, "max_active_daqs": 16})
    client = dpm.client(server)
    ids = [f"RACE{i:04d}" for i in range(n)]
    asyncio.run(
        _queue_all(
            server.address, [json.dumps(make_spec(i, [keyword_source()], [dpm.receiver])) for i in ids]
        )
    )

    def all_archived() -> bool:
        active = client.get_active_daqs()
        failed = [f"{s.id}: {[a.description for a in s.alerts]}" for s in active if s.error]
        assert not failed, f"DAQs wait with an ERROR alert: {failed[:3]}"
        return not active

    wait_for(all_archived, 600, "every DAQ archived")
    assert visible_files(dpm.receiver) == sorted(f"{i}.product.h5" for i in ids)
    completed = substate("COMPLETED")
    for daq_id in ids:
        final = client.get_daq_status(daq_id, include_archived=True)
        assert (final.substate, final.error, list(final.alerts)) == (completed, False, [])
        record = json.loads((server.workspace / "archive" / daq_id / "daq.json").read_text())
        assert [h["substate"] for h in record["history"]] == [
            "SCHEDULED",
            "COLLECTING",
            "MERGING",
            "RELEASING",
            "COMPLETED",
        ]
        assert record["attempts"] == {"collect": 1, "merge": 1, "release": 1}
        assert [r["outcome"] for r in record["receivers"]] == ["hardlink"]
    assert "merge failed" not in (server.directory / "dpm-server.log").read_text()
