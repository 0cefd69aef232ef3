"""The writer a user would write by hand, the baseline of `bench_writer.py` (not a daqif component).

    python tools/bench_peer.py ENDPOINT OUT.h5 N HEIGHT WIDTH RCVHWM

pyzmq PULL with ``copy=False`` and h5py ``write_direct_chunk``, one frame per chunk, then the file
and its folder fsync'd. It waits for the first frame, then times from creating the file until it is
durable (after letting its receive queue fill and syncing the page cache, as for
every variant), and prints the seconds on stdout.
"""

import os
import sys
import time

import h5py
import zmq


def main() -> None:
    endpoint, path, n, height, width, rcvhwm = sys.argv[1:7]
    socket = zmq.Context().socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, int(rcvhwm))
    socket.connect(endpoint)
    socket.poll(120_000)
    time.sleep(1.0)  # let the receive queue fill, as it has when a daqif write starts
    os.sync()  # start from a clean page cache, as every variant does
    start = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as out:
        shape = (int(n), int(height), int(width))
        data = out.create_dataset("data", shape, chunks=(1, *shape[1:]), dtype="uint16")
        write_chunk = data.id.write_direct_chunk
        for index in range(shape[0]):
            _header, frame = socket.recv_multipart(copy=False)
            write_chunk((index, 0, 0), frame.buffer)
    for name, flags in ((path, os.O_RDONLY), (os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(name, flags)
        os.fsync(fd)
        os.close(fd)
    print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    main()
