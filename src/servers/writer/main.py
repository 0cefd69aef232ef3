"""`daqif-writer`: the Standard DAQ compatible writer (REST + gRPC control, data path process).

    daqif-writer --stream tcp://127.0.0.1:9999 [--config DETECTOR.json] [--rest-port 5000]
                 [--grpc-port 12084] [--redis-url redis://127.0.0.1:6379/0] [--allowed-root DIR ...]
                 [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]
                 [--workers N] [--group-member HOST:PORT ...]

With `--workers N` (N data path processes here) or `--group-member` (other writers on the same
PUSH source) it is a writer group: each write is shared among the members and `output_file` is
one virtual dataset over their parts (`group.py`, docs/writer.md "Writer groups").

`GET /metrics` on the REST port serves the writer's Prometheus metrics (`metrics.py`).
`--live-stream tcp://HOST:PORT [--live-rate HZ | --live-every N]` publishes a sample of the frames
(`live.py`) and serves `GET /daq/preview` and `GET /daq/live` (`preview.py`).

REST (uvicorn) and gRPC run in one asyncio loop in this process; the data path (ZeroMQ → HDF5)
runs in its own process. Servers bind 127.0.0.1 unless `--host` says otherwise. A port of 0 picks
a free one; the line printed when ready gives the ports in use:

    daqif-ready writer rest=http://127.0.0.1:5000 grpc=127.0.0.1:12084

A port already in use (by anything, another writer's gRPC port included: gRPC's SO_REUSEPORT is
off) stops it with exit code 2 and one line naming the port.

With `--tls-cert`/`--tls-key` the gRPC WriterControl serves TLS only (mutual TLS with
`--tls-client-ca`) and the ready line prints `grpc=grpcs://HOST:PORT`; the REST API stays plain HTTP
(the std_daq clients speak plain HTTP): keep it on loopback or behind a TLS proxy.

SIGINT/SIGTERM stop cleanly: an open file is closed as interrupted, the data path is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import uvicorn

from daqif import defaults
from daqif.errors import DaqException
from daqif.tls import TlsError, split_address, tls_address
from daqif.v1 import writer_pb2_grpc
from servers.common import roles
from servers.common.grpc_server import (
    PortUnavailable,
    add_health_and_reflection,
    bind,
    cannot_bind,
    mark_serving,
    new_server,
)
from servers.common.paths import resolve_roots
from servers.common.process import die_with_parent
from servers.common.ready import ready_line
from servers.common.tls import add_tls_arguments, security_of, tls_from_args
from servers.writer.core import DEFAULT_SYNC_TIMEOUT, DataPathFactory, WriterCore
from servers.writer.datapath.api import DataPathHandle
from servers.writer.datapath.handle import ProcessDataPath, max_message_for_frames, rcvhwm_for_frames
from servers.writer.datapath.journal import WriteJournal
from servers.writer.datapath.protocol import DEFAULT_PRIORITY_BOOST, FrameIO, SocketKind
from servers.writer.group import GroupDataPath, Member, RemoteMember
from servers.writer.grpc_service import SERVICE_NAME, WriterControlService
from servers.writer.live import DEFAULT_LIVE_RATE_HZ, LiveError, LiveOptions, check_bindable
from servers.writer.metrics import start_metrics
from servers.writer.models import DaqConfig, UidRange, load_config
from servers.writer.preview import LivePreview
from servers.writer.redis_streams import DEFAULT_MAXLEN, RedisStreams
from servers.writer.rest import create_app

DEFAULT_REST_PORT = defaults.WRITER_REST_PORT
DEFAULT_GRPC_PORT = defaults.WRITER_GRPC_PORT

_log = logging.getLogger("daqif-writer")
_OVERWRITE = "the writer could overwrite it; give directories apart"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqif-writer",
        description="Standard DAQ compatible detector writer: ZeroMQ frames to HDF5, controlled over "
        "the std_daq REST API and gRPC WriterControl.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface REST and gRPC bind to (default %(default)s)"
    )
    parser.add_argument(
        "--rest-port",
        type=int,
        default=DEFAULT_REST_PORT,
        help="std_daq REST port, 0 = any free (default %(default)s)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help="gRPC WriterControl port, 0 = any free (default %(default)s)",
    )
    parser.add_argument(
        "--stream", required=True, help="ZeroMQ endpoint of the frame source, e.g. tcp://127.0.0.1:9999"
    )
    parser.add_argument(
        "--socket",
        choices=("pull", "sub"),
        default="pull",
        help="ZeroMQ socket type to connect with (default pull)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="detector config JSON (full or partial, merged into the embedded defaults); "
        "config changes are saved to it",
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path("data"), help="data root (default ./data, created)"
    )
    parser.add_argument(
        "--allowed-root",
        type=Path,
        action="append",
        default=[],
        help="directory output files must lie under (repeatable; default: the data root)",
    )
    parser.add_argument(
        "--allowed-uids",
        type=_uid_range,
        metavar="MIN-MAX",
        help="uids writer_user_id may give files to, besides the uid the writer runs as (default: none)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="directory the writer keeps its write journal in, one writer per directory; output files "
        "may not go there (default: DATA_ROOT/.daqif-writer/rest-PORT)",
    )
    parser.add_argument("--redis-url", help="publish daq:status/config/log/stat streams to this Redis")
    parser.add_argument(
        "--redis-maxlen",
        type=int,
        default=DEFAULT_MAXLEN,
        help="approximate length streams are trimmed to (default %(default)s)",
    )
    parser.add_argument(
        "--sync-timeout",
        type=float,
        default=DEFAULT_SYNC_TIMEOUT,
        help="longest wait of a write_sync call, seconds (default %(default)s)",
    )
    parser.add_argument(
        "--datapath-priority-boost",
        type=int,
        default=DEFAULT_PRIORITY_BOOST,
        metavar="NICE_LEVELS",
        help="nice levels the data path runs ahead of the control plane, so status polling cannot "
        "take the CPU frames need; needs CAP_SYS_NICE or RLIMIT_NICE, 0 = off (default %(default)s)",
    )
    parser.add_argument(
        "--verify-compressed",
        action="store_true",
        help="decode every LZ4 block of a bitshuffle-LZ4 frame before writing it: garbage inside correctly "
        "framed blocks is malformed, not written; costs 11-24 times the default framing check per frame",
    )
    parser.add_argument(
        "--datapath-io",
        choices=["direct", "page-cache"],
        default="direct",
        help="how uncompressed frames reach the file: 'direct' past the page cache (O_DIRECT, in "
        "aligned batches) where the file system and the frame size (a multiple of 4096 bytes) allow "
        "it, else through it; 'page-cache' always through it (default %(default)s)",
    )
    parser.add_argument(
        "--live-stream",
        metavar="tcp://HOST:PORT",
        help="publish a sample of the frames received (array-1.0) on a ZeroMQ PUB socket bound there; "
        "also serves GET /daq/preview and /daq/live (default: no live stream)",
    )
    live_mode = parser.add_mutually_exclusive_group()
    live_mode.add_argument(
        "--live-rate",
        type=float,
        metavar="HZ",
        help=f"at most HZ frames a second on the live stream (default {DEFAULT_LIVE_RATE_HZ:g})",
    )
    live_mode.add_argument("--live-every", type=int, metavar="N", help="every N-th frame received instead")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="data path processes on this host, all connected to --stream; with N > 1 a write is "
        "shared among them and OUTPUT_FILE is one virtual dataset over their parts (default 1)",
    )
    parser.add_argument(
        "--group-member",
        action="append",
        type=_member_address,
        default=[],
        metavar="HOST:PORT",
        help="gRPC WriterControl of another daqif-writer on the same PUSH source (repeatable): this "
        "writer coordinates every write across itself and its members (docs/writer.md, Writer groups)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    add_tls_arguments(parser)
    return parser


def _uid_range(text: str) -> UidRange:
    try:
        return UidRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def live_options(args: argparse.Namespace) -> LiveOptions | None:
    """The live stream asked for on the command line; `LiveError` says what is wrong with it."""
    if args.live_stream is None:
        if args.live_rate is not None or args.live_every is not None:
            raise LiveError("--live-rate and --live-every need --live-stream")
        return None
    every = args.live_every
    rate = None if every is not None else (DEFAULT_LIVE_RATE_HZ if args.live_rate is None else args.live_rate)
    options = LiveOptions(args.live_stream, rate_hz=rate, every=every)
    check_bindable(options.endpoint)
    return options


def _member_address(text: str) -> str:
    """`HOST:PORT` or `grpcs://HOST:PORT` (a member serving TLS), the port a number in 1-65535."""
    host_port, _ = split_address(text)
    host, sep, port = host_port.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (or grpcs://HOST:PORT): give a member's gRPC WriterControl address"
        )
    return text


def _own_address(members: Sequence[str], host: str, port: int) -> str | None:
    """The member address that names this writer's own gRPC port, if any (it would wait on itself)."""
    own_hosts = {host, "127.0.0.1", "localhost", "::1", "[::1]", socket.gethostname()}
    for member in members:
        member_host, _, member_port = split_address(member)[0].rpartition(":")
        if int(member_port) == port and member_host in own_hosts:
            return member
    return None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def make_datapath_factory(
    stream: str,
    socket_kind: str,
    journal: WriteJournal | None = None,
    priority_boost: int = DEFAULT_PRIORITY_BOOST,
    verify_compressed: bool = False,
    live: LiveOptions | None = None,
    *,
    frame_io: FrameIO = "direct",
    workers: int = 1,
    group_members: Sequence[str] = (),
    state_dir: Path | None = None,
) -> DataPathFactory:
    """A callable `config -> DataPathHandle` making the real data path process for `stream`.

    Each write carries its frame geometry (`WriteJob`); the config only sizes the receive queue
    and the message size limit of a newly started process. With `workers` > 1 or `group_members`
    it makes a writer group (`servers.writer.group`): `workers` processes here (worker k > 0
    journals its writes in `state_dir/write-<k>.json`), then the remote members.
    """
    kind: SocketKind = "sub" if socket_kind == "sub" else "pull"

    def process(config: DaqConfig, journal: WriteJournal | None, live: LiveOptions | None) -> ProcessDataPath:
        # ZeroMQ bounds its queue in messages: size it so queued frames stay within a memory budget.
        frame_bytes = config.image_pixel_height * config.image_pixel_width * max(1, config.bit_depth // 8)
        return ProcessDataPath(
            stream,
            kind,
            rcvhwm=rcvhwm_for_frames(frame_bytes),
            max_message_bytes=max_message_for_frames(config.frame_nbytes),
            journal=journal,
            priority_boost=priority_boost,
            verify_compressed=verify_compressed,
            live=live,
            frame_io=frame_io,
        )

    def factory(config: DaqConfig) -> DataPathHandle:
        if workers == 1 and not group_members:
            return process(config, journal, live)
        # One live stream per writer: worker 0 samples the frames it is dealt (docs/writer.md).
        members = [Member("worker 0", process(config, journal, live))]
        for k in range(1, workers):
            own = WriteJournal(state_dir / f"write-{k}.json") if state_dir is not None else None
            members.append(Member(f"worker {k}", process(config, own, None)))
        for address in group_members:
            remote = RemoteMember(address)
            members.append(Member(remote.name, remote))
        return GroupDataPath(members)

    return factory


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process handles SIGINT/SIGTERM once for both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind_rest_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> int:
    tls = tls_from_args(args)
    grpc_credentials = tls.credentials() if tls is not None else None  # the files checked before any bind
    config = load_config(args.config)
    live = live_options(args)
    data_root: Path = args.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    roots = resolve_roots(args.allowed_root or [data_root])
    for root in roots:  # a DPM started by hand marked its workspace and receivers (servers.common.roles)
        roles.refuse_overlap(root, "allowed root", roles.Role.WRITER_ROOT, _OVERWRITE)
    # Bind both ports before anything starts, so a busy port is a one-line error naming it.
    try:
        rest_socket = _bind_rest_socket(args.host, args.rest_port)
    except OSError as exc:
        raise PortUnavailable(cannot_bind("REST API", args.host, args.rest_port, str(exc.strerror))) from None
    grpc_server = new_server()
    try:
        grpc_port = bind(grpc_server, args.host, args.grpc_port, "gRPC WriterControl", grpc_credentials)
    except PortUnavailable:
        rest_socket.close()
        await grpc_server.stop(None)
        raise
    rest_port = rest_socket.getsockname()[1]
    itself = _own_address(args.group_member, args.host, grpc_port)
    if itself is not None:
        rest_socket.close()
        await grpc_server.stop(None)
        raise DaqException.invalid_argument(
            f"--group-member {itself} is this writer's own gRPC port; name the other writers of the group"
        )
    # The REST port identifies a writer on its host, so it names the default state directory.
    state_dir: Path = (args.state_dir or data_root / ".daqif-writer" / f"rest-{rest_port}").resolve()
    state_lock = _lock_state_dir(state_dir)  # held (open) until this process ends
    for root in roots:
        roles.mark_quietly(root, roles.Role.WRITER_ROOT, roles.owner_of_this_process("daqif-writer"))
    core = WriterCore(
        make_datapath_factory(
            args.stream,
            args.socket,
            WriteJournal(state_dir / "write.json"),
            priority_boost=args.datapath_priority_boost,
            verify_compressed=args.verify_compressed,
            live=live,
            frame_io=args.datapath_io,
            workers=args.workers,
            group_members=args.group_member,
            state_dir=state_dir,
        ),
        config,
        allowed_roots=roots,
        allowed_uids=args.allowed_uids,
        private_dirs=[state_dir, data_root / ".daqif-writer"],
        config_file=args.config,
        sync_timeout=args.sync_timeout,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    await core.start()
    writer_pb2_grpc.add_WriterControlServicer_to_server(WriterControlService(core), grpc_server)
    health = add_health_and_reflection(grpc_server, [SERVICE_NAME])
    await grpc_server.start()
    await mark_serving(health, [SERVICE_NAME])

    redis: RedisStreams | None = None
    redis_task: asyncio.Task[None] | None = None
    if args.redis_url:
        redis = RedisStreams(core, args.redis_url, maxlen=args.redis_maxlen)
        redis_task = asyncio.create_task(redis.run(), name="redis")
        redis_task.add_done_callback(_log_unexpected_end)
    metrics, metrics_task = start_metrics(core, redis)
    metrics_task.add_done_callback(_log_unexpected_end)
    preview = LivePreview(live.endpoint) if live is not None else None
    preview_task: asyncio.Task[None] | None = None
    if preview is not None:
        preview_task = asyncio.create_task(preview.run(), name="live-preview")
        preview_task.add_done_callback(_log_unexpected_end)
    rest = _Uvicorn(
        uvicorn.Config(
            create_app(core, metrics.registry, preview),
            # httptools parses a request in C, h11 in Python: a poll costs the control plane a
            # fraction of the CPU (docs/writer.md, "Status polling").
            http="httptools",
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    rest_task = asyncio.create_task(rest.serve(sockets=[rest_socket]), name="rest")
    while not rest.started and not rest_task.done():
        await asyncio.sleep(0.02)
    if rest_task.done():
        rest_task.result()
        return 1

    grpc_address = f"{args.host}:{grpc_port}"
    print(
        ready_line(
            "writer",
            rest=f"http://{args.host}:{rest_port}",
            grpc=tls_address(grpc_address) if tls is not None else grpc_address,
        ),
        flush=True,
    )
    _log.info("gRPC WriterControl on %s (%s)", grpc_address, security_of(tls))
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, rest_task}, return_when=asyncio.FIRST_COMPLETED)
    _log.info("shutting down")

    rest.should_exit = True
    if preview is not None:
        await preview.close()  # ends the /daq/live streams, so the REST server stops at once
    await grpc_server.stop(grace=1.0)
    # Closing the core ends an open write (as interrupted), which also releases a waiting write_sync.
    await core.close()
    with contextlib.suppress(Exception):
        await rest_task
    if redis_task is not None and redis is not None:
        redis_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await redis_task
        await redis.close()
    metrics_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await metrics_task
    if preview_task is not None:
        preview_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await preview_task
    stop_task.cancel()
    state_lock.close()
    return 0


def _lock_state_dir(state_dir: Path) -> IO[bytes]:
    """Create and lock the state directory: two writers sharing one journal would repair each
    other's files."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(state_dir / "lock", "ab")  # noqa: SIM115  # held for the process's lifetime
    except OSError as exc:
        raise OSError(f"cannot use the state directory {state_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OSError(
            f"another writer uses the state directory {state_dir}; give each writer its own --state-dir"
        ) from None
    return lock


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("%s stopped", task.get_name(), exc_info=task.exception())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `daqif-writer`."""
    die_with_parent()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(args))
    except DaqException as exc:
        print(f"daqif-writer: {exc.message}", file=sys.stderr)
        return 2
    except (TlsError, roles.RolesOverlap, LiveError) as exc:
        print(f"daqif-writer: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"daqif-writer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
