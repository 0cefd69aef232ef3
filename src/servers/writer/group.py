"""Writer groups: one write across several data paths, one virtual-dataset file (docs/writer.md).

A group is a `DataPathHandle` (`GroupDataPath`), so `WriterCore` drives it exactly like one data
path: its state machine, REST, gRPC, logs, stats and Redis streams describe the whole write. Its
members are data paths connected to the same PUSH source, which deals each frame to one of them:

- `ProcessDataPath`s of this writer (`daqif-writer --workers N`), and
- `RemoteMember`s: other ordinary `daqif-writer`s, driven through their gRPC `WriterControl`
  (`daqif-writer --group-member HOST:PORT`) and followed through its `WatchStatus` stream.

A write of `output_file` (`/d/run.h5`) makes member k record the frames it is dealt, with their
image ids, in `/d/run_<k>.h5` (k = 0 … N-1 for the local workers, then the remote members in the
order given). Every member is asked to record up to `n_images` frames; the group's supervisor
thread stops them all once they wrote `n_images` in total and writes `output_file` as one virtual
dataset over the parts (`daqif.vds.join_writer_files`), mapping the `n_images` smallest image ids
(a member may have written a frame or two more before it was stopped: those stay in its part).

A write is refused, nothing created, naming the member, when a member is unreachable, not READY,
or configured for other frames. A member that dies or becomes unreachable during the write fails
it naming the member: the other members are stopped, and `output_file` maps the parts that are
still readable (the message says which). `stop_write` stops every member. A remote member's
liveness is its own: only the local workers make the group's `is_alive`, so a lost remote
member fails the write but leaves the coordinator READY.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import h5py
import numpy as np

from daqif.errors import DaqException
from daqif.v1 import writer_pb2
from daqif.vds import JoinError, join_writer_files
from daqif.writer_client import WriterClient, acquisition_state_name, writer_state_name
from servers.writer.datapath.api import (
    DataPathError,
    DataPathHandle,
    FrameCounters,
    WriteJob,
    WritePhase,
    WriteProgress,
    WriteResult,
)
from servers.writer.datapath.output import give_to_owner
from servers.writer.stats import add_counters

_log = logging.getLogger(__name__)

# How often the supervisor adds up the members' frame counts (the local ones are read from shared
# memory; a remote member's count arrives on its status stream and wakes the supervisor at once).
SUPERVISE_INTERVAL: Final = 0.02
# gRPC calls to a remote member that must answer quickly (status, config, start, stats).
MEMBER_CALL_TIMEOUT: Final = 5.0
MEMBER_KEEPALIVE_S: Final = 5.0

_ACQUISITION_PHASES: Final = {
    "WAITING_IMAGES": WritePhase.WAITING_IMAGES,
    "ACQUIRING_IMAGES": WritePhase.ACQUIRING_IMAGES,
    "WRITING": WritePhase.WRITING,
    "FLUSHING_IMAGES": WritePhase.FLUSHING_IMAGES,
}
_PHASE_ORDER: Final = list(_ACQUISITION_PHASES.values())


def part_path(output_file: str, k: int) -> str:
    """Where member `k` writes its frames: `<output stem>_<k>.h5` beside `output_file`."""
    path = Path(output_file)
    return str(path.with_name(f"{path.stem}_{k}.h5"))


class RemoteMember:
    """Another `daqif-writer`, driven through its gRPC WriterControl (a `DataPathHandle`).

    Each write is followed through the member's `WatchStatus` stream in a thread of its own; the
    stream ending with an error (the member died, the network broke) fails the write.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.name = f"group member {address}"
        self._client: WriterClient | None = None
        self._callback: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._job: WriteJob | None = None
        self._progress = WriteProgress(None, 0, None)
        self._watch: WriterClient | None = None
        self._watch_thread: threading.Thread | None = None
        self._last_counters = FrameCounters()

    # -- DataPathHandle --------------------------------------------------------------------

    def start(self) -> None:
        self._client = WriterClient(self.address, timeout=MEMBER_CALL_TIMEOUT)

    def close(self) -> None:
        self._end_watch()
        if self._client is not None:
            self._client.close()
            self._client = None

    def is_alive(self) -> bool:
        return True  # its own writer keeps it alive; a lost member fails the write it was in

    def check(self, job: WriteJob) -> None:
        """Refuse (`DataPathError` naming the member) unless it answers, is READY and expects the
        frames of `job`."""
        client = self._require_client()
        try:
            status = client.get_status()
            config = client.get_config()
        except DaqException as exc:
            raise DataPathError(f"{self.name} is unreachable: {exc.message}") from None
        if status.state != writer_pb2.WRITER_STATE_READY:
            raise DataPathError(
                f"{self.name} is {writer_state_name(status.state)}, not READY "
                f"(its acquisition: {acquisition_state_name(status.acquisition.state)} "
                f"{status.acquisition.message!r})"
            )
        theirs = (config.detector_name, config.image_pixel_height, config.image_pixel_width, config.bit_depth)
        ours = (job.detector_name, job.height, job.width, 8 * np.dtype(job.dtype).itemsize)
        if theirs != ours:
            raise DataPathError(
                f"{self.name} expects frames of detector {theirs[0]!r}, {theirs[1]}x{theirs[2]} at "
                f"{theirs[3]} bits, but this writer {ours[0]!r}, {ours[1]}x{ours[2]} at {ours[3]} bits; "
                "give every member the same detector config"
            )

    def open_write(self, job: WriteJob, timeout: float = 10.0) -> None:
        client = self._require_client()
        self._end_watch()
        self.check(job)
        try:
            # The file owner goes as a per-write writer_user_id: the member checks it against its
            # own --allowed-uids (members are configured alike).
            client.start_writer_async(job.output_file, job.n_images, job.run_id, writer_user_id=job.owner_uid)
        except DaqException as exc:
            raise DataPathError(f"{self.name} refused the write: {exc.message}") from None
        with self._lock:
            self._job = job
            self._progress = WriteProgress(WritePhase.WAITING_IMAGES, 0, None)
        # Keepalive: a member that goes silent without closing the connection (stopped, cut off)
        # breaks the stream within about 2 x MEMBER_KEEPALIVE_S and so fails the write.
        self._watch = WriterClient(self.address, timeout=None, keepalive_s=MEMBER_KEEPALIVE_S)
        self._watch_thread = threading.Thread(
            target=self._follow, args=(self._watch, job), name=f"watch {self.address}", daemon=True
        )
        self._watch_thread.start()

    def stop_write(self, timeout: float = 10.0) -> WriteResult | None:
        with self._lock:
            job, progress = self._job, self._progress
        if job is None or (progress.result is not None and progress.phase is WritePhase.FAILED):
            return None
        with self._lock:
            self._job = None  # the watch ends quietly from now on
        try:
            # Named: a member whose part already ended never stops a write someone else started there.
            status = self._require_client().stop_writer(output_file=job.output_file)
        except DaqException as exc:
            self._end_watch()
            raise DataPathError(f"{self.name} did not stop: {exc.message}") from None
        self._end_watch()
        result = self._result(job, status.acquisition)
        with self._lock:
            self._progress = WriteProgress(_ended_phase(result), result.n_written, result)
        return result

    def progress(self) -> WriteProgress:
        with self._lock:
            return self._progress

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def counters(self) -> FrameCounters:
        client = self._client
        if client is None:
            return self._last_counters
        try:
            counters = client.get_stats().counters
        except DaqException:
            return self._last_counters
        self._last_counters = FrameCounters(
            received=counters.received,
            written=counters.written,
            discarded=counters.discarded,
            malformed=counters.malformed,
        )
        return self._last_counters

    def resize_for(self, frame_nbytes: int, timeout: float = 10.0) -> None:
        """Nothing to do: a remote member sizes its own queue for its own config."""

    # -- internals -------------------------------------------------------------------------

    def _require_client(self) -> WriterClient:
        if self._client is None:
            raise DataPathError(f"{self.name} is not connected (the group was not started)")
        return self._client

    def _follow(self, watch: WriterClient, job: WriteJob) -> None:
        """Follow the member's status until the write ends or the stream breaks."""
        error: str | None = None
        try:
            for status in watch.watch_status():
                acquisition = status.acquisition
                if acquisition.info.output_file != job.output_file:
                    continue
                state = acquisition_state_name(acquisition.state)
                with self._lock:
                    if self._job is not job:
                        return
                    if state in ("FINISHED", "FAILED"):
                        result = self._result(job, acquisition)
                        self._progress = WriteProgress(_ended_phase(result), result.n_written, result)
                    else:
                        self._progress = WriteProgress(
                            _ACQUISITION_PHASES.get(state, WritePhase.WRITING),
                            acquisition.stats.n_write_completed,
                            None,
                        )
                self._callback()
                if state in ("FINISHED", "FAILED"):
                    return
            error = "its status stream ended"
        except DaqException as exc:
            error = f"it became unreachable ({exc.message})"
        except ValueError:  # the channel was closed under the stream: the write was stopped
            return
        if error is not None:
            _log.warning("%s: %s", self.name, error)
        with self._lock:
            if self._job is not job:
                return
            now = time.time()
            result = WriteResult(
                job.output_file, job.n_images, self._progress.n_written, False, error, now, now
            )
            self._progress = WriteProgress(WritePhase.FAILED, result.n_written, result)
        self._callback()

    def _end_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        thread, self._watch_thread = self._watch_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    @staticmethod
    def _result(job: WriteJob, acquisition: writer_pb2.Acquisition) -> WriteResult:
        state = acquisition_state_name(acquisition.state)
        message = acquisition.message
        stats = acquisition.stats
        n_written = int(stats.n_write_completed)
        now = time.time()
        return WriteResult(
            output_file=job.output_file,
            n_images=job.n_images,
            n_written=n_written,
            interrupted=n_written < job.n_images,
            error=message.removeprefix("ERROR: ") if state == "FAILED" else None,
            start_time=stats.start_time if stats.HasField("start_time") else now,
            stop_time=stats.stop_time if stats.HasField("stop_time") else now,
        )


def _failure(progress: WriteProgress, alive: bool) -> str:
    """Why a member fails the group's write ("" if it does not): it failed, died, or its write
    ended short while the group's goes on (stopped by someone else: its frames would be lost)."""
    result = progress.result
    if progress.phase is WritePhase.FAILED:
        return result.error if result is not None and result.error else "its write failed"
    if not alive:
        return "its data path process died"
    if progress.phase is WritePhase.FINISHED and result is not None and result.interrupted:
        return f"its write was stopped after {result.n_written} frames, outside the group"
    return ""


def _ended_phase(result: WriteResult) -> WritePhase:
    return WritePhase.FAILED if result.error is not None else WritePhase.FINISHED


@dataclass(frozen=True)
class Member:
    """One member of a group: a name for messages and the data path it drives."""

    name: str
    datapath: DataPathHandle


@dataclass
class _Write:
    job: WriteJob
    parts: list[str]
    start_time: float
    stop_requested: threading.Event
    done: threading.Event
    thread: threading.Thread | None = None


class GroupDataPath:
    """Several data paths on one PUSH source behind one control plane (a `DataPathHandle`);
    see the module doc."""

    def __init__(self, members: Sequence[Member]) -> None:
        if len(members) < 2:
            raise ValueError("a writer group has at least two members")
        self.members = list(members)
        self._callback: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._progress = WriteProgress(None, 0, None)
        self._write: _Write | None = None
        self._wake = threading.Event()

    # -- DataPathHandle --------------------------------------------------------------------

    def start(self) -> None:
        started: list[Member] = []
        for member in self.members:
            member.datapath.on_change(self._changed)
            try:
                member.datapath.start()
            except Exception as exc:
                for other in started:
                    with contextlib.suppress(Exception):
                        other.datapath.close()
                raise DataPathError(f"{member.name} did not start: {exc}") from exc
            started.append(member)

    def close(self) -> None:
        with contextlib.suppress(DataPathError):
            self.stop_write()
        for member in self.members:
            try:
                member.datapath.close()
            except Exception:
                _log.exception("closing %s failed", member.name)

    def is_alive(self) -> bool:
        """False once a local worker died, but only after the running write (if any) ended: its
        supervisor reports the death, naming the worker, in the write's result."""
        with self._lock:
            running = self._write is not None and not self._write.done.is_set()
        return running or self._members_alive()

    def _members_alive(self) -> bool:
        return all(member.datapath.is_alive() for member in self.members)

    def open_write(self, job: WriteJob, timeout: float = 10.0) -> None:
        with self._lock:
            if self._write is not None and not self._write.done.is_set():
                raise DataPathError("the group is already writing")
        parts = [part_path(job.output_file, k) for k in range(len(self.members))]
        existed = {part for part in parts if os.path.exists(part)}  # overwritten, as one writer does
        for member in self.members:  # refused before anything is created
            if isinstance(member.datapath, RemoteMember):
                member.datapath.check(job)

        def open_part(pair: tuple[Member, str]) -> str | None:
            member, part = pair
            try:
                member.datapath.open_write(replace(job, output_file=part), timeout)
            except DataPathError as exc:
                message = str(exc)
                return message if message.startswith(member.name) else f"{member.name}: {message}"
            return None

        # All at once: a member not yet recording loses the frames it is dealt meanwhile.
        pairs = list(zip(self.members, parts, strict=True))
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            errors = list(pool.map(open_part, pairs))
        if any(errors):
            self._undo([pair for pair, e in zip(pairs, errors, strict=True) if e is None], existed, timeout)
            raise DataPathError(next(e for e in errors if e))
        write = _Write(job, parts, time.time(), threading.Event(), threading.Event())
        with self._lock:
            self._write = write
            self._progress = WriteProgress(WritePhase.WAITING_IMAGES, 0, None)
        write.thread = threading.Thread(target=self._supervise, args=(write,), name="group", daemon=True)
        write.thread.start()

    def stop_write(self, timeout: float = 10.0) -> WriteResult | None:
        with self._lock:
            write = self._write
        if write is None or write.done.is_set():
            return None
        write.stop_requested.set()
        self._wake.set()
        if not write.done.wait(timeout + 30.0):
            raise DataPathError("the group's members did not stop in time")
        return self.progress().result

    def progress(self) -> WriteProgress:
        with self._lock:
            return self._progress

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def counters(self) -> FrameCounters:
        total = FrameCounters()
        for member in self.members:
            try:
                c = member.datapath.counters()
            except DataPathError:
                continue
            total = add_counters(total, c)
        return total

    def resize_for(self, frame_nbytes: int, timeout: float = 10.0) -> None:
        for member in self.members:
            member.datapath.resize_for(frame_nbytes, timeout)

    # -- the supervisor --------------------------------------------------------------------

    def _changed(self) -> None:
        self._wake.set()
        if not self.is_alive():  # a local worker died between writes: the core looks at once
            self._callback()

    def _supervise(self, write: _Write) -> None:
        try:
            self._run(write)
        except Exception as exc:  # never leave the write running unseen
            _log.exception("the group supervisor failed")
            self._end(write, [], f"the group supervisor failed: {exc}")
        finally:
            write.done.set()
            self._callback()

    def _run(self, write: _Write) -> None:
        n_images = write.job.n_images
        while True:
            self._wake.wait(SUPERVISE_INTERVAL)
            self._wake.clear()
            looks = [(m, m.datapath.progress(), m.datapath.is_alive()) for m in self.members]
            total = sum(p.n_written for _, p, _ in looks)
            failed = [(m, _failure(p, alive)) for m, p, alive in looks if _failure(p, alive)]
            if failed:
                member, error = failed[0]
                self._end(write, [m for m, _ in failed], f"{member.name} failed during the write: {error}")
                return
            ended = all(p.phase is WritePhase.FINISHED for _, p, _ in looks)
            if total >= n_images or ended or write.stop_requested.is_set():
                self._end(write, [], None)
                return
            phases = [p.phase for _, p, _ in looks if p.phase in _PHASE_ORDER]
            phase = max(phases, key=_PHASE_ORDER.index) if phases else WritePhase.WAITING_IMAGES
            if total > 0:
                phase = WritePhase.WRITING
            with self._lock:
                self._progress = WriteProgress(phase, total, None)

    def _end(self, write: _Write, lost: list[Member], error: str | None) -> None:
        """Stop every member, join the readable parts into `output_file`, publish the result."""
        ending = time.perf_counter()
        with self._lock:
            self._progress = WriteProgress(WritePhase.FLUSHING_IMAGES, self._progress.n_written, None)
        problems: list[str] = []

        def stop(member: Member) -> None:
            if member in lost:
                return
            try:
                member.datapath.stop_write()
            except DataPathError as exc:
                problems.append(f"{member.name} did not stop: {exc}")

        with ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            list(pool.map(stop, self.members))
        readable = [part for part in write.parts if _readable(part, write.job.detector_name)]
        n_written = 0
        joined = False
        if readable:
            try:
                joined_file = join_writer_files(
                    Path(write.job.output_file),
                    [Path(p) for p in readable],
                    detector=write.job.detector_name,
                    limit=write.job.n_images,
                )
                n_written, joined = joined_file.n_images, True
                give_to_owner(write.job.output_file, write.job.owner_uid)  # as its parts are
            except (JoinError, OSError) as exc:
                problems.append(f"joining the parts failed: {exc}")
        if error is None and problems:
            error = "; ".join(problems)
        elif error is not None:
            unread = [Path(p).name for p in write.parts if p not in readable]
            where = f"{write.job.output_file} maps the {n_written} frames of the readable parts"
            error += f"; {where}" if joined else "; no part is readable"
            if unread:
                error += f" ({', '.join(unread)} cannot be read)"
        result = WriteResult(
            output_file=write.job.output_file,
            n_images=write.job.n_images,
            n_written=n_written,
            interrupted=n_written < write.job.n_images,
            error=error,
            start_time=write.start_time,
            stop_time=time.time(),
        )
        # What the end of a write costs (tools/bench_writer.py --workers reads this line).
        _log.info(
            "group write %s: %d frames from %d parts; members stopped and the file written %.1f ms "
            "after the end was seen",
            write.job.output_file,
            n_written,
            len(readable),
            (time.perf_counter() - ending) * 1000,
        )
        with self._lock:
            self._progress = WriteProgress(_ended_phase(result), n_written, result)

    def _undo(self, opened: list[tuple[Member, str]], existed: set[str], timeout: float) -> None:
        """Stop the members already opened and remove the (empty) parts they created: a refused
        write leaves nothing new behind."""
        for member, part in opened:
            with contextlib.suppress(DataPathError):
                member.datapath.stop_write(timeout)
            if part not in existed:
                with contextlib.suppress(OSError):
                    os.unlink(part)


def _readable(part: str, detector: str) -> bool:
    """The part opens as HDF5 and its frames and image ids agree."""
    try:
        with h5py.File(part, "r") as f:
            group = f[detector]
            return bool(group["data"].shape[0] == group["image_id"].shape[0])
    except (OSError, KeyError, ValueError):
        return False
