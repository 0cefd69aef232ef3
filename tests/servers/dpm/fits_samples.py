"""ESO's documented specification shape with real FITS files: OCM and TCS keywords, an FCS
`fitsFile` with a filter and a transform rule, a DCS `target.source`; and raw-HDU helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astropy.io import fits

from daqif.testing import fits_file_source, write_fits_detector_file

DCS_KEYWORDS: dict[str, Any] = {
    "EXPTIME": (1.5, "exposure time"),
    "OBJECT": "dcs-object",
    "DATE-OBS": "2026-11-22T10:00:00.000",
    "ESO DET DIT": (0.5, "integration time"),
    "ESO DET NDIT": 3,
    "ESO DPR TYPE": "OBJECT",
    "DCS CLOCK": 5,  # a non-ESO HIERARCH keyword
}
FCS_KEYWORDS: dict[str, Any] = {
    "ESO INS FILT1 NAME": "R",
    "ESO INS TEMP1 VAL": 12.5,
    "ESO INS TEMP2 VAL": 13.0,
    "ESO INS SHUT ST": True,
    "EXPTIME": 99.0,  # not selected by the filter
}

OCM = {
    "type": "fitsKeywords",
    "sourceName": "ocm",
    "keywords": [
        {"type": "valueKeyword", "name": "OBJECT", "value": "M31", "comment": "target"},
        {"type": "esoKeyword", "name": "OBS NAME", "value": "my-ob"},
        {"type": "esoKeyword", "name": "DPR CATG", "value": "SCIENCE", "comment": "category"},
        {"type": "literalKeyword", "value": "HISTORY queued by OCM"},
        {"type": "literalKeyword", "value": "COMMENT from OCM"},
        {"type": "valueKeyword", "name": "ARCFILE", "value": "not-this.fits"},  # reserved
    ],
}
TCS = {
    "type": "fitsKeywords",
    "sourceName": "tcs",
    "keywords": [
        {"type": "valueKeyword", "name": "DEC", "value": 41.27},
        {"type": "valueKeyword", "name": "RA", "value": 10.68},
        {"type": "esoKeyword", "name": "TEL AIRM START", "value": 1.2},
        {"type": "valueKeyword", "name": "OBJECT", "value": "tcs-object"},
        {"type": "literalKeyword", "value": "COMMENT from TCS"},
    ],
}
FCS_RULES = [
    {"type": "filter", "selectionPatterns": ["+e INS *", "-e INS TEMP2 *"]},
    {"type": "transform", "selectionPatterns": ["+e INS FILT*"], "regex": "^INS ", "format": "INS2 "},
]


def write_dcs(path: Path) -> Path:
    """The detector's file: two chips with checksums; CHIP2's are then made stale by an edit."""
    write_fits_detector_file(path, keywords=DCS_KEYWORDS, chips=2, seed=1)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header.add_history("dcs history")
    blob = path.read_bytes()  # an edit that does not update CHECKSUM (astropy's update would)
    path.write_bytes(blob.replace(b"'chip-2", b"'chip-X", 1))
    return path


def write_fcs(path: Path, primary_data: bool = False) -> Path:
    write_fits_detector_file(
        path, keywords=FCS_KEYWORDS, chips=1, seed=2, compressed=True, primary_data=primary_data
    )
    return path


def eso_spec(
    daq_id: str, dcs: str | Path, fcs: str | Path, receivers: list[str] | None = None
) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": daq_id, "source": fits_file_source("dcs", dcs)},
        "sources": [OCM, TCS, fits_file_source("fcs", fcs, FCS_RULES)],
        "receivers": [{"type": "olasReceiver", "path": r} for r in receivers or []],
    }


# The product's primary header, card by card (after SIMPLE, BITPIX, NAXIS, EXTEND), DATE aside.
EXPECTED_CARDS = [
    ("RA", 10.68),
    ("DEC", 41.27),
    ("DATE", None),
    ("OBJECT", "M31"),
    ("DATE-OBS", "2026-11-22T10:00:00.000"),
    ("EXPTIME", 1.5),
    ("ARCFILE", None),
    ("ORIGFILE", "dcs.fits"),
    ("ESO DPR CATG", "SCIENCE"),
    ("ESO DPR TYPE", "OBJECT"),
    ("ESO OBS NAME", "my-ob"),
    ("ESO TEL AIRM START", 1.2),
    ("ESO INS2 FILT1 NAME", "R"),
    ("ESO INS TEMP1 VAL", 12.5),
    ("ESO INS SHUT ST", True),
    ("ESO DET DIT", 0.5),
    ("ESO DET NDIT", 3),
    ("DCS CLOCK", 5),
    ("HISTORY", "queued by OCM"),
    ("HISTORY", "dcs history"),
    ("COMMENT", "from OCM"),
    ("COMMENT", "from TCS"),
    ("CHECKSUM", None),
    ("DATASUM", "0"),
]


def raw_hdus(path: Path) -> list[tuple[str, bytes, bytes]]:
    """(EXTNAME, header bytes, data bytes) of every HDU, as stored (compressed HDUs as tables)."""
    blob = Path(path).read_bytes()
    out = []
    with fits.open(path, disable_image_compression=True) as hdul:
        for hdu in hdul:
            info = hdu.fileinfo()
            header = blob[info["hdrLoc"] : info["datLoc"]]
            data = blob[info["datLoc"] : info["datLoc"] + info["datSpan"]]
            out.append((str(hdu.name), header, data))
    return out
