"""The writer's data path: a process that receives frames from ZeroMQ and writes them to HDF5.

`ProcessDataPath` implements `DataPathHandle` (see `datapath_api`). It starts one process
(``python -m servers.writer.datapath``) that is connected to the frame stream (PULL, or SUB) for
its whole life, counts every message, and while a write is open records the next ``n_images``
good frames. Commands and results cross a ``multiprocessing`` pipe; counters and the write's
progress live in a shared memory page, so `counters()` and `progress()` are cheap and never wait
for the process. The process exits when its control plane goes away (the pipe closes).

File layout and behaviour (DESIGN §4):

- ``/<detector_name>/data`` ``[n_images, H, W]``, one frame per chunk, fixed extent: frame ``i`` of
  the write is stored at chunk ``(i, 0, 0)`` with a direct chunk write straight from the received
  ZeroMQ buffer (no copy, no numpy array).
- ``/<detector_name>/image_id`` and ``/<detector_name>/status`` ``[n]`` uint64, and root
  attributes ``run_id``, ``detector_name``, ``n_images``.
- Compression is decided by the first frame written: if it is a bitshuffle-LZ4 chunk the data
  dataset is created with ``hdf5plugin.Bitshuffle(cname="lz4")`` and chunks are stored as they
  came (filter mask 0); otherwise the dataset has no filter. (The write request does not say
  whether the detector compresses, and HDF5 cannot add datasets once SWMR mode is on, so the
  datasets are created, and SWMR started, when the first frame arrives.) An uncompressed frame in
  a compressed write is stored with filter mask 1 (filter skipped), which every reader honours; a
  compressed frame in an uncompressed write is counted as malformed.
- SWMR: the file is written at its final name with ``libver="latest"``; SWMR mode starts right
  after the datasets are created. About once a second (`flush_interval`), ``image_id`` and
  ``status`` are extended to the frames written so far and the file is flushed, so **the length
  of ``image_id`` is the number of valid frames** a SWMR reader may read from ``data`` (which has
  its full extent from the start: direct chunk writes cannot go beyond a dataset's extent, and
  growing it per frame would cost more than the write).
- When the write ends all datasets have exactly the frames written (an interrupted write
  shrinks ``data``). If the process is killed, the file holds everything up to the last flush;
  the handle then clears the file's SWMR-write flag (`clear_swmr_flags`) so any HDF5 reader can
  open it without ``h5clear``.
- Frames received while no write is open are counted as discarded. A message that is not a
  usable frame (wrong number of parts, empty or unreadable header, unknown dtype, data of the
  wrong size, a shape or dtype other than the write's) is counted as malformed, never written,
  and never stops the process. Each received frame is written at most once.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

from daqif.frame import Compression, FrameError, FrameHeader, check_data, decode_header
from servers.writer.datapath_api import (
    DataPathError,
    FrameCounters,
    WriteJob,
    WritePhase,
    WriteProgress,
    WriteResult,
)

__all__ = [
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_RCVHWM",
    "ProcessDataPath",
    "SocketKind",
    "clear_swmr_flags",
    "rcvhwm_for_frames",
]

log = logging.getLogger(__name__)

SocketKind = Literal["pull", "sub"]

DEFAULT_RCVHWM: Final = 1000  # messages; see rcvhwm_for_frames for a memory-bounded value
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
_BATCH: Final = 256  # frames received between looks at the command pipe and the flush clock
_MALFORMED_LOG_INTERVAL_S: Final = 5.0
_METADATA_BUFFER: Final = 1 << 16  # image ids / statuses buffered between flushes


def rcvhwm_for_frames(frame_nbytes: int, budget_bytes: int = 256 << 20) -> int:
    """A receive high-water mark (in messages) that keeps queued frames within `budget_bytes`.

    ZeroMQ counts messages, not bytes: 1000 queued 4 MiB frames would be 4 GiB.
    """
    return max(16, min(10_000, budget_bytes // max(1, frame_nbytes)))


# ------------------------------------------------------------------------- shared memory layout


class _Slot(enum.IntEnum):
    RECEIVED = 0
    WRITTEN = 1
    DISCARDED = 2
    MALFORMED = 3
    BYTES_RECEIVED = 4
    BYTES_WRITTEN = 5
    WRITE_SEQ = 6  # number of writes opened so far; identifies the current/last write
    PHASE = 7  # index into _PHASES
    N_WRITTEN = 8  # frames written by the current/last write


_N_SLOTS: Final = 9
_PHASES: Final[tuple[WritePhase | None, ...]] = (None, *WritePhase)
_PHASE_CODE: Final = {phase: code for code, phase in enumerate(_PHASES)}
_ACTIVE_PHASES: Final = frozenset(
    {WritePhase.WAITING_IMAGES, WritePhase.ACQUIRING_IMAGES, WritePhase.WRITING, WritePhase.FLUSHING_IMAGES}
)


# --------------------------------------------------------------------------- pipe messages


@dataclass(frozen=True)
class _Open:
    job: WriteJob


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Close:
    pass


@dataclass(frozen=True)
class _Ready:
    pid: int


@dataclass(frozen=True)
class _Reply:
    seq: int = 0  # the write the result belongs to
    result: WriteResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Ended:
    """Sent by the process when a write ends on its own (complete or failed)."""

    seq: int
    result: WriteResult


# ------------------------------------------------------------------------------------ handle


class ProcessDataPath:
    """The data path in its own process (`DataPathHandle`).

    `stream_endpoint` is where the frame source binds (e.g. ``tcp://127.0.0.1:9999``);
    `socket_kind` is ``"pull"`` for a PUSH source, ``"sub"`` for a PUB source. `rcvhwm` bounds the
    frames queued in ZeroMQ (see `rcvhwm_for_frames`). `start` may be called again after the
    process died or was closed; it starts a new one (with new counters).
    """

    def __init__(
        self,
        stream_endpoint: str,
        socket_kind: SocketKind = "pull",
        *,
        rcvhwm: int = DEFAULT_RCVHWM,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        start_timeout: float = 60.0,
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
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._shared_map: mmap.mmap | None = None
        self._shared: memoryview | None = None  # _N_SLOTS int64 written by the process
        self._command_lock = threading.Lock()  # one command in flight at a time
        self._state_lock = threading.Condition()
        self._replies: queue.Queue[_Reply | None] = queue.Queue()
        self._results: dict[int, WriteResult] = {}  # write seq -> how it ended
        self._jobs: dict[int, tuple[WriteJob, float]] = {}  # write seq -> job, open time
        self._death_handled = False
        self._reader: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the process; return once it is connected to the stream."""
        if self.is_alive():
            return
        # A subprocess running this module, not multiprocessing's spawn: spawn re-imports the
        # caller's __main__, which breaks scripts without a main guard.
        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        shared_fd = _anonymous_shared_file(_N_SLOTS * 8)
        try:
            self._shared_map = mmap.mmap(shared_fd, _N_SLOTS * 8)
            self._shared = memoryview(self._shared_map).cast("q")
            command = [
                sys.executable,
                "-m",
                "servers.writer.datapath",
                f"--endpoint={self.stream_endpoint}",
                f"--socket={self.socket_kind}",
                f"--rcvhwm={self.rcvhwm}",
                f"--flush-interval={self.flush_interval}",
                f"--conn-fd={child_conn.fileno()}",
                f"--shared-fd={shared_fd}",
            ]
            process = subprocess.Popen(command, pass_fds=(child_conn.fileno(), shared_fd), env=_child_env())
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
        if not isinstance(message, _Ready):
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
                self._command(_Close(), timeout=30.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        self._kill()
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
        reply = self._command(_Open(job), timeout)
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
        return self._command(_Stop(), timeout).result

    def progress(self) -> WriteProgress:
        """The phase and frame count of the current or last write."""
        shared = self._shared
        if shared is None:
            return WriteProgress(phase=None, n_written=0, result=None)
        seq = shared[_Slot.WRITE_SEQ]
        phase = _PHASES[shared[_Slot.PHASE]]
        n_written = shared[_Slot.N_WRITTEN]
        if phase in _ACTIVE_PHASES and not self.is_alive():
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

    def counters(self) -> FrameCounters:
        """Cumulative frame counters since the process started."""
        shared = self._shared
        if shared is None:
            return FrameCounters()
        values = shared[: _Slot.BYTES_WRITTEN + 1].tolist()
        return FrameCounters(
            received=values[_Slot.RECEIVED],
            written=values[_Slot.WRITTEN],
            discarded=values[_Slot.DISCARDED],
            malformed=values[_Slot.MALFORMED],
            bytes_received=values[_Slot.BYTES_RECEIVED],
            bytes_written=values[_Slot.BYTES_WRITTEN],
        )

    # -- internals -----------------------------------------------------------------------

    def _command(self, command: _Open | _Stop | _Close, timeout: float) -> _Reply:
        with self._command_lock:
            conn, shared = self._conn, self._shared
            if conn is None or shared is None or not self.is_alive():
                raise DataPathError("the data path process is not running")
            if isinstance(command, _Open):
                # Remembered before sending: the process may die before it replies.
                seq = shared[_Slot.WRITE_SEQ] + 1
                with self._state_lock:
                    self._jobs[seq] = (command.job, time.time())
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
            return reply

    def _read_pipe(
        self,
        conn: multiprocessing.connection.Connection,
        replies: queue.Queue[_Reply | None],
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
                return
            if isinstance(message, _Reply | _Ended) and message.result is not None:
                with self._state_lock:
                    results[message.seq] = message.result
                    self._state_lock.notify_all()
            if isinstance(message, _Reply):
                replies.put(message)

    def _death_result(self, seq: int, n_written: int) -> WriteResult:
        with self._state_lock:
            result = self._results.get(seq)
            if result is None:
                exitcode = self._process.returncode if self._process is not None else None
                job, opened = self._jobs.get(seq, (None, 0.0))
                result = WriteResult(
                    output_file=job.output_file if job else "",
                    n_images=job.n_images if job else 0,
                    n_written=n_written,
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
        if _PHASES[shared[_Slot.PHASE]] in _ACTIVE_PHASES:
            return self._death_result(shared[_Slot.WRITE_SEQ], shared[_Slot.N_WRITTEN])
        return None

    def _handle_death(self) -> None:
        """Once, after the process is gone: make a file it left open readable without h5clear."""
        with self._state_lock:
            if self._death_handled:
                return
            self._death_handled = True
        shared = self._shared
        if shared is None or _PHASES[shared[_Slot.PHASE]] not in _ACTIVE_PHASES:
            return
        job, _opened = self._jobs.get(shared[_Slot.WRITE_SEQ], (None, 0.0))
        output_file = job.output_file if job else None
        if output_file and os.path.exists(output_file):
            if clear_swmr_flags(output_file):
                log.warning("data path died during a write; %s is readable up to its last flush", output_file)
            else:
                log.warning(
                    "data path died during a write; open %s with swmr=True or run 'h5clear -s' on it",
                    output_file,
                )

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


# ------------------------------------------------------------------------------ file recovery


def clear_swmr_flags(path: str) -> bool:
    """Clear the "open for (SWMR) write" flags a killed writer leaves in an HDF5 superblock.

    Without this, only SWMR readers (or ``h5clear -s``) can open such a file. HDF5 does it with
    the file-access property ``clear_status_flags`` (what ``h5clear`` uses), reachable only through
    the generic ``H5Pset``, so it is called from the HDF5 library h5py has loaded. Returns False
    when that is not possible here.
    """
    import h5py

    library = _loaded_hdf5_library()
    if library is None:
        return False
    try:
        h5pset = library.H5Pset
        h5pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
        h5pset.restype = ctypes.c_int
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
        clear = ctypes.c_bool(True)
        if h5pset(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0:
            return False
        h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()
    except (OSError, AttributeError, ValueError):
        return False
    return True


def _loaded_hdf5_library() -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                name = os.path.basename(path)
                if name.startswith("libhdf5") and not name.startswith("libhdf5_hl") and ".so" in name:
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the process


def _child_env() -> dict[str, str]:
    """The data path's environment: glibc malloc tuned so frame buffers are reused.

    ZeroMQ allocates every received message; by default glibc serves large ones with mmap and
    returns them with munmap, so each frame costs ~one page fault per 4 KiB. Fixed thresholds keep
    frames up to 32 MiB on the heap and the heap from being trimmed below 512 MiB (memory stays
    bounded by the receive high-water mark, see `rcvhwm_for_frames`).
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(512 << 20))
    return env


def _anonymous_shared_file(size: int) -> int:
    """A file descriptor of `size` zero bytes of memory that a child process can map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("daqif-datapath-counters")
    else:  # not Linux: an unlinked temporary file
        fd, name = tempfile.mkstemp(prefix="daqif-datapath-")
        os.unlink(name)
    os.ftruncate(fd, size)
    return fd


def _process_main(argv: list[str]) -> None:
    """Entry point of the data path process (``python -m servers.writer.datapath``, started by
    `ProcessDataPath`; not a user command)."""
    parser = argparse.ArgumentParser(prog="daqif-datapath")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--socket", choices=["pull", "sub"], default="pull")
    parser.add_argument("--rcvhwm", type=int, default=DEFAULT_RCVHWM)
    parser.add_argument("--flush-interval", type=float, default=DEFAULT_FLUSH_INTERVAL_S)
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--shared-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C in the writer's terminal is for the control plane, which closes us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s daqif-datapath %(levelname)s %(message)s")
    conn = multiprocessing.connection.Connection(args.conn_fd)
    shared = mmap.mmap(args.shared_fd, _N_SLOTS * 8)
    os.close(args.shared_fd)
    socket_kind: SocketKind = "sub" if args.socket == "sub" else "pull"
    worker = _Worker(args.endpoint, socket_kind, args.rcvhwm, args.flush_interval, conn, shared)
    try:
        worker.run()
    finally:
        worker.shutdown()


def _raise_system_exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


class _Worker:
    """The receive loop; owns the ZeroMQ socket and the open write."""

    def __init__(
        self,
        endpoint: str,
        socket_kind: SocketKind,
        rcvhwm: int,
        flush_interval: float,
        conn: multiprocessing.connection.Connection,
        shared: Any,
    ) -> None:
        import numpy as np
        import zmq

        self._zmq = zmq
        self.conn = conn
        self.flush_interval = flush_interval
        self.shared = np.frombuffer(shared, dtype=np.int64)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB if socket_kind == "sub" else zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if socket_kind == "sub":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(conn.fileno(), zmq.POLLIN)
        # Counters live in plain ints on the hot path and are published once per batch.
        self.received = 0
        self.written = 0
        self.discarded = 0
        self.malformed = 0
        self.bytes_received = 0
        self.bytes_written = 0
        self.write: _Write | None = None
        self.write_seq = 0
        self.malformed_since_log = 0
        self.last_malformed = ""
        self.next_malformed_log = 0.0

    # -- loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.conn.send(_Ready(pid=os.getpid()))
        socket = self.socket
        conn_fd = self.conn.fileno()
        while True:
            write = self.write
            timeout_ms = 1000
            if write is not None and write.dirty:
                timeout_ms = max(0, int((write.next_flush - time.monotonic()) * 1000) + 1)
            ready = dict(self.poller.poll(timeout_ms))
            if ready.get(socket):
                self._drain()
            if (ready.get(conn_fd) or self.conn.poll(0)) and not self._handle_commands():
                return
            if self.write is not None and self.write.dirty and time.monotonic() >= self.write.next_flush:
                self._guarded(self.write.flush)
            if self.malformed_since_log and time.monotonic() >= self.next_malformed_log:
                self._log_malformed()

    def _drain(self) -> None:
        """Receive and handle up to _BATCH queued messages."""
        zmq = self._zmq
        recv = self.socket.recv_multipart
        noblock = zmq.NOBLOCK
        handle = self._handle_message
        for _ in range(_BATCH):
            try:
                parts = recv(noblock, copy=False)
            except zmq.Again:
                break
            handle(parts)
        self._publish()

    def _handle_message(self, parts: list[Any]) -> None:
        """The per-frame path: decode, check, write (or count why not)."""
        self.received += 1
        if len(parts) != 2:
            self.bytes_received += sum(len(part) for part in parts)
            self._count_malformed(f"message has {len(parts)} parts, a frame has 2 ([header, data])")
            return
        header_part, data = parts
        nbytes = len(data)
        self.bytes_received += nbytes + len(header_part)
        try:
            header = decode_header(header_part.buffer)
            check_data(header, data)
        except FrameError as exc:
            self._count_malformed(str(exc))
            return
        write = self.write
        if write is None:
            self.discarded += 1
            return
        problem = write.mismatch(header)
        if problem is not None:
            write.saw_frame()
            self._count_malformed(problem)
            return
        try:
            write.append(header, data)
        except Exception as exc:  # an HDF5 error: fail this write, keep the data path up
            self._fail_write(f"writing frame {header.image_id} failed: {exc}")
            return
        self.written += 1
        self.bytes_written += nbytes
        if write.full:
            self._finish_write()

    def _count_malformed(self, reason: str) -> None:
        self.malformed += 1
        self.malformed_since_log += 1
        self.last_malformed = reason

    def _log_malformed(self) -> None:
        log.warning(
            "%d malformed message(s) in the last %.0f s; last: %s",
            self.malformed_since_log,
            _MALFORMED_LOG_INTERVAL_S,
            self.last_malformed,
        )
        self.malformed_since_log = 0
        self.next_malformed_log = time.monotonic() + _MALFORMED_LOG_INTERVAL_S

    def _publish(self) -> None:
        shared = self.shared
        shared[_Slot.RECEIVED] = self.received
        shared[_Slot.WRITTEN] = self.written
        shared[_Slot.DISCARDED] = self.discarded
        shared[_Slot.MALFORMED] = self.malformed
        shared[_Slot.BYTES_RECEIVED] = self.bytes_received
        shared[_Slot.BYTES_WRITTEN] = self.bytes_written
        write = self.write
        if write is not None:
            shared[_Slot.N_WRITTEN] = write.n_written
            code = _PHASE_CODE[write.phase]
            if shared[_Slot.PHASE] != code:
                shared[_Slot.PHASE] = code

    def _set_phase(self, phase: WritePhase) -> None:
        self.shared[_Slot.PHASE] = _PHASE_CODE[phase]

    # -- commands --------------------------------------------------------------------------

    def _handle_commands(self) -> bool:
        """Answer every queued command; False when the process should exit."""
        while self.conn.poll(0):
            try:
                command = self.conn.recv()
            except (EOFError, OSError):
                return False  # the control plane is gone
            if isinstance(command, _Open):
                self.conn.send(self._open(command.job))
            elif isinstance(command, _Stop | _Close):
                if self.write is None:
                    self.conn.send(_Reply())
                else:
                    result = self._end_write(interrupted=True)
                    # The result goes out before the phase, so whoever sees the phase finds the result.
                    self.conn.send(_Reply(seq=self.write_seq, result=result))
                    self._set_phase(WritePhase.FAILED if result.error else WritePhase.FINISHED)
                if isinstance(command, _Close):
                    return False
        return True

    def _open(self, job: WriteJob) -> _Reply:
        if self.write is not None:
            return _Reply(error=f"a write is already open ({self.write.job.output_file})")
        try:
            write = _Write(job, self.flush_interval)
        except DataPathError as exc:
            return _Reply(error=str(exc))
        except Exception as exc:  # whatever it is, the data path stays up
            return _Reply(error=f"cannot open {job.output_file!r}: {exc}")
        self.write_seq += 1
        self.write = write
        self.shared[_Slot.WRITE_SEQ] = self.write_seq
        self.shared[_Slot.N_WRITTEN] = 0
        self._set_phase(WritePhase.WAITING_IMAGES)
        return _Reply()

    def _finish_write(self) -> None:
        result = self._end_write(interrupted=False)
        self._announce_end(result)

    def _fail_write(self, error: str) -> None:
        write = self.write
        assert write is not None
        log.error("write to %s failed: %s", write.job.output_file, error)
        write.abandon()
        self.write = None
        self._announce_end(write.result(interrupted=True, error=error))

    def _announce_end(self, result: WriteResult) -> None:
        self.shared[_Slot.N_WRITTEN] = result.n_written
        # The result goes out before the phase, so whoever sees the phase finds the result.
        self.conn.send(_Ended(self.write_seq, result))
        self._set_phase(WritePhase.FAILED if result.error else WritePhase.FINISHED)

    def _end_write(self, *, interrupted: bool) -> WriteResult:
        """Close the open write; the caller announces the result."""
        write = self.write
        assert write is not None
        self._set_phase(WritePhase.FLUSHING_IMAGES)
        error = None
        try:
            write.close()
        except Exception as exc:
            error = f"closing {write.job.output_file} failed: {exc}"
            log.error("%s", error)
            write.abandon()
        self.write = None
        self.shared[_Slot.N_WRITTEN] = write.n_written
        return write.result(interrupted=interrupted or write.n_written < write.job.n_images, error=error)

    def _guarded(self, action: Any) -> None:
        try:
            action()
        except Exception as exc:
            self._fail_write(f"flushing failed: {exc}")

    def shutdown(self) -> None:
        if self.write is not None:
            with contextlib.suppress(Exception):
                self._end_write(interrupted=True)
        self.socket.close(0)
        self.context.term()


class _Write:
    """One open output file."""

    def __init__(self, job: WriteJob, flush_interval: float) -> None:
        import h5py
        import numpy as np

        self.job = job
        self.flush_interval = flush_interval
        try:
            self.dtype = np.dtype(job.dtype).newbyteorder("<")
        except TypeError:
            raise DataPathError(f"dtype {job.dtype!r} is not a numpy dtype") from None
        if job.n_images < 1 or job.height < 1 or job.width < 1:
            raise DataPathError(
                f"n_images, height and width must be >= 1 (got {job.n_images}, {job.height}, {job.width})"
            )
        self.phase = WritePhase.WAITING_IMAGES
        self.n_written = 0
        self.n_flushed = 0
        self.full = False
        self.dirty = False
        self.next_flush = 0.0
        self.start_time = time.time()
        self.stop_time: float | None = None
        self.compressed = False
        self.data: Any = None
        self.image_id: Any = None
        self.status: Any = None
        self.write_chunk: Any = None
        buffer_len = min(job.n_images, _METADATA_BUFFER)
        self.id_buffer = np.zeros(buffer_len, dtype=np.uint64)
        self.status_buffer = np.zeros(buffer_len, dtype=np.uint64)
        self.buffered = 0
        self.file = _create_file(job, h5py)
        self.group = self.file[job.detector_name]

    # -- per frame ---------------------------------------------------------------------------

    def mismatch(self, header: FrameHeader) -> str | None:
        """Why `header` cannot go into this write (None if it can)."""
        if header.height != self.job.height or header.width != self.job.width or header.dtype != self.dtype:
            return (
                f"frame {header.image_id} is {header.height}x{header.width} {header.dtype.name}, "
                f"the write expects {self.job.height}x{self.job.width} {self.dtype.name}"
            )
        if header.compression is Compression.BSLZ4 and self.data is not None and not self.compressed:
            return f"frame {header.image_id} is compressed but this write stores uncompressed frames"
        return None

    def saw_frame(self) -> None:
        if self.phase is WritePhase.WAITING_IMAGES:
            self.phase = WritePhase.ACQUIRING_IMAGES

    def append(self, header: FrameHeader, data: Any) -> None:
        """Store one frame at the next index, straight from the received buffer."""
        compressed = header.compression is Compression.BSLZ4
        if self.data is None:
            self._create_datasets(compressed)
        index = self.n_written
        # Filter mask bit 0 set = "bitshuffle not applied to this chunk".
        self.write_chunk((index, 0, 0), data, 0 if compressed or not self.compressed else 1)
        slot = self.buffered
        self.id_buffer[slot] = header.image_id
        self.status_buffer[slot] = header.status
        self.buffered = slot + 1
        self.n_written = index + 1
        self.dirty = True
        self.phase = WritePhase.WRITING
        if self.n_written >= self.job.n_images:
            self.full = True
        elif self.buffered == len(self.id_buffer):
            self.flush()

    # -- file ------------------------------------------------------------------------------

    def _create_datasets(self, compressed: bool) -> None:
        import hdf5plugin
        import numpy as np

        job = self.job
        n = job.n_images
        filters = dict(hdf5plugin.Bitshuffle(cname="lz4")) if compressed else {}
        self.data = self.group.create_dataset(
            "data",
            shape=(n, job.height, job.width),
            maxshape=(n, job.height, job.width),
            chunks=(1, job.height, job.width),
            dtype=self.dtype,
            **filters,
        )
        meta_chunk = (min(n, 4096),)
        self.image_id = self.group.create_dataset(
            "image_id", shape=(0,), maxshape=(n,), chunks=meta_chunk, dtype=np.uint64
        )
        self.status = self.group.create_dataset(
            "status", shape=(0,), maxshape=(n,), chunks=meta_chunk, dtype=np.uint64
        )
        self.compressed = compressed
        self.write_chunk = self.data.id.write_direct_chunk
        self.file.swmr_mode = True
        self.next_flush = time.monotonic() + self.flush_interval

    def flush(self) -> None:
        """Make the frames written so far visible to SWMR readers."""
        start, stop = self.n_flushed, self.n_written
        if stop > start:
            count = self.buffered
            for dataset, buffer in ((self.image_id, self.id_buffer), (self.status, self.status_buffer)):
                dataset.resize((stop,))
                dataset[start:stop] = buffer[:count]
            self.buffered = 0
            self.n_flushed = stop
            self.file.flush()
        self.dirty = False
        self.next_flush = time.monotonic() + self.flush_interval

    def close(self) -> None:
        """Flush, shrink to the frames written, close."""
        self.phase = WritePhase.FLUSHING_IMAGES
        if self.data is None:
            self._create_datasets(compressed=False)
        self.flush()
        if self.n_written < self.job.n_images:
            self.data.resize((self.n_written, self.job.height, self.job.width))
        self.file.close()
        self.stop_time = time.time()

    def abandon(self) -> None:
        """Close after an error, keeping whatever reached the file."""
        with contextlib.suppress(Exception):
            self.file.close()
        self.stop_time = time.time()

    def result(self, *, interrupted: bool, error: str | None) -> WriteResult:
        return WriteResult(
            output_file=self.job.output_file,
            n_images=self.job.n_images,
            n_written=self.n_written,
            interrupted=interrupted,
            error=error,
            start_time=self.start_time,
            stop_time=self.stop_time if self.stop_time is not None else time.time(),
        )


def _create_file(job: WriteJob, h5py: Any) -> Any:
    """Create the output file with its root attributes; `DataPathError` says why it cannot be."""
    path = job.output_file
    folder = os.path.dirname(path) or "."
    if not os.path.isabs(path):
        raise DataPathError(f"output_file {path!r} is not an absolute path")
    if os.path.isdir(path):
        raise DataPathError(f"output_file {path!r} is a directory")
    if not os.path.isdir(folder):
        raise DataPathError(f"folder {folder!r} of output_file does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataPathError(f"no permission to create files in folder {folder!r}")
    existed = os.path.exists(path)
    try:
        handle = h5py.File(path, "w", libver="latest")
    except OSError as exc:
        raise DataPathError(f"cannot create {path!r}: {exc}") from None
    try:
        handle.attrs["run_id"] = job.run_id
        handle.attrs["detector_name"] = job.detector_name
        handle.attrs["n_images"] = job.n_images
        handle.create_group(job.detector_name)
        _give_to_owner(path, job.owner_uid)
    except Exception as exc:
        handle.close()
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise DataPathError(f"cannot prepare {path!r}: {exc}") from None
    return handle


def _give_to_owner(path: str, owner_uid: int | None) -> None:
    if owner_uid is None or owner_uid == os.geteuid():
        return
    try:
        os.chown(path, owner_uid, -1)
    except PermissionError:
        log.warning(
            "cannot give %s to uid %d (this process, uid %d, may not chown); it stays owned by uid %d",
            path,
            owner_uid,
            os.geteuid(),
            os.geteuid(),
        )


if __name__ == "__main__":
    # Run the imported module's code, not this __main__ copy: pickled messages name their classes
    # as servers.writer.datapath.*, which the control plane must be able to resolve.
    from servers.writer import datapath

    datapath._process_main(sys.argv[1:])
