"""Start `daqif-sim` as a subprocess and learn the endpoint it bound (tests, benchmarks, scripts).

sim = start_sim("--shape", "64", "32", "--count", "100")   # endpoint: any free port
...connect to sim.endpoint...
summary = sim.wait_done()                                  # or sim.stop()
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

_BOUND = re.compile(r"daqif-sim: bound (tcp://\S+)")
_DONE = "daqif-sim: done "


class SimStartError(RuntimeError):
    """The simulator exited or printed something else instead of its endpoint."""


@dataclass
class SimProcess:
    """A running ``python -m servers.sim.main``; its output lines are kept in `lines`."""

    process: subprocess.Popen[str]
    endpoint: str
    lines: queue.Queue[str] = field(repr=False)

    def wait_done(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the simulator to exit on its own; return its summary (`SimStats` as a dict)."""
        self.process.wait(timeout)
        return self._summary()

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM it, wait, return its summary."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout)
        return self._summary()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def _summary(self) -> dict[str, Any]:
        if self.process.returncode != 0:
            raise RuntimeError(f"simulator exited with {self.process.returncode}")
        while True:
            try:
                line = self.lines.get(timeout=10)
            except queue.Empty:
                raise RuntimeError("the simulator printed no summary line") from None
            if line.startswith(_DONE):
                summary: dict[str, Any] = json.loads(line.removeprefix(_DONE))
                return summary


def start_sim(*args: str, endpoint: str = "tcp://127.0.0.1:*", timeout: float = 60.0) -> SimProcess:
    """Start the simulator with `daqif-sim` flags `args` binding `endpoint`; return once it bound."""
    command = [sys.executable, "-m", "servers.sim.main", "--endpoint", endpoint, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # keeps the simulator's stdout drained for its whole life
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=timeout)
    except queue.Empty:
        process.kill()
        raise SimStartError("the simulator did not report its endpoint") from None
    match = _BOUND.match(first)
    if match is None:
        process.kill()
        raise SimStartError(f"unexpected simulator output: {first!r}")
    return SimProcess(process, match.group(1), lines)
