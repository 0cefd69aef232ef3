"""The data path process: the receive loop (``python -m servers.writer.datapath.worker``).

Started by `handle.ProcessDataPath`, not a user command. It owns the ZeroMQ socket and the open
`output.OutputFile`; the per-frame path (`Worker._handle_message`) decodes a header, checks it
against the write and writes one chunk, with plain-int counters published to the shared page
once per batch. With ``--live-stream`` one int compare per frame decides whether the frame also
goes, uncopied, to the live stream's publisher thread (`servers.writer.live`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import mmap
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

from daqif.frame import FrameError, FrameHeader, check_data, decode_header
from servers.common.process import die_with_parent
from servers.writer.datapath import protocol
from servers.writer.datapath.api import DataPathError, WriteJob, WritePhase, WriteResult
from servers.writer.datapath.output import OutputFile
from servers.writer.datapath.protocol import (
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_PRIORITY_BOOST,
    DEFAULT_RCVHWM,
    PHASE_CODE,
    Slot,
    SocketKind,
)
from servers.writer.datapath.writeback import WRITEBACK_BYTES
from servers.writer.live import DEFAULT_LIVE_RATE_HZ, NEVER, LiveError, LiveOptions, LiveSampler

log = logging.getLogger(__name__)

BATCH: Final = 256  # frames received between looks at the command pipe and the flush clock
MALFORMED_LOG_INTERVAL_S: Final = 5.0
RECONNECT_GRACE_S: Final = 0.5
"""After a lost connection, how long ZeroMQ has to say it connects again itself (it says so at
once, with its reconnect timer) before the data path connects again explicitly."""


def main(argv: list[str]) -> None:
    """Entry point of the data path process (started by `ProcessDataPath`; not a user command)."""
    die_with_parent()
    parser = argparse.ArgumentParser(prog="daqif-datapath")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--socket", choices=["pull", "sub"], default="pull")
    parser.add_argument("--rcvhwm", type=int, default=DEFAULT_RCVHWM)
    parser.add_argument("--flush-interval", type=float, default=DEFAULT_FLUSH_INTERVAL_S)
    parser.add_argument("--max-message-bytes", type=int, default=-1)
    parser.add_argument("--priority-boost", type=int, default=DEFAULT_PRIORITY_BOOST)
    parser.add_argument("--verify-compressed", action="store_true")
    parser.add_argument("--io", choices=["direct", "page-cache"], default="direct")
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--shared-fd", type=int, required=True)
    parser.add_argument("--live-stream")
    live_mode = parser.add_mutually_exclusive_group()
    live_mode.add_argument("--live-rate", type=float)
    live_mode.add_argument("--live-every", type=int)
    args = parser.parse_args(argv)
    # Ctrl-C in the writer's terminal is for the control plane, which closes us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s daqif-datapath %(levelname)s %(message)s")
    priority = Priority(args.priority_boost)
    priority.check()  # at start-up, so a missing privilege is logged before the first write
    conn = multiprocessing.connection.Connection(args.conn_fd)
    shared = mmap.mmap(args.shared_fd, protocol.SHARED_BYTES)
    os.close(args.shared_fd)
    socket_kind: SocketKind = "sub" if args.socket == "sub" else "pull"
    worker = Worker(
        args.endpoint,
        socket_kind,
        args.rcvhwm,
        args.flush_interval,
        conn,
        shared,
        args.max_message_bytes,
        priority,
    )
    worker.verify_compressed = args.verify_compressed
    worker.direct_io = args.io == "direct"
    if args.live_stream:
        every = args.live_every
        rate = None if every is not None else (args.live_rate or DEFAULT_LIVE_RATE_HZ)
        try:
            worker.start_live(LiveOptions(args.live_stream, rate_hz=rate, every=every))
        except LiveError as exc:  # the writer checked the address; another process took it since
            log.error("no live stream: %s", exc)
    try:
        worker.run()
    finally:
        worker.shutdown()


class Priority:
    """The data path's boost: `boost` nice levels ahead of the control plane (which started this
    process at its own nice) while a write is open, the control plane's nice while none is.

    Boosted only while it writes: between writes the data path receives frames only to discard
    them, and a boosted process doing that on a small machine takes the CPU the control plane
    needs to push the end of the write it just finished (issue 12: ≤ 10 ms from the file being
    durable to FINISHED). It is relaxed before the end is announced, and raised again at the next
    open, before the first frame of that write.

    Linux nice is per thread: every thread running at the change (ZeroMQ's I/O thread, the
    writeback and live threads) gets it. Raising needs CAP_SYS_NICE or an RLIMIT_NICE allowing
    it (systemd ``LimitNICE=``); `check` tries once at start-up, and without either the data
    path stays at the control plane's nice and says so once. Lowering is always allowed.

    With the kernel's autogroup scheduling on (``kernel.sched_autogroup_enabled``, the default of
    most distributions) a thread's nice only weighs against the threads of its own session, and
    this process is a session of its own (`servers.common.process.spawn`): the CPU is shared
    between sessions first, so the threads' nice alone would buy nothing against the control plane
    or the clients polling it. The session's own nice (``/proc/self/autogroup``) follows too.
    """

    def __init__(self, boost: int) -> None:
        self.base = os.getpriority(os.PRIO_PROCESS, 0)
        self.boosted = max(-20, self.base - boost) if boost > 0 else self.base
        self.current = self.base

    def check(self) -> int:
        """Try the boost once (at start-up) and go back to the base; returns the nice a write
        will run at (the base when the boost is not permitted, after one warning)."""
        if self.boosted == self.base:
            return self.base
        try:
            self._apply(self.boosted)
        except PermissionError:
            log.warning(
                "cannot raise the data path's priority to nice %d (needs CAP_SYS_NICE or RLIMIT_NICE, "
                "e.g. systemd LimitNICE=%d); it runs at the control plane's nice %d, so many status "
                "pollers can cost frames",
                self.boosted,
                self.boosted,
                self.base,
            )
            self.boosted = self.base
        self.relax()
        return self.boosted

    def boost(self) -> None:
        """The nice of a write (before its first frame)."""
        if self.current == self.boosted:
            return
        try:
            self._apply(self.boosted)
        except OSError as exc:  # the privilege was there at start-up (RLIMIT_NICE lowered since?)
            log.warning("cannot raise the data path's priority to nice %d any more: %s", self.boosted, exc)
            self.boosted = self.base

    def relax(self) -> None:
        """The control plane's nice (no write open); a failure is logged, never raised (the write
        it follows has ended: its end is announced all the same)."""
        if self.current == self.base:
            return
        try:
            self._apply(self.base)
        except OSError as exc:
            log.warning("cannot lower the data path's priority to nice %d: %s", self.base, exc)

    def _apply(self, nice: int) -> None:
        for thread_id in sorted(int(task) for task in os.listdir("/proc/self/task")):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.setpriority(os.PRIO_PROCESS, thread_id, nice)
        raise_autogroup(nice)
        self.current = nice


AUTOGROUP: Final = "/proc/self/autogroup"


def raise_autogroup(nice: int) -> None:
    """Give this process's scheduling autogroup (its session) `nice`, if autogroups are in use.

    Absent file (kernel without autogroups) or autogroups switched off: nothing to do. A
    negative nice needs the same privilege as raising a thread (PermissionError otherwise).
    """
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return
    if not enabled or not os.path.exists(AUTOGROUP):
        return
    with open(AUTOGROUP, "w") as f:
        f.write(f"{nice}\n")


def _raise_system_exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


class Worker:
    """The receive loop; owns the ZeroMQ socket and the open write."""

    def __init__(
        self,
        endpoint: str,
        socket_kind: SocketKind,
        rcvhwm: int,
        flush_interval: float,
        conn: multiprocessing.connection.Connection,
        shared: Any,
        max_message_bytes: int = -1,
        priority: Priority | None = None,
    ) -> None:
        import numpy as np
        import zmq

        self._zmq = zmq
        self.conn = conn
        self.flush_interval = flush_interval
        self.priority = priority or Priority(0)
        self.verify_compressed = False  # decode every LZ4 block of a compressed frame (costly)
        self.direct_io = False  # uncompressed frames past the page cache (`datapath.direct`)
        self.shared = np.frombuffer(shared, dtype=np.int64)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB if socket_kind == "sub" else zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A message part larger than any frame can be is refused by ZeroMQ itself (it drops the
        # connection; the peer reconnects) instead of being buffered; -1: no limit.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if socket_kind == "sub":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoint = endpoint
        self.socket.connect(endpoint)
        # ZeroMQ treats an oversized message as a protocol error and does not reconnect after one;
        # the monitor tells us, so the stream is connected again (off the per-frame path). After
        # an ordinary loss ZeroMQ reconnects by itself, keeping the frames already queued.
        self.reconnecting_events = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | self.reconnecting_events)
        self.reconnect_at: float | None = None  # a lost connection ZeroMQ has not said it retries
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(conn.fileno(), zmq.POLLIN)
        # Counters live in plain ints on the hot path and are published once per batch.
        self.received = 0
        self.written = 0
        self.discarded = 0
        self.malformed = 0
        self.bytes_received = 0
        self.bytes_written = 0
        self.next_writeback = WRITEBACK_BYTES  # bytes_written at which the open file is next written back
        self.write: OutputFile | None = None
        self.write_seq = 0
        self.malformed_since_log = 0
        self.last_malformed = ""
        self.next_malformed_log = 0.0
        self.live: LiveSampler | None = None
        self.live_take_at = NEVER  # `received` at which the next good frame goes to the live stream

    def start_live(self, options: LiveOptions) -> None:
        """Publish a sample of the frames received (`servers.writer.live`)."""
        self.live = LiveSampler(self.context, options)
        self.live_take_at = self.live.take_at
        log.info("live stream on %s", options.endpoint)

    # -- loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.conn.send(protocol.Ready(pid=os.getpid()))
        socket = self.socket
        conn_fd = self.conn.fileno()
        while True:
            ready = dict(self.poller.poll(self._poll_timeout_ms()))
            if ready.get(socket):
                self._drain()
            if ready.get(self.monitor):
                self._watch_connection()
            if self.reconnect_at is not None and time.monotonic() >= self.reconnect_at:
                self._reconnect()
            if (ready.get(conn_fd) or self.conn.poll(0)) and not self._handle_commands():
                return
            write = self.write
            if write is not None:
                now = time.monotonic()
                if write.mismatch_expired(now):
                    self._fail_mismatched_write(write.mismatch_problem)
                elif write.dirty and now >= write.next_flush:
                    self._guarded(write.flush)
            if self.malformed_since_log and time.monotonic() >= self.next_malformed_log:
                self._log_malformed()

    def _poll_timeout_ms(self) -> int:
        """Until the next flush or mismatch deadline of the open write, or the explicit reconnect;
        1 s when there is none."""
        write = self.write
        deadlines = [] if self.reconnect_at is None else [self.reconnect_at]
        if write is not None:
            if write.dirty:
                deadlines.append(write.next_flush)
            mismatch = write.mismatch_deadline()
            if mismatch is not None:
                deadlines.append(mismatch)
        if not deadlines:
            return 1000
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _drain(self) -> bool:
        """Receive and handle up to BATCH queued messages; True when BATCH were (more may wait)."""
        zmq = self._zmq
        recv = self.socket.recv_multipart
        noblock = zmq.NOBLOCK
        handle = self._handle_message
        live = self.live
        if live is not None:
            live.tick()
            self.live_take_at = live.take_at
        for _ in range(BATCH):
            try:
                parts = recv(noblock, copy=False)
            except zmq.Again:
                self._publish()
                return False
            handle(parts)
        self._publish()
        return True

    def _watch_connection(self) -> None:
        """Read the monitor's events: a lost connection starts the grace period of
        `RECONNECT_GRACE_S`; ZeroMQ saying it connects again ends it.

        ZeroMQ keeps the frames already queued across a reconnect of its own, so the data path
        leaves those alone: disconnecting the endpoint itself would drop every frame queued and
        not yet read (up to the receive high-water mark), the last frames of a source that sent
        them and went away. Only a connection ZeroMQ gave up on (an oversized message) is
        connected again explicitly, in `_reconnect`.
        """
        from zmq.utils.monitor import parse_monitor_message

        zmq = self._zmq
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_DISCONNECTED:
                if self.reconnect_at is None:
                    self.reconnect_at = time.monotonic() + RECONNECT_GRACE_S
                log.info("the connection to %s was lost", self.endpoint)
            elif event & self.reconnecting_events:
                self.reconnect_at = None

    def _reconnect(self) -> None:
        """A lost connection that ZeroMQ did not say it retries (it does not reconnect after a
        message over ``ZMQ_MAXMSGSIZE``): take every frame already queued, then connect again."""
        zmq = self._zmq
        self.reconnect_at = None
        while self._drain():
            pass
        log.warning(
            "lost the connection to %s and ZeroMQ does not connect again (the source sent a message "
            "larger than a frame can be?); connecting again",
            self.endpoint,
        )
        with contextlib.suppress(zmq.ZMQError):
            self.socket.disconnect(self.endpoint)
        self.socket.connect(self.endpoint)

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
            check_data(header, data, decode=self.verify_compressed)
        except FrameError as exc:
            self._count_malformed(str(exc))
            return
        if self.received >= self.live_take_at:  # one int compare per frame; see servers.writer.live
            self._sample(header, data)
        write = self.write
        if write is None:
            self.discarded += 1
            return
        if not write.fits(header):
            self._reject(write, header)
            return
        try:
            write.append(header, data)
        except Exception as exc:  # an HDF5 error: fail this write, keep the data path up
            self._fail_write(f"writing frame {header.image_id} failed: {exc}")
            return
        self.written += 1
        self.bytes_written += nbytes
        if self.bytes_written >= self.next_writeback:
            self.next_writeback = self.bytes_written + WRITEBACK_BYTES
            write.kick_writeback()
        if write.full:
            self._finish_write()

    def _sample(self, header: FrameHeader, data: Any) -> None:
        live = self.live
        assert live is not None
        live.take(header, data.buffer, self.received)
        self.live_take_at = live.take_at

    def _reject(self, write: OutputFile, header: FrameHeader) -> None:
        """A good frame that does not fit the write: counted as malformed, never written; a write
        that keeps getting only such frames fails (see `OutputFile.note_mismatch`)."""
        write.saw_frame()
        if write.has_shape_of(header):
            self._count_malformed(
                f"frame {header.image_id} is compressed but this write stores uncompressed frames"
            )
            return
        problem = write.shape_problem(header)
        self._count_malformed(problem)
        write.note_mismatch(problem)
        if write.mismatch_expired(time.monotonic()):
            self._fail_mismatched_write(problem)

    def _count_malformed(self, reason: str) -> None:
        self.malformed += 1
        self.malformed_since_log += 1
        self.last_malformed = reason

    def _log_malformed(self) -> None:
        log.warning(
            "%d malformed message(s) in the last %.0f s; last: %s",
            self.malformed_since_log,
            MALFORMED_LOG_INTERVAL_S,
            self.last_malformed,
        )
        self.malformed_since_log = 0
        self.next_malformed_log = time.monotonic() + MALFORMED_LOG_INTERVAL_S

    def _publish(self) -> None:
        shared = self.shared
        shared[Slot.RECEIVED] = self.received
        shared[Slot.WRITTEN] = self.written
        shared[Slot.DISCARDED] = self.discarded
        shared[Slot.MALFORMED] = self.malformed
        shared[Slot.BYTES_RECEIVED] = self.bytes_received
        shared[Slot.BYTES_WRITTEN] = self.bytes_written
        write = self.write
        if write is not None:
            shared[Slot.N_WRITTEN] = write.n_written
            code = PHASE_CODE[write.phase]
            if shared[Slot.PHASE] != code:
                shared[Slot.PHASE] = code

    def _set_phase(self, phase: WritePhase) -> None:
        self.shared[Slot.PHASE] = PHASE_CODE[phase]

    # -- commands --------------------------------------------------------------------------

    def _handle_commands(self) -> bool:
        """Answer every queued command; False when the process should exit."""
        while self.conn.poll(0):
            try:
                command = self.conn.recv()
            except (EOFError, OSError):
                return False  # the control plane is gone
            if isinstance(command, protocol.Open):
                self.conn.send(self._open(command.job))
            elif isinstance(command, protocol.Resize):
                self.conn.send(self._resize(command))
            elif isinstance(command, protocol.Stop | protocol.Close):
                if self.write is None:
                    self.conn.send(protocol.Reply())
                else:
                    result = self._end_write(interrupted=True)
                    # The result goes out before the phase, so whoever sees the phase finds the result.
                    self.conn.send(protocol.Reply(seq=self.write_seq, result=result))
                    self._set_phase(WritePhase.FAILED if result.error else WritePhase.FINISHED)
                if isinstance(command, protocol.Close):
                    return False
        return True

    def _open(self, job: WriteJob) -> protocol.Reply:
        if self.write is not None:
            return protocol.Reply(error=f"a write is already open ({self.write.job.output_file})")
        try:
            write = OutputFile(job, self.flush_interval, self.direct_io)
        except DataPathError as exc:
            return protocol.Reply(error=str(exc))
        except Exception as exc:  # whatever it is, the data path stays up
            return protocol.Reply(error=f"cannot open {job.output_file!r}: {exc}")
        self.write_seq += 1
        self.write = write
        self.priority.boost()
        self.next_writeback = self.bytes_written + WRITEBACK_BYTES
        self.shared[Slot.WRITE_SEQ] = self.write_seq
        self.shared[Slot.N_WRITTEN] = 0
        self._set_phase(WritePhase.WAITING_IMAGES)
        return protocol.Reply()

    def _resize(self, command: protocol.Resize) -> protocol.Reply:
        """New receive queue limits: ZeroMQ applies them to new connections only, so the socket
        connects again (frames queued by the old connection are received first or dropped;
        between writes they would only be discarded)."""
        if self.write is not None:
            return protocol.Reply(error=f"a write is open ({self.write.job.output_file}); resize after it")
        zmq = self._zmq
        self.socket.setsockopt(zmq.RCVHWM, command.rcvhwm)
        self.socket.setsockopt(zmq.MAXMSGSIZE, command.max_message_bytes)
        with contextlib.suppress(zmq.ZMQError):
            self.socket.disconnect(self.endpoint)
        self.socket.connect(self.endpoint)
        log.info(
            "receive queue resized: at most %d messages of at most %d bytes",
            command.rcvhwm,
            command.max_message_bytes,
        )
        return protocol.Reply()

    def _finish_write(self) -> None:
        result = self._end_write(interrupted=False)
        self._announce_end(result)

    def _fail_write(self, error: str) -> None:
        write = self.write
        assert write is not None
        log.error("write to %s failed: %s", write.job.output_file, error)
        write.abandon()
        self.write = None
        self.priority.relax()
        self._announce_end(write.result(interrupted=True, error=error))

    def _fail_mismatched_write(self, problem: str) -> None:
        """End a write that only got frames of another shape or dtype: the file is closed like
        an interrupted one (datasets shrunk to what was written), the result says why."""
        log.error("write to %s failed: %s", self.write.job.output_file if self.write else "?", problem)
        result = self._end_write(interrupted=True)
        self._announce_end(dataclasses.replace(result, error=result.error or problem))

    def _announce_end(self, result: WriteResult) -> None:
        self.shared[Slot.N_WRITTEN] = result.n_written
        # The result goes out before the phase, so whoever sees the phase finds the result.
        self.conn.send(protocol.Ended(self.write_seq, result))
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
        self.priority.relax()  # before the end is announced: the control plane pushes it
        self.shared[Slot.N_WRITTEN] = write.n_written
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
        if self.live is not None:
            self.live.close()
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)
        self.context.term()


if __name__ == "__main__":
    main(sys.argv[1:])
