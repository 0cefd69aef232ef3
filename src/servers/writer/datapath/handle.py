"""`ProcessDataPath`: the control plane's side of the data path process (a `DataPathHandle`).

It starts one process (``python -m servers.writer.datapath.worker``, through
`servers.common.process.spawn`) that is connected to the frame stream (PULL, or SUB) for its
whole life. Commands and results cross a ``multiprocessing`` pipe; counters and the write's
progress are read from the shared page (`protocol.Slot`), so `counters()` and `progress()` are
cheap and never wait for the process. The process exits when its control plane goes away (the pipe
closes, or the parent dies).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from servers.common.process import kill, spawn, terminate
from servers.writer.datapath import direct, protocol
from servers.writer.datapath.api import (
    DataPathError,
    FrameCounters,
    WriteJob,
    WritePhase,
    WriteProgress,
    WriteResult,
)
from servers.writer.datapath.journal import WriteJournal
from servers.writer.datapath.protocol import (
    ACTIVE_PHASES,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_PRIORITY_BOOST,
    DEFAULT_RCVHWM,
    PHASES,
    FrameIO,
    Slot,
    SocketKind,
)
from servers.writer.datapath.recovery import RepairFailed, repair_file

if TYPE_CHECKING:
    from servers.writer.live import LiveOptions

log = logging.getLogger(__name__)

# How long a closing process may take to close its file before it is terminated.
CLOSE_GRACE_S: Final = 30.0


# The bytes of frames the receive queue may hold (docs/writer.md, "Memory"): about 1 s of 64 KiB
# frames at 4 kHz.
RECEIVE_QUEUE_BYTES: Final = 256 << 20


# What the data path holds besides queued frames: the interpreter, numpy, h5py, pyzmq, HDF5's
# caches, the frames being written, and heap glibc keeps for reuse (`_malloc_env`).
BASE_RSS_BYTES: Final = 192 << 20


def datapath_rss_budget(frame_nbytes: int) -> int:
    """The most resident memory the data path may use for frames of `frame_nbytes`, whatever
    the configs before (docs/writer.md, "Memory")."""
    # A queued message holds a frame, a bitshuffle-LZ4 one at most 1/128 more (its framing);
    # a direct write has its batch buffers besides.
    queued = rcvhwm_for_frames(frame_nbytes) * (frame_nbytes + frame_nbytes // 128)
    return BASE_RSS_BYTES + queued + direct.buffer_bytes(frame_nbytes)


def rcvhwm_for_frames(frame_nbytes: int, budget_bytes: int = RECEIVE_QUEUE_BYTES) -> int:
    """A receive high-water mark (in messages) that keeps queued frames within `budget_bytes`.

    ZeroMQ counts messages, not bytes: 1000 queued 4 MiB frames would be 4 GiB. At least 16
    messages, so frames over `budget_bytes` / 16 (16 MiB) get a queue of 16 frames.
    """
    return max(16, min(10_000, budget_bytes // max(1, frame_nbytes)))


class ProcessDataPath:
    """The data path in its own process (`DataPathHandle`).

    `stream_endpoint` is where the frame source binds (e.g. ``tcp://127.0.0.1:9999``);
    `socket_kind` is ``"pull"`` for a PUSH source, ``"sub"`` for a PUB source. `rcvhwm` bounds the
    frames queued in ZeroMQ (see `rcvhwm_for_frames`). `start` may be called again after the
    process died or was closed; it starts a new one (with new counters).

    `max_message_bytes` is the largest message part the socket accepts (``ZMQ_MAXMSGSIZE``): a
    larger one makes ZeroMQ drop the connection instead of buffering it (`max_message_for_frames`).
    `resize_for` sizes both for other frames in the running process (after a config change), so
    its memory stays within `datapath_rss_budget`.
    With a `journal`, each write is recorded in it while it runs, and `start` first repairs the
    file of a write the journal still names (the writer was killed during it). When the process
    dies mid-write its file is repaired at once (`recovery.repair_file`), and the write's result
    reports the frames the repaired file holds.

    While a write is open the process runs `priority_boost` nice levels above the caller's (when
    it may, `worker.Priority`), so a busy control plane does not take the CPU frames need; between
    writes it runs at the caller's, so the end of a write is pushed without waiting for it. With
    `verify_compressed` every LZ4 block of a bitshuffle-LZ4 frame is decoded before the frame is
    written (`daqif.frame.check_data(decode=True)`; off by default, see docs/writer.md). With
    `live` it publishes a sample of the frames it receives (`servers.writer.live`).
    """

    def __init__(
        self,
        stream_endpoint: str,
        socket_kind: SocketKind = "pull",
        *,
        rcvhwm: int = DEFAULT_RCVHWM,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        start_timeout: float = 60.0,
        max_message_bytes: int | None = None,
        journal: WriteJournal | None = None,
        priority_boost: int = DEFAULT_PRIORITY_BOOST,
        verify_compressed: bool = False,
        live: LiveOptions | None = None,
        frame_io: FrameIO = "direct",
    ) -> None:
        if socket_kind not in ("pull", "sub"):
            raise ValueError(f"socket_kind must be 'pull' or 'sub', not {socket_kind!r}")
        if rcvhwm < 1:
            raise ValueError(f"rcvhwm must be >= 1, not {rcvhwm}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, not {flush_interval}")
        self.stream_endpoint = stream_endpoint
        self.socket_kind: SocketKind = socket_kind
        self.rcvhwm = rcvhwm
        self.flush_interval = flush_interval
        self.start_timeout = start_timeout
        self.max_message_bytes = max_message_bytes
        self.journal = journal
        self.priority_boost = priority_boost
        self.verify_compressed = verify_compressed
        self.live = live
        self.frame_io: FrameIO = frame_io
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._shared_map: mmap.mmap | None = None
        self._shared: memoryview | None = None  # protocol.N_SLOTS int64s written by the process
        self._command_lock = threading.Lock()  # one command in flight at a time
        self._state_lock = threading.Condition()
        self._replies: queue.Queue[protocol.Reply | None] = queue.Queue()
        self._results: dict[int, WriteResult] = {}  # write seq -> how it ended
        self._jobs: dict[int, tuple[WriteJob, float]] = {}  # write seq -> job, open time
        self._repaired: dict[int, int] = {}  # write seq -> frames in its file after a repair
        self._death_handled = False
        self._reader: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the process; return once it is connected to the stream."""
        if self.is_alive():
            return
        self._repair_journaled_write()
        # A subprocess running the worker module, not multiprocessing's spawn: spawn re-imports
        # the caller's __main__, which breaks scripts without a main guard.
        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        shared_fd = protocol.anonymous_shared_file(protocol.SHARED_BYTES)
        try:
            self._shared_map = mmap.mmap(shared_fd, protocol.SHARED_BYTES)
            self._shared = memoryview(self._shared_map).cast("q")
            command = [
                sys.executable,
                "-m",
                "servers.writer.datapath.worker",
                f"--endpoint={self.stream_endpoint}",
                f"--socket={self.socket_kind}",
                f"--rcvhwm={self.rcvhwm}",
                f"--flush-interval={self.flush_interval}",
                f"--conn-fd={child_conn.fileno()}",
                f"--shared-fd={shared_fd}",
                f"--priority-boost={self.priority_boost}",
                f"--io={self.frame_io}",
            ]
            if self.max_message_bytes is not None:
                command.append(f"--max-message-bytes={self.max_message_bytes}")
            if self.verify_compressed:
                command.append("--verify-compressed")
            if self.live is not None:
                command += self.live.worker_args()
            # Its log goes to the writer's stderr, as the writer's own does.
            process = spawn(
                command, env=_malloc_env(), stderr=None, pass_fds=(child_conn.fileno(), shared_fd)
            )
        finally:
            os.close(shared_fd)
            child_conn.close()
        if self._conn is not None:
            self._conn.close()  # the pipe of a process that died
        self._process, self._conn = process, parent_conn
        self._replies = queue.Queue()
        with self._state_lock:
            self._results = {}
            self._jobs = {}
            self._repaired = {}
            self._death_handled = False
        if not parent_conn.poll(self.start_timeout):
            self._kill()
            raise DataPathError(f"the data path process did not start within {self.start_timeout:.0f} s")
        try:
            message = parent_conn.recv()
        except EOFError:
            process.wait(10)
            raise DataPathError(
                f"the data path process exited while starting (exit code {process.returncode})"
            ) from None
        if not isinstance(message, protocol.Ready):
            self._kill()
            raise DataPathError(f"the data path process sent {message!r} instead of its ready message")
        self._reader = threading.Thread(
            target=self._read_pipe,
            args=(parent_conn, self._replies, self._results),
            name="daqif-datapath-reader",
            daemon=True,
        )
        self._reader.start()

    def close(self) -> None:
        """Stop the process (closing an open file as interrupted)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(DataPathError):
                self._command(protocol.Close(), timeout=CLOSE_GRACE_S)
        terminate(process, grace=CLOSE_GRACE_S)
        self._handle_death()
        if self._conn is not None:
            self._conn.close()
        if self._reader is not None:
            self._reader.join(5)
        self._process = None

    def is_alive(self) -> bool:
        """False once the process died (crash, kill -9) or was closed."""
        process = self._process
        if process is None:
            return False
        if process.poll() is None:
            return True
        self._handle_death()
        return False

    @property
    def pid(self) -> int | None:
        """The data path process id (None when not started)."""
        return self._process.pid if self._process is not None else None

    # -- commands ------------------------------------------------------------------------

    def open_write(self, job: WriteJob, timeout: float = 10.0) -> None:
        """Open the output file for `job`; return once it is open. `DataPathError` says why not."""
        reply = self._command(protocol.Open(job), timeout)
        if reply.error is not None:
            raise DataPathError(reply.error)

    def stop_write(self, timeout: float = 10.0) -> WriteResult | None:
        """Interrupt the open write and return its result; None when no write was open.

        If the process died with a write open, the result is that write, FAILED.
        """
        if not self.is_alive():
            last = self._last_result_if_failed_by_death()
            if last is not None:
                return last
            raise DataPathError("the data path process is not running")
        return self._command(protocol.Stop(), timeout).result

    def progress(self) -> WriteProgress:
        """The phase and frame count of the current or last write."""
        shared = self._shared
        if shared is None:
            return WriteProgress(phase=None, n_written=0, result=None)
        seq = shared[Slot.WRITE_SEQ]
        phase = PHASES[shared[Slot.PHASE]]
        n_written = shared[Slot.N_WRITTEN]
        if phase in ACTIVE_PHASES and not self.is_alive():
            died = self._death_result(seq, n_written)
            return WriteProgress(phase=WritePhase.FAILED, n_written=n_written, result=died)
        with self._state_lock:
            if phase in (WritePhase.FINISHED, WritePhase.FAILED):
                # The process sends the result before it publishes the phase; wait for the reader thread.
                self._state_lock.wait_for(lambda: seq in self._results, timeout=5.0)
            result = self._results.get(seq)
        if result is not None:  # the result is known before the process publishes the final phase
            phase = WritePhase.FAILED if result.error else WritePhase.FINISHED
            n_written = result.n_written
        return WriteProgress(phase=phase, n_written=n_written, result=result)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` from the pipe's reader thread when a write ended or the process died."""
        self._listeners.append(callback)

    def counters(self) -> FrameCounters:
        """Cumulative frame counters since the process started."""
        shared = self._shared
        if shared is None:
            return FrameCounters()
        values = shared[: Slot.BYTES_WRITTEN + 1].tolist()
        return FrameCounters(
            received=values[Slot.RECEIVED],
            written=values[Slot.WRITTEN],
            discarded=values[Slot.DISCARDED],
            malformed=values[Slot.MALFORMED],
            bytes_received=values[Slot.BYTES_RECEIVED],
            bytes_written=values[Slot.BYTES_WRITTEN],
        )

    def resize_for(self, frame_nbytes: int, timeout: float = 10.0) -> None:
        """Size the receive queue (`rcvhwm_for_frames`) and the message limit
        (`max_message_for_frames`) for frames of `frame_nbytes`; between writes only."""
        rcvhwm, max_message = rcvhwm_for_frames(frame_nbytes), max_message_for_frames(frame_nbytes)
        reply = self._command(protocol.Resize(rcvhwm, max_message), timeout)
        if reply.error is not None:
            raise DataPathError(reply.error)
        # A process started again (after it died) starts with these.
        self.rcvhwm, self.max_message_bytes = rcvhwm, max_message

    # -- internals -----------------------------------------------------------------------

    def _command(self, command: protocol.Command, timeout: float) -> protocol.Reply:
        with self._command_lock:
            conn, shared = self._conn, self._shared
            if conn is None or shared is None or not self.is_alive():
                raise DataPathError("the data path process is not running")
            if isinstance(command, protocol.Open):
                # Remembered before sending: the process may die before it replies.
                seq = shared[Slot.WRITE_SEQ] + 1
                with self._state_lock:
                    self._jobs[seq] = (command.job, time.time())
                self._record_in_journal(seq, command.job)
            try:
                conn.send(command)
            except (OSError, EOFError) as exc:
                raise DataPathError(f"the data path process is not reachable: {exc}") from None
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise DataPathError(
                    f"the data path process did not answer {type(command).__name__.lower()[1:]} "
                    f"within {timeout:g} s"
                ) from None
            if reply is None:
                self._replies.put(None)  # keep the "gone" marker for later commands
                raise DataPathError("the data path process died")
            if isinstance(command, protocol.Open) and reply.error is not None and self.journal is not None:
                self.journal.clear(seq)  # nothing was left behind
            return reply

    def _read_pipe(
        self,
        conn: multiprocessing.connection.Connection,
        replies: queue.Queue[protocol.Reply | None],
        results: dict[int, WriteResult],
    ) -> None:
        """Reader thread of one process's pipe (its own queue and results: a restarted data path
        never sees a late message of the process before)."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                replies.put(None)
                with self._state_lock:
                    self._state_lock.notify_all()
                self._notify()
                return
            if isinstance(message, protocol.Reply | protocol.Ended) and message.result is not None:
                # Forgotten before the result is published: the next write cannot start sooner.
                if self.journal is not None:
                    self.journal.clear(message.seq)
                with self._state_lock:
                    results[message.seq] = message.result
                    self._state_lock.notify_all()
            if isinstance(message, protocol.Reply):
                replies.put(message)
            elif isinstance(message, protocol.Ended):
                self._notify()

    def _notify(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception:  # a listener's bug must not stop the reader thread
                log.exception("a data path listener failed")

    def _death_result(self, seq: int, n_written: int) -> WriteResult:
        with self._state_lock:
            result = self._results.get(seq)
            if result is None:
                exitcode = self._process.returncode if self._process is not None else None
                job, opened = self._jobs.get(seq, (None, 0.0))
                result = WriteResult(
                    output_file=job.output_file if job else "",
                    n_images=job.n_images if job else 0,
                    n_written=self._repaired.get(seq, n_written),
                    interrupted=True,
                    error=f"the data path process died (exit code {exitcode}) during the write",
                    start_time=opened,
                    stop_time=time.time(),
                )
                self._results[seq] = result
            return result

    def _last_result_if_failed_by_death(self) -> WriteResult | None:
        shared = self._shared
        if shared is None:
            return None
        if PHASES[shared[Slot.PHASE]] in ACTIVE_PHASES:
            return self._death_result(shared[Slot.WRITE_SEQ], shared[Slot.N_WRITTEN])
        return None

    def _handle_death(self) -> None:
        """Once, after the process is gone: repair a file it left open (readable without h5clear,
        datasets shrunk to the frames of its last flush)."""
        with self._state_lock:
            if self._death_handled:
                return
            self._death_handled = True
        shared = self._shared
        if shared is None or PHASES[shared[Slot.PHASE]] not in ACTIVE_PHASES:
            return
        seq = shared[Slot.WRITE_SEQ]
        with self._state_lock:
            if seq in self._results:  # it ended (and said so) just before dying
                return
            job, _opened = self._jobs.get(seq, (None, 0.0))
        if job is None:
            return
        n_frames = _repair(job, "the data path died during the write")
        if n_frames is not None:
            with self._state_lock:
                self._repaired[seq] = n_frames
        if self.journal is not None:
            self.journal.clear(seq)

    def _record_in_journal(self, seq: int, job: WriteJob) -> None:
        if self.journal is None:
            return
        try:
            self.journal.record(seq, job)
        except OSError as exc:
            raise DataPathError(
                f"cannot record the write in the journal {self.journal.path}: {exc}"
            ) from None

    def _repair_journaled_write(self) -> None:
        """Repair the file of a write the journal names: the writer was killed during it."""
        if self.journal is None:
            return
        job = self.journal.pending()
        if job is None:
            return
        _repair(job, "the writer was stopped during the write")
        self.journal.clear()

    def _kill(self) -> None:
        if self._process is not None:
            kill(self._process)


def _repair(job: WriteJob, why: str) -> int | None:
    """Repair `job`'s file; the frames it holds now, or None (logged) when it cannot be repaired."""
    try:
        n_frames = repair_file(job)
    except RepairFailed as exc:
        log.error("%s; %s", why, exc)
        return None
    log.warning("%s; repaired %s: it holds the %d frame(s) of its last flush", why, job.output_file, n_frames)
    return n_frames


def max_message_for_frames(frame_nbytes: int) -> int:
    """The ``ZMQ_MAXMSGSIZE`` for frames of `frame_nbytes`: room for bitshuffle-LZ4's worst case
    (incompressible data grows by its framing, about 1/256) and a header, nothing more."""
    return frame_nbytes + frame_nbytes // 128 + 65536


def _malloc_env() -> dict[str, str]:
    """glibc malloc settings for the data path, so frame buffers are reused.

    ZeroMQ allocates every received message; by default glibc serves large ones with mmap and
    returns them with munmap, so each frame costs ~one page fault per 4 KiB. Fixed thresholds keep
    frames up to 32 MiB on the heap and the heap from being trimmed below 128 MiB (memory stays
    bounded by the receive high-water mark, see `rcvhwm_for_frames`). Values already set win.
    """
    tuned = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
    return {name: value for name, value in tuned.items() if name not in os.environ}
