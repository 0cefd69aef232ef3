"""The workspace on disk: durable records, start-up rebuild, archive, and one server per workspace."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servers.dpm.model import Alert, DaqRecord, HistoryEntry, Severity, SourceRecord, SubState
from servers.dpm.store import Workspace, WorkspaceBusy, _encode, checked_dir_name


def snapshot_ids(root: Path) -> list[str]:
    """The ids of the records in the workspace's snapshot (its header line first)."""
    lines = (root / "snapshot").read_bytes().split(b"\n")
    assert json.loads(lines[0])["records"] == len(lines) - 1
    return sorted(json.loads(line)["id"] for line in lines[1:])


def record(daq_id: str, seq: int) -> DaqRecord:
    return DaqRecord(id=daq_id, file_id=f"{daq_id}.f", seq=seq, specification=json.dumps({"id": daq_id}))


def test_records_survive_a_restart_with_substate_alerts_and_queue_order(tmp_path: Path) -> None:
    async def write() -> None:
        ws = Workspace(tmp_path)
        ws.load()
        for i, daq_id in enumerate(["B:2", "A:1", "C:3"]):
            await ws.create(record(daq_id, seq=i + 1))
        changed = record("A:1", seq=2)
        changed.substate = SubState.COLLECTING
        changed.alerts["collecting:d"] = Alert("collecting:d", Severity.ERROR, "missing", 1.0)
        changed.sources.append(SourceRecord("d", "/x/d.h5", outcome="failed: missing"))
        await ws.save(changed)
        done = record("C:3", seq=3)
        done.substate = SubState.COMPLETED
        await ws.archive(done)
        ws.close()

    asyncio.run(write())
    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    assert [r.id for r in loaded.active] == ["B:2", "A:1"]
    a = loaded.active[1]
    assert a.substate is SubState.COLLECTING
    assert a.alerts["collecting:d"].severity is Severity.ERROR
    assert a.sources[0].outcome == "failed: missing"
    assert loaded.archived == {"C:3"}
    assert loaded.next_seq == 3
    assert json.loads((tmp_path / "archive" / "C:3" / "daq.json").read_text())["substate"] == "COMPLETED"


def test_daq_directory_whose_status_never_became_durable_is_removed_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "daqs" / "HALF").mkdir(parents=True)
    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    assert loaded.active == [] and not (tmp_path / "daqs" / "HALF").exists()


def test_a_second_server_cannot_take_a_workspace_in_use(tmp_path: Path) -> None:
    first = Workspace(tmp_path)
    first.load()
    with pytest.raises(WorkspaceBusy, match="in use by another daqif-dpm-server"):
        Workspace(tmp_path).load()
    first.close()
    Workspace(tmp_path).load()


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".hidden", "x\x00y"])
def test_ids_that_are_not_safe_directory_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be used as a directory name"):
        checked_dir_name(bad)


def test_queued_daq_whose_status_file_was_lost_is_rebuilt_from_the_journal(tmp_path: Path) -> None:
    async def queue() -> None:
        ws = Workspace(tmp_path)
        ws.load()
        await ws.create(record("J1", seq=1))
        await ws.create(record("J2", seq=2))
        ws.close()

    asyncio.run(queue())
    # As after a power cut: J1's unsynced status file is gone, and the journal's last append is torn.
    (tmp_path / "daqs" / "J1" / "daq.json").unlink(missing_ok=True)
    journal = next(tmp_path.glob("journal.*"))
    with open(journal, "ab") as handle:
        handle.write(b'{"version": 1, "id": "J3", "fi')

    ws = Workspace(tmp_path)
    loaded = ws.load()
    ws.close()
    assert [r.id for r in loaded.active] == ["J1", "J2"]
    assert loaded.active[0].substate is SubState.SCHEDULED
    assert snapshot_ids(tmp_path) == ["J1", "J2"]  # the checkpoint after the replay wrote them
    assert not journal.exists()  # replayed, then removed; a new, empty journal is open
    assert [p.stat().st_size for p in tmp_path.glob("journal.*")] == [0]


def test_full_journal_is_checkpointed_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from servers.dpm import store

    monkeypatch.setattr(store, "JOURNAL_CHECKPOINT_LINES", 3)

    async def queue() -> None:
        ws = Workspace(tmp_path)
        ws.load()
        for i in range(7):
            await ws.create(record(f"C{i}", seq=i + 1))
        ws.close()  # waits for the checkpoints

    asyncio.run(queue())
    journals = sorted(p.name for p in tmp_path.glob("journal.*"))
    assert journals == ["journal.3"]
    assert len((tmp_path / "journal.3").read_bytes().splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), timestamp=st.floats(min_value=1.0e9, max_value=4.0e9) | st.just(0.0))
def test_a_journal_line_is_the_bytes_the_json_module_writes(text: str, timestamp: float) -> None:
    changed = record(f"id{text}", seq=7)
    changed.message = text
    changed.timestamp = timestamp
    changed.alerts[text] = Alert(text, Severity.WARNING, f'"{text}\\', timestamp)
    changed.sources.append(SourceRecord(text, f"/data/{text}.h5", bytes=1 << 40, timestamp=timestamp))
    changed.history.append(HistoryEntry(SubState.MERGING, timestamp, text))
    assert _encode(changed) == json.dumps(changed.to_json(), separators=(",", ":")).encode()
