"""The Redis streams of a real writer, read from a real redis-server the way the seed's example does."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from std_daq_client import StdDaqClient

from daqif.testing import wait_for
from servers.common.launch import WriterProcess, free_port

from .conftest import RedisServer, Simulator, WriterFactory, stop_process

STREAMS = ("daq:status", "daq:config", "daq:log", "daq:stat")


def read_all(client: redis.Redis, stream: str, last_id: str = "0") -> list[tuple[str, dict[str, Any]]]:
    """Every entry after `last_id` as (id, decoded JSON), read with XREAD and field b'json'."""
    response: Any = client.xread({stream: last_id}, block=100)
    entries: list[tuple[str, dict[str, Any]]] = []
    for _name, items in response:
        for entry_id, fields in items:
            entries.append((entry_id.decode(), json.loads(fields[b"json"].decode("utf-8"))))
    return entries


def test_streams_carry_status_config_log_and_stats(
    writer_factory: WriterFactory, simulator: Simulator, redis_server: RedisServer, data_root: Path
) -> None:
    writer = writer_factory(simulator.endpoint, redis_url=redis_server.url, redis_maxlen=1000)
    std = StdDaqClient(url_base=writer.rest_url)
    r = redis.Redis(port=redis_server.port)

    config_entries = wait_for(lambda: read_all(r, "daq:config"))
    assert config_entries[-1][0] == std.get_deployment_status()["config_id"], "entry id is the config id"
    assert config_entries[-1][1] == std.get_config()

    applied = std.set_config({"n_modules": 3})
    entries = wait_for(lambda: (e := read_all(r, "daq:config", config_entries[-1][0])) and e)
    assert entries == [(std.get_deployment_status()["config_id"], applied)]

    output = data_root / "redis.h5"
    std.start_writer_sync({"output_file": str(output), "n_images": 8, "run_id": 4711})
    logs = wait_for(lambda: read_all(r, "daq:log"))
    assert [entry for _id, entry in logs] == std.get_logs(1)
    assert logs[0][1]["info"]["output_file"] == str(output)

    statuses = wait_for(
        lambda: (
            (s := [e for _i, e in read_all(r, "daq:status")])
            and s[-1]["acquisition"]["info"]["run_id"] == 4711
            and s
        )
    )
    states = [(s["state"], s["acquisition"]["state"]) for s in statuses]
    assert ("WRITING", "WAITING_IMAGES") in states, "the start of the write is published on change"
    assert statuses[-1]["state"] == "READY"
    assert statuses[-1]["acquisition"]["message"] == "Completed."

    stats = wait_for(lambda: read_all(r, "daq:stat"))
    assert set(stats[-1][1]) >= {"detector", "writer"}
    assert set(stats[-1][1]["detector"]) == {"bytes_per_second", "images_per_second"}
    r.close()


def test_periodic_streams_arrive_about_once_a_second(
    writer_factory: WriterFactory, simulator: Simulator, redis_server: RedisServer
) -> None:
    writer_factory(simulator.endpoint, redis_url=redis_server.url)
    r = redis.Redis(port=redis_server.port)
    wait_for(lambda: read_all(r, "daq:stat"))
    start_stat, start_status = r.xlen("daq:stat"), r.xlen("daq:status")
    started = time.monotonic()
    time.sleep(4.0)
    elapsed = time.monotonic() - started
    n_stat = r.xlen("daq:stat") - start_stat
    n_status = r.xlen("daq:status") - start_status
    # ~1 Hz: a wide band (the machine is shared), but neither silent nor per-frame.
    assert elapsed / 4 <= n_stat <= elapsed * 2 + 1, (n_stat, elapsed)
    assert elapsed / 4 <= n_status <= elapsed * 2 + 1, (n_status, elapsed)
    r.close()


def test_streams_are_trimmed_to_the_configured_length(
    writer_factory: WriterFactory, simulator: Simulator, redis_server: RedisServer, data_root: Path
) -> None:
    maxlen = 5
    writer = writer_factory(simulator.endpoint, redis_url=redis_server.url, redis_maxlen=maxlen)
    std = StdDaqClient(url_base=writer.rest_url)
    r = redis.Redis(port=redis_server.port)
    for index in range(6):
        std.start_writer_sync({"output_file": str(data_root / f"trim{index}.h5"), "n_images": 2})
    node_size = 4  # the fixture's stream-node-max-entries: `MAXLEN ~` trims whole nodes
    wait_for(lambda: int(r.xinfo_stream("daq:status")["entries-added"]) > maxlen + 2 * node_size, timeout=60)
    for stream in ("daq:status", "daq:log"):
        info = r.xinfo_stream(stream)
        assert info["length"] <= maxlen + node_size, (stream, info["length"])
    assert r.xinfo_stream("daq:status")["entries-added"] > r.xlen("daq:status")
    r.close()


def test_writer_keeps_running_while_redis_is_down_and_publishes_once_it_is_up(
    writer_factory: WriterFactory, simulator: Simulator, tmp_path: Path, data_root: Path
) -> None:
    port = free_port()
    writer: WriterProcess = writer_factory(simulator.endpoint, redis_url=f"redis://127.0.0.1:{port}/0")
    std = StdDaqClient(url_base=writer.rest_url)
    std.start_writer_sync({"output_file": str(data_root / "no-redis.h5"), "n_images": 3})
    time.sleep(1.5)  # at least one periodic publish attempt against the missing server
    assert writer.running
    assert std.get_status()["acquisition"]["message"] == "Completed."

    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        config_entries = wait_for(lambda: _safe_read(r, "daq:config"))
        assert config_entries[-1][1] == std.get_config(), "the config kept while redis was down is sent"
        logs = wait_for(lambda: _safe_read(r, "daq:log"))
        assert logs[-1][1]["info"]["output_file"] == str(data_root / "no-redis.h5")
        wait_for(lambda: _safe_read(r, "daq:stat"))
        r.close()
    finally:
        stop_process(server)


def _safe_read(client: redis.Redis, stream: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        return read_all(client, stream)
    except redis.ConnectionError:
        return []
