"""`daqif.bluesky`: a daqif writer as an ophyd-async detector (the extra `daqif[bluesky]`).

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd_async.core import init_devices
    from daqif.bluesky import DaqifDetector

    RE = RunEngine()
    with init_devices():
        det = DaqifDetector("127.0.0.1:12084", "/data/raw")     # named "det" by init_devices
    RE(count([det], num=5))

`DaqifDetector` is an ophyd-async `StandardDetector` composed of the three seams ophyd-async
defines, each a small class here:

- `DaqifTriggerLogic`: internally timed exposures only (the detector sends what it sends; the
  writer records the next N frames); remembers how many frames a start must record
  (`TriggerInfo.number_of_exposures`: events times collections per event).
- `DaqifAcquireLogic`: a start is one `StartWriterAsync` of that many frames; the end of a write
  is waited for on the `WatchStatus` stream; `unstage` (and a stopped plan) sends `StopWriter`
  for a write this device started, and only for one: the request names the write's file, so a
  writer already on another client's write refuses it and stops nothing.
- `DaqifDataLogic`: the `StreamResource`/`StreamDatum` documents of `/<detector_name>/data`
  (`application/x-hdf5`, chunk shape one frame, SWMR) and `/<detector_name>/image_id`.

All three share one `WriterLink`: the gRPC client and one task that consumes `WatchStatus` and
feeds soft signals (`writer_state`, `acquisition_state`, `n_write_completed`, `message`): progress
is pushed by the writer, never polled.

**One write per start.** A detector's frames reach the writer whether or not anyone triggered, and
the writer records the next `n_images` frames of a write into one new file (docs/writer.md). So each
start (each `trigger()` of a step scan, each `kickoff()` of a fly scan) is one write of
`number_of_exposures` frames into its own file `<filename>_<k:06d>.h5` (k counts the writes since
`prepare`, `<filename>` comes from the path provider), and each file gets its own `StreamResource`
for each dataset. `count([det], num=3)` writes three files of one frame; a fly scan prepared for
N events writes one file of N frames, followed as it fills. bluesky's consumers and tiled's
`TiledWriter` join the resources of one data key in order (event-model allows several resources
per data key).

A write the writer refuses (busy, output outside its allowed roots, …) fails `trigger()`/`kickoff()`
with the writer's message (`daqif.errors.DaqException`); a write that ends FAILED, or that someone
else stopped before it had all its frames, fails the waiting `trigger()`/`complete()` at once with
`WriteFailed` carrying the writer's message.
"""

from daqif.bluesky._detector import (
    MIMETYPE,
    DaqifAcquireLogic,
    DaqifDataLogic,
    DaqifDetector,
    DaqifTriggerLogic,
    WriteFilesProvider,
)
from daqif.bluesky._link import FrameFormat, Write, WriteFailed, WriterLink

__all__ = [
    "MIMETYPE",
    "DaqifAcquireLogic",
    "DaqifDataLogic",
    "DaqifDetector",
    "DaqifTriggerLogic",
    "FrameFormat",
    "Write",
    "WriteFailed",
    "WriteFilesProvider",
    "WriterLink",
]
