"""Child processes of the DPM (servers/dpm/transfer.py): a cancelled run kills its whole group.

The race behind a flake of `test_lifecycle_resume.py::test_rsync_children_left_by_a_kill_9_are_
killed_when_the_server_starts_again` (an abort right after a restart left the remote shell
running): an abort that lands while rsync is still being spawned — executed, but its pipes not yet
connected — used to reach asyncio's own clean-up, which kills the direct child only and then
waits for it; the remote shell rsync had already started lived on (and, holding rsync's stderr,
held up the abort). Fixed in c211fe1: the spawn is shielded and the child's group killed. Against
the code before that commit this test fails ("the cancelled run did not end"); 15 runs of the
flaky test under a CPU hog passed after it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from daqif.testing import wait_for
from servers.dpm.transfer import WORKSPACE_VARIABLE, kill_leftovers, run_process


def _marked(marker: bytes) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    return True
            except OSError:
                continue
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_cancel_while_the_child_is_being_spawned_kills_the_children_it_started_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WORKSPACE_VARIABLE, str(tmp_path))  # the child is found by it, and cleaned up
    marker = f"{WORKSPACE_VARIABLE}={tmp_path}".encode()
    pid_file = tmp_path / "grandchild.pid"
    # Like rsync starting its remote shell: the child starts a process of its own at once.
    script = f"sleep 3600 & echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; wait"

    async def cancel_during_the_spawn() -> None:
        task = asyncio.create_task(run_process(["sh", "-c", script]))
        while not _marked(marker):  # one loop step at a time until the child is executed
            await asyncio.sleep(0)
        # The loop is held here, so the spawn cannot finish (connect the child's pipes) before
        # the cancellation; the child meanwhile starts its own child.
        wait_for(pid_file.exists, 30, "the child's own child")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=30)  # generous: not a timing check
        assert done, "the cancelled run did not end (it waits for the child's own child)"
        assert task.cancelled()

    try:
        asyncio.run(cancel_during_the_spawn())
        grandchild = int(pid_file.read_text())
        wait_for(lambda: not _alive(grandchild), 30, "the child's child to be killed with it")
    finally:
        kill_leftovers(tmp_path)
