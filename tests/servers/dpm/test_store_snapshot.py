"""The snapshot: one file of every active record, written by the checkpoint; start-up reads it and
replays only the journals after it; a `kill -9` at any point (during its write too) loses nothing
acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from servers.dpm.model import SubState
from servers.dpm.store import SNAPSHOT_FILE, SNAPSHOT_TEMP, SnapshotUnreadable, Workspace

from .test_store import record, snapshot_ids

# A child process that changes records as fast as it can with a checkpoint every 5 lines, over
# 2,000 other active records (so a snapshot of ~1 MB is being written most of the time), and
# prints each change once it is acknowledged: `<id> <substate>`.
CHURN = r"""
import asyncio, json, sys
from pathlib import Path
from servers.dpm import store
from servers.dpm.model import DaqRecord, SubState
store.JOURNAL_CHECKPOINT_LINES = 5

def record(daq_id, seq, substate=SubState.SCHEDULED):
    r = DaqRecord(id=daq_id, file_id=daq_id, seq=seq, specification=json.dumps({"id": daq_id}) + " " * 300)
    r.substate = substate
    return r

async def main():
    ws = store.Workspace(Path(sys.argv[1]))
    ws.load()
    await asyncio.gather(*(ws.create(record(f"BULK{i}", i)) for i in range(2000)))
    print("bulk", flush=True)
    for i in range(100000):
        daq_id, seq = f"D{i}", 10000 + i
        await ws.create(record(daq_id, seq))
        print(daq_id, "SCHEDULED", flush=True)
        await ws.save(record(daq_id, seq, SubState.COLLECTING))
        print(daq_id, "COLLECTING", flush=True)
        if i % 3 == 0:
            await ws.archive(record(daq_id, seq, SubState.COMPLETED))
            print(daq_id, "COMPLETED", flush=True)

asyncio.run(main())
"""

ORDER = [SubState.SCHEDULED, SubState.COLLECTING, SubState.COMPLETED]


def churn_then_kill(root: Path, acknowledged: int) -> dict[str, SubState]:
    """Run CHURN on `root`, `kill -9` it after `acknowledged` acknowledged changes; return each
    DAQ's last acknowledged substate."""
    child = subprocess.Popen([sys.executable, "-c", CHURN, str(root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "bulk\n"
    last: dict[str, SubState] = {}
    try:
        for _ in range(acknowledged):
            daq_id, substate = child.stdout.readline().split()
            last[daq_id] = SubState(substate)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return last


@pytest.mark.parametrize("acknowledged", [37, 151, 402])
def test_kill_9_at_any_point_of_the_checkpoints_loses_no_acknowledged_change(
    tmp_path: Path, acknowledged: int
) -> None:
    last = churn_then_kill(tmp_path, acknowledged)
    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    active = {r.id: r.substate for r in loaded.active}
    assert {f"BULK{i}" for i in range(2000)} <= active.keys()
    for daq_id, substate in last.items():
        found = SubState.COMPLETED if daq_id in loaded.archived else active[daq_id]
        # A change written but not yet acknowledged may be there too: never an older state.
        assert ORDER.index(found) >= ORDER.index(substate), daq_id
    # The checkpoint after the replay wrote a snapshot that holds the same state.
    assert snapshot_ids(tmp_path) == sorted(active)
    again = Workspace(tmp_path)
    reloaded = again.load()
    again.close()
    assert {r.id: r.substate for r in reloaded.active} == active


def test_a_snapshot_torn_by_a_crash_during_its_write_leaves_the_old_snapshot_and_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers.dpm import store

    monkeypatch.setattr(store, "JOURNAL_CHECKPOINT_LINES", 2)

    async def changes() -> None:
        ws = Workspace(tmp_path)
        ws.load()
        await ws.create(record("A", 1))
        await ws.create(record("B", 2))  # the journal is full: a checkpoint writes the snapshot
        await ws.create(record("C", 3))
        ws.close()

    import asyncio

    asyncio.run(changes())
    assert snapshot_ids(tmp_path) == ["A", "B"]
    # As after a kill -9 during the next checkpoint's write: half a new snapshot beside the old one.
    old = (tmp_path / SNAPSHOT_FILE).read_bytes()
    (tmp_path / SNAPSHOT_TEMP).write_bytes(old[: len(old) // 2])
    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    assert [r.id for r in loaded.active] == ["A", "B", "C"]
    assert snapshot_ids(tmp_path) == ["A", "B", "C"]  # the checkpoint after the replay
    assert not (tmp_path / SNAPSHOT_TEMP).exists()  # the torn one was replaced, then renamed


def test_a_workspace_of_status_files_gets_a_snapshot_and_loses_its_stale_status_files(
    tmp_path: Path,
) -> None:
    # As an earlier version left it: one daq.json per active DAQ, no snapshot, no journal.
    for i, daq_id in enumerate(["OLD1", "OLD2"]):
        (tmp_path / "daqs" / daq_id).mkdir(parents=True)
        (tmp_path / "daqs" / daq_id / "daq.json").write_text(
            json.dumps(record(daq_id, i + 1).to_json(), indent=1)
        )
    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    assert [r.id for r in loaded.active] == ["OLD1", "OLD2"]
    assert snapshot_ids(tmp_path) == ["OLD1", "OLD2"]
    assert not list(tmp_path.glob("daqs/*/daq.json"))
    ws = Workspace(tmp_path)
    assert [r.id for r in ws.load().active] == ["OLD1", "OLD2"]
    ws.close()


def test_a_changed_snapshot_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT_FILE).write_bytes(b'{"snapshot_of_journals_up_to": 1, "records": 2}\n{"id": "A"}')
    with pytest.raises(SnapshotUnreadable, match=f"{tmp_path / SNAPSHOT_FILE}: the header says 2 records"):
        Workspace(tmp_path).load()
    assert os.path.exists(tmp_path / SNAPSHOT_FILE)  # left for the operator
