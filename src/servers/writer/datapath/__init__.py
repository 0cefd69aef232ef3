"""The writer's data path: a process that receives frames from ZeroMQ and writes them to HDF5.

One concern per module:

- `api`: the seam the control plane sees (`DataPathHandle`, `WriteJob`, `WriteResult`, …);
- `handle`: `ProcessDataPath`, the parent side that starts, commands and watches the process;
- `protocol`: what crosses the process boundary (pipe messages, the shared counter page);
- `worker`: the process itself (``python -m servers.writer.datapath.worker``): the receive loop;
- `output`: one open HDF5 output file (datasets, direct chunk writes, SWMR flushes);
- `direct`: uncompressed frames written past the page cache (``O_DIRECT``, aligned batches);
- `writeback`: the file written back to disk while frames arrive, and made durable at its end;
- `recovery`: making a file readable again after the process was killed mid-write.

File layout and behaviour (DESIGN §4):

- ``/<detector_name>/data`` ``[n_images, H, W]``, one frame per chunk, fixed extent: frame ``i`` of
  the write is stored at chunk ``(i, 0, 0)``: uncompressed frames of a multiple of 4096 bytes with
  direct I/O into storage allocated at creation (`direct`: copied once into aligned batches,
  written past the page cache), others with a direct chunk write of HDF5 straight from the
  received ZeroMQ buffer (no copy, no numpy array).
- ``/<detector_name>/image_id`` and ``/<detector_name>/status`` ``[n]`` uint64, and root
  attributes ``run_id``, ``detector_name``, ``n_images``.
- The NeXus view (`daqif.nexus`, docs/writer.md "File layout"): ``/entry`` (NXentry) with
  ``/entry/data`` (NXdata) hard-linking the three datasets and ``/entry/instrument/<detector>``
  (NXdetector), and root attribute ``default``; made with the datasets, before SWMR starts.
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
  shrinks ``data``), and the file and its folder are fsync'd before the end is reported: a
  FINISHED write is durable. If the process is killed, the file holds everything up to the last flush;
  the handle then clears the file's SWMR-write flag (`recovery.clear_swmr_flags`) so any HDF5
  reader can open it without ``h5clear``.
- Frames received while no write is open are counted as discarded. A message that is not a
  usable frame (wrong number of parts, empty or unreadable header, unknown dtype, data of the
  wrong size, a shape or dtype other than the write's) is counted as malformed, never written,
  and never stops the process. Each received frame is written at most once.
- A write whose frames keep having another shape or dtype than the detector config fails: when
  `MISMATCH_GRACE_S` passed since the first such frame and no frame was written since, the write
  ends FAILED with ``frames are 512x512 uint16, the detector config says 256x256 uint16``. (A few
  stray frames between good ones, e.g. left in the queue from before a config change, are only
  counted.)
"""
