"""The writer's stats meter: frame rates over the last second and counters since the writer started.

The data path's counters restart with each data path process; `StatsMeter` keeps the writer's
totals cumulative across restarts (`restarted`) and turns two successive samples into rates.
"""

from __future__ import annotations

from servers.writer.datapath.api import FrameCounters
from servers.writer.status import DaqStats, Throughput


class StatsMeter:
    """Turns the data path's cumulative counters, sampled about once a second, into `DaqStats`."""

    def __init__(self) -> None:
        self._base = FrameCounters()  # totals of the data path processes before this one
        self._last: FrameCounters | None = None
        self._last_time = 0.0
        self.stats = DaqStats()
        """The latest stats (rates zero until two samples of one process were taken)."""

    def sample(self, counters: FrameCounters | None, now: float) -> DaqStats:
        """Take one sample (`None`: the data path could not be read); returns the new stats.

        `now` is a monotonic time in seconds.
        """
        if counters is None:
            self.stats = DaqStats(counters=add_counters(self._base, self._last or FrameCounters()))
            return self.stats
        previous, elapsed = self._last, now - self._last_time
        self._last, self._last_time = counters, now
        total = add_counters(self._base, counters)
        if previous is None or elapsed <= 0 or counters.received < previous.received:
            self.stats = DaqStats(counters=total)
            return self.stats
        self.stats = DaqStats(
            detector=Throughput(
                bytes_per_second=(counters.bytes_received - previous.bytes_received) / elapsed,
                images_per_second=(counters.received - previous.received) / elapsed,
            ),
            writer=Throughput(
                bytes_per_second=(counters.bytes_written - previous.bytes_written) / elapsed,
                images_per_second=(counters.written - previous.written) / elapsed,
            ),
            counters=total,
        )
        return self.stats

    def restarted(self) -> None:
        """A new data path process starts with zero counters: fold the old one's into the base."""
        if self._last is not None:
            self._base = add_counters(self._base, self._last)
        self._last = None


def add_counters(a: FrameCounters, b: FrameCounters) -> FrameCounters:
    """Field-wise sum of two counter sets."""
    return FrameCounters(
        received=a.received + b.received,
        written=a.written + b.written,
        discarded=a.discarded + b.discarded,
        malformed=a.malformed + b.malformed,
        bytes_received=a.bytes_received + b.bytes_received,
        bytes_written=a.bytes_written + b.bytes_written,
    )
