"""Per-frame cost of checking a bitshuffle-LZ4 frame before it is written (`daqif.frame.check_data`).

    python tools/bench_frame.py [--repeat 5] [--seconds 1.0]

For the frame sizes of `bench_writer.py` (64 KiB, 512 KiB, 4 MiB of uint16 simulator pixels,
compressed by HDF5's own bitshuffle-LZ4 filter), measures the CPU time of one check:

- `framing_us`: the default, the walk over the block framing (one u32 per block);
- `decode_us`: `daqif-writer --verify-compressed`, every LZ4 block decompressed as well;
- `decode_core_at_1khz`: the fraction of one core decoding takes at 1,000 frames/s;
- `default_call_overhead_ns`: what passing `decode=False` costs the default path (against the call
  without it: the only change the option made there).

Medians of `--repeat` rounds; each round is the fastest batch of 10 checks in `--seconds`. Prints one JSON
summary with the load average (the machine is shared: compare within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from daqif.frame import (
    Compression,
    check_data,
    compress_bslz4,
    decode_header,
    encode_daqif_header,
    expected_frame,
)

SHAPES = {"64KiB": (256, 128), "512KiB": (512, 512), "4MiB": (2048, 1024)}


def per_call(call: Callable[[], None], seconds: float) -> float:
    """Seconds per call: the fastest of batches of 10 calls run for `seconds` (the minimum is the
    figure least disturbed by other work on a shared machine)."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(10):
            call()
        end = time.perf_counter()
        best = min(best, (end - start) / 10)
        if end >= deadline:
            return best


def measure(shape: tuple[int, int], repeat: int, seconds: float) -> dict[str, float]:
    header = decode_header(encode_daqif_header(1, *shape, "uint16", compression=Compression.BSLZ4))
    chunk = memoryview(compress_bslz4(expected_frame(1, shape, "uint16")))
    rounds: dict[str, list[float]] = {"framing": [], "decode": [], "positional": []}
    for _ in range(repeat):
        rounds["positional"].append(per_call(lambda: check_data(header, chunk), seconds))
        rounds["framing"].append(per_call(lambda: check_data(header, chunk, decode=False), seconds))
        rounds["decode"].append(per_call(lambda: check_data(header, chunk, decode=True), seconds))
    framing, decode = statistics.median(rounds["framing"]), statistics.median(rounds["decode"])
    return {
        "compressed_bytes": len(chunk),
        "framing_us": round(framing * 1e6, 1),
        "decode_us": round(decode * 1e6, 1),
        "decode_over_framing": round(decode / framing, 1),
        "decode_core_at_1khz": round(decode * 1000, 3),
        "default_call_overhead_ns": round((framing - statistics.median(rounds["positional"])) * 1e9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="rounds per frame size (medians reported)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measured round")
    args = parser.parse_args()
    results = {name: measure(shape, args.repeat, args.seconds) for name, shape in SHAPES.items()}
    print(json.dumps({"frames": results, "loadavg": os.getloadavg(), "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
