"""What `daqif.bluesky.DaqifDetector` costs a plan (needs the `daqif[bluesky]` extra).

    python tools/bench_bluesky.py [--triggers 20] [--fly 2000] [--repeat 2]

Starts the simulator (64x64 uint16 at 1 kHz) and a writer as `daqif.testing` does, then runs with a
real RunEngine:

- `count([det], num=TRIGGERS)`: `trigger_ms` is the wall time per trigger, each one write of one frame
  (start over gRPC, the first frame, the end pushed on `WatchStatus`, the file's documents);
- a fly scan of `--fly` events: `fly_s` against `fly_source_s`, the time the simulator takes to send
  that many frames (the detector should follow the source, not lag it).

Prints one JSON summary with the load average (the machine is shared: compare within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
from bluesky import RunEngine
from bluesky.plans import count
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import TriggerInfo, init_devices

from daqif.bluesky import DaqifDetector
from daqif.testing import Writer, _config, _running


def fly(det: DaqifDetector, n: int) -> Generator[Any, Any, None]:
    yield from bps.stage(det)
    yield from bps.open_run()
    yield from bps.prepare(det, TriggerInfo(number_of_events=n), wait=True)
    yield from bps.declare_stream(det, name="primary", collect=True)
    yield from bps.kickoff(det, wait=True)
    yield from bps.collect_while_completing([det], [det], flush_period=0.5)
    yield from bps.close_run()
    yield from bps.unstage(det)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triggers", type=int, default=20)
    parser.add_argument("--fly", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    trigger_ms: list[float] = []
    fly_s: list[float] = []
    # daqif.testing's own launch of the simulator and writer (what the `writer` fixture runs).
    with (
        tempfile.TemporaryDirectory(prefix="bench-bluesky-") as directory,
        _running(_config(Path(directory)), {"sim", "writer"}) as (bound, _),
    ):
        writer = Writer(bound)
        engine = RunEngine({})
        with init_devices():
            det = DaqifDetector(writer.grpc_address, writer.raw_dir)
        for _ in range(args.repeat):
            start = time.perf_counter()
            engine(count([det], num=args.triggers))
            trigger_ms.append(round(1000 * (time.perf_counter() - start) / args.triggers, 1))
            start = time.perf_counter()
            engine(fly(det, args.fly))
            fly_s.append(round(time.perf_counter() - start, 2))
        call_in_bluesky_event_loop(det.close())
    summary = {
        "trigger_ms": trigger_ms,
        "fly_events": args.fly,
        "fly_s": fly_s,
        "fly_source_s": args.fly / 1000.0,
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
