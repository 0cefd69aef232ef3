"""The NeXus view of a detector file: `/entry` over the Standard DAQ layout, with no second copy.

Every writer file, every file joined by `daqif.vds` and every HDF5 product of the DPM carries,
besides the Standard DAQ layout (``/<detector>/data``, ``image_id``, ``status``, unchanged):

    /                       @default = "entry"                      (@NX_class is not set: the root
                                                                      attributes stay the writer's)
    /entry                  NXentry,  @default = "data"
    /entry/data             NXdata,   @signal = "data"
    /entry/data/data        hard link to /<detector>/data            [n, H, W], the image stack
    /entry/data/image_id    hard link to /<detector>/image_id
    /entry/data/status      hard link to /<detector>/status
    /entry/instrument       NXinstrument
    /entry/instrument/<detector>   NXdetector
        local_name          the detector name (from the config)
        type                the detector type (eiger, jungfrau, …), when known
        bit_depth_readout   bits per pixel
        frame_shape         [H, W]
        data                hard link to /<detector>/data

A hard link is the dataset itself under a second name: readers of either path see the same
frames, a resize of one is a resize of the other, and no byte is stored twice. NeXus readers
(silx, h5web, ``nexusformat.nxload``) follow the ``default`` attributes to ``/entry/data`` and plot
its ``signal``.

HDF5 cannot create objects in a file once SWMR writing has started, so the writer calls
`add_nexus_entry` when it creates its datasets, just before SWMR mode begins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import h5py
import numpy as np

ENTRY: Final = "entry"
DATA: Final = "data"
INSTRUMENT: Final = "instrument"
LINKED_DATASETS: Final = ("data", "image_id", "status")


class NexusError(ValueError):
    """The NeXus entry cannot be made; the message names the file and the missing dataset."""


@dataclass(frozen=True)
class DetectorInfo:
    """What the config knows about the detector, written to ``/entry/instrument/<name>``."""

    name: str
    detector_type: str = ""
    bit_depth: int | None = None  # None: from the data's dtype


def add_nexus_entry(h5file: h5py.File, group_path: str, detector: DetectorInfo | None = None) -> list[str]:
    """Make (or bring up to date) ``/entry`` of `h5file` over the detector group at `group_path`.

    `group_path` is ``/<detector>`` in a writer file, ``/<source>/<detector>`` in a DPM product.
    `detector` defaults to what the file's own view said of it (`_known_detector`), else the
    last component of `group_path` as the name. Links that already point at the right dataset
    and fields that already hold the right value are left as they are; others are replaced, so
    the links always point at the datasets the file holds now (a product re-copies virtual
    datasets); anything else under ``/entry`` is left alone. Returns the paths of the datasets it
    created (not the links). `NexusError` when the group has no ``data`` dataset, or ``/entry``
    is something else than an NXentry.
    """
    group = h5file.get(group_path)
    if not isinstance(group, h5py.Group) or not isinstance(group.get(DATA), h5py.Dataset):
        raise NexusError(f"{h5file.filename}: no dataset {group_path.rstrip('/')}/data to make /entry from")
    existing = h5file.get(ENTRY)
    if existing is not None and (
        not isinstance(existing, h5py.Group) or _text(existing.attrs.get("NX_class", "")) != "NXentry"
    ):
        raise NexusError(f"{h5file.filename}: /{ENTRY} exists and is not an NXentry; left as it is")
    info = detector if detector is not None else _known_detector(h5file, group_path)
    data: Any = group[DATA]
    created: list[str] = []
    entry = _group(h5file, ENTRY, "NXentry", default=DATA)
    nxdata = _group(entry, DATA, "NXdata", signal=DATA)
    for name in LINKED_DATASETS:
        dataset = group.get(name)
        if isinstance(dataset, h5py.Dataset):
            _link(nxdata, name, dataset)
    instrument = _group(entry, INSTRUMENT, "NXinstrument")
    nxdetector = _group(instrument, info.name, "NXdetector")
    fields: dict[str, Any] = {"local_name": info.name}
    if info.detector_type:
        fields["type"] = info.detector_type
    fields["bit_depth_readout"] = info.bit_depth if info.bit_depth is not None else data.dtype.itemsize * 8
    fields["frame_shape"] = list(data.shape[1:])
    for name, value in fields.items():
        if _field(nxdetector, name, value):
            created.append(f"{nxdetector.name}/{name}")
    _link(nxdetector, DATA, data)
    if _text(h5file.attrs.get("default", "")) != ENTRY:
        h5file.attrs["default"] = ENTRY
    return created


def find_detector_groups(h5file: h5py.File) -> list[str]:
    """Paths of the groups laid out as a Standard DAQ detector (``data`` [n, H, W] and
    ``image_id``), in name order; NeXus groups (those with an ``NX_class``, such as
    an ``/entry/data`` of a copied file) are not detector groups."""
    found: list[str] = []

    def visit(raw: bytes, info: Any) -> None:
        # The objects `visititems` visits, in its order; only a group with links named `data` and
        # `image_id` is made an `h5py.Group` and checked (`visititems` makes an object of each
        # object in the file, which costs a small DPM merge more than the rest of this walk).
        if info.type != h5py.h5o.TYPE_GROUP:
            return
        gid = h5py.h5o.open(h5file.id, raw)
        if not (gid.links.exists(DATA.encode()) and gid.links.exists(b"image_id")):
            return
        obj = h5py.Group(gid)
        if "NX_class" not in obj.attrs:
            data = obj.get(DATA)
            if (
                isinstance(data, h5py.Dataset)
                and data.ndim == 3
                and isinstance(obj.get("image_id"), h5py.Dataset)
            ):
                found.append(f"/{_name(raw)}")

    h5py.h5o.visit(h5file.id, visit, info=True)
    return found


def _name(raw: bytes) -> str:
    # h5py's decoding of a name (`visititems`): UTF-8, else the byte string (as a path shows it).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return str(raw)


def _known_detector(h5file: h5py.File, group_path: str) -> DetectorInfo:
    """The detector of `group_path` as its file's own NeXus view described it (a writer file
    copied into a product keeps ``/<source>/entry/instrument/<detector>``), else by name only."""
    parent, _, name = group_path.rstrip("/").rpartition("/")
    described = h5file.get(f"{parent}/{ENTRY}/{INSTRUMENT}/{name}")
    if not isinstance(described, h5py.Group):
        return DetectorInfo(name=name)
    kind = described.get("type")
    depth = described.get("bit_depth_readout")
    return DetectorInfo(
        name=name,
        detector_type=_text(kind[()]) if isinstance(kind, h5py.Dataset) else "",
        bit_depth=int(depth[()]) if isinstance(depth, h5py.Dataset) else None,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _group(parent: h5py.Group, name: str, nx_class: str, **attrs: str) -> h5py.Group:
    group = parent.get(name)
    if not isinstance(group, h5py.Group):
        if group is not None:
            del parent[name]
        group = parent.create_group(name)
    for key, value in {"NX_class": nx_class, **attrs}.items():
        if _text(group.attrs.get(key, "")) != value:
            group.attrs[key] = value
    return group


def _link(group: h5py.Group, name: str, dataset: h5py.Dataset) -> None:
    """`group[name]` a hard link to `dataset`, unless it already is one."""
    current = group.get(name, getlink=True)
    if isinstance(current, h5py.HardLink) and group[name].id == dataset.id:
        return
    if current is not None:
        del group[name]
    group[name] = dataset


def _field(group: h5py.Group, name: str, value: Any) -> bool:
    """`group[name]` a dataset holding `value`; True when it had to be (re)created."""
    current = group.get(name)
    if isinstance(current, h5py.Dataset):
        stored = current[()]
        if isinstance(value, str):
            if _text(stored) == value:
                return False
        elif np.array_equal(np.asarray(stored), np.asarray(value)):
            return False
    if name in group:
        del group[name]
    group[name] = value
    return True
