"""The merge checks and formats the product's ESO keywords by the keyword dictionaries (real files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from astropy.io import fits

from daqif.spec import load_specification
from daqif.testing import fits_file_source, write_fits_detector_file
from servers.dpm.dictionary import load_dictionaries
from servers.dpm.merge import MergeError, merge, verify
from servers.dpm.merge_cli import main

from ..dpm_helpers import DpmHarness, hdf5_source, make_spec, wait_alert, wait_archived, write_source
from ..merge_samples import keyword_source, spec_document, write_detector_file

DCS = "ESO-VLT-DIC.DAQIF_DCS"
SITE = """\
Dictionary Name:   ESO-VLT-DIC.SITE
Scope:             SITE

Parameter Name:    INS FILTi NAME
Class:             header
Type:              string
Value Format:      %-8s
Comment Format:    Name of filter %d
"""


def merged_product(tmp_path: Path, attrs: dict[str, Any], keywords: list[dict[str, Any]]) -> Path:
    """Merge one detector file with `attrs` and an `ocm` source, checked by SITE then DAQIF_DCS."""
    (tmp_path / "dics").mkdir(exist_ok=True)
    (tmp_path / "dics" / "ESO-VLT-DIC.SITE").write_text(SITE)
    det = write_detector_file(tmp_path / "det1.h5", "jf1", keywords=attrs)
    document = spec_document([keyword_source("ocm", keywords), _source(det)], file_id="DICT")
    document["keywordDictionaries"] = ["ESO-VLT-DIC.SITE", DCS]
    spec = load_specification(document)
    dictionaries = load_dictionaries(spec.keyword_dictionaries, [tmp_path / "dics"])
    outfile = tmp_path / "DICT.h5"
    merge(spec, {"det1": det}, outfile, dictionaries=dictionaries)
    return outfile


def _source(path: Path) -> dict[str, Any]:
    return {"type": "hdf5File", "sourceName": "det1", "location": str(path)}


def test_values_are_formatted_and_comments_defaulted_in_an_hdf5_product(tmp_path: Path) -> None:
    attrs = {
        "ESO DET CHIP1 GAIN": 1.23456,
        "ESO DET CHIP2 GAIN": np.float32(2.5),
        "ESO DET CHIP1 TEMP": np.int16(90),  # an integer is a double's value too; held as a float
        "ESO DET NDIT": np.uint8(3),
        "ESO INS FILT1 NAME": np.bytes_(b"R"),  # fixed-length in the source; padded by %-8s
        "ESO DET CHIP1 LIVE": np.bool_(True),
        "EXPTIME": 2.0,  # not an ESO keyword: not checked
    }
    keywords = [{"type": "esoKeyword", "name": "DET DIT", "value": 1, "comment": "from OCM"}]
    product = merged_product(tmp_path, attrs, keywords)

    assert verify(product).ok
    with h5py.File(product, "r") as f:
        a = f.attrs
        comments = dict(a["KEYWORD_COMMENTS"].tolist())
        assert a["ESO DET CHIP1 GAIN"] == 1.235 and a["ESO DET CHIP1 GAIN"].dtype == np.float64
        assert a["ESO DET CHIP2 GAIN"] == np.float32(2.5) and a["ESO DET CHIP2 GAIN"].dtype == np.float32
        assert a["ESO DET CHIP1 TEMP"] == 90.0 and a["ESO DET CHIP1 TEMP"].dtype == np.float64
        assert a["ESO DET NDIT"] == 3 and a["ESO DET NDIT"].dtype == np.uint8
        assert a["ESO INS FILT1 NAME"] == "R       "
        assert a["ESO DET CHIP1 LIVE"] == np.True_
        assert a["ESO DET DIT"] == 1.0 and isinstance(a["ESO DET DIT"], np.floating)
        assert a["EXPTIME"] == 2.0
        assert comments == {
            "ESO DET CHIP1 GAIN": "Gain of chip 1 [e-/ADU]",
            "ESO DET CHIP2 GAIN": "Gain of chip 2 [e-/ADU]",
            "ESO DET CHIP1 TEMP": "Temperature of chip 1 [K]",
            "ESO DET NDIT": "Number of frames averaged",
            "ESO INS FILT1 NAME": "Name of filter 1",
            "ESO DET CHIP1 LIVE": "Chip 1 is read out",
            "ESO DET DIT": "from OCM",
        }


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        (
            {"ESO DET CHIP1 GAIN": 1.0, "ESO INS SHUT ST": "open", "ESO TEL ALT": 3.0},
            "ESO keyword 'INS SHUT ST' of source 'det1' is not defined in ESO-VLT-DIC.SITE, "
            "ESO-VLT-DIC.DAQIF_DCS (and 1 more ESO keywords); fix the source or the dictionary",
        ),
        (
            {"ESO DET CHIP7 GAIN": "high"},
            "ESO keyword 'DET CHIP7 GAIN' of source 'det1' has a string value 'high', but "
            "ESO-VLT-DIC.DAQIF_DCS line 73 defines it as double; fix the source or the dictionary",
        ),
        (
            {"ESO INS FILT2 NAME": np.array([1, 2])},
            "ESO keyword 'INS FILT2 NAME' of source 'det1' has an array value, but "
            "ESO-VLT-DIC.SITE line 4 defines it as string",
        ),
    ],
)
def test_a_keyword_from_a_file_that_no_dictionary_allows_fails_the_merge(
    tmp_path: Path, attrs: dict[str, Any], words: str
) -> None:
    with pytest.raises(MergeError) as caught:
        merged_product(tmp_path, attrs, [])
    assert words in str(caught.value)
    assert not (tmp_path / "DICT.h5").exists() and not list(tmp_path.glob(".*.part"))


def test_the_merge_command_reads_dictionaries_from_its_directories(tmp_path: Path) -> None:
    (tmp_path / "dics").mkdir()
    (tmp_path / "dics" / "ESO-VLT-DIC.SITE").write_text(
        SITE.replace("Type:              string", "Type: text")
    )
    det = write_detector_file(tmp_path / "det1.h5", "jf1", keywords={"ESO INS FILT1 NAME": "R"})
    document = spec_document([_source(det)], file_id="CLI")
    document["keywordDictionaries"] = ["ESO-VLT-DIC.SITE"]
    (tmp_path / "spec.json").write_text(json.dumps(document))
    args = [str(tmp_path / "spec.json"), "--root", str(tmp_path), f"--dictionary-dir={tmp_path / 'dics'}"]

    assert main(args) == 1
    (tmp_path / "dics" / "ESO-VLT-DIC.SITE").write_text(SITE)
    assert main(args) == 0
    with h5py.File(tmp_path / "CLI.h5", "r") as f:
        assert f.attrs["ESO INS FILT1 NAME"] == "R       "


def test_a_merge_error_from_a_dictionary_is_retried_after_the_dictionary_is_fixed(
    dpm: DpmHarness, tmp_path: Path
) -> None:
    dics = tmp_path / "dics"
    dics.mkdir()
    (dics / "ESO-VLT-DIC.SITE").write_text(SITE)
    server = dpm.start({"dictionary_dirs": [str(dics)]})
    client = dpm.client(server)
    attrs = {"ESO INS MODE": "IMG", "ESO DET CHIP1 GAIN": 1.23456}
    write_source(dpm.data / "raw" / "det1.h5", "det1", attrs=attrs)
    spec = make_spec("DICT1", [hdf5_source("det1", dpm.data / "raw" / "det1.h5")], [dpm.receiver])
    spec["keywordDictionaries"] = ["ESO-VLT-DIC.SITE", DCS]
    client.queue_daq(spec)

    status = wait_alert(client, "DICT1", "merging")
    (alert,) = [a for a in status.alerts if a.id == "merging"]
    assert (
        "ESO keyword 'INS MODE' of source 'det1' is not defined in ESO-VLT-DIC.SITE, ESO-VLT-DIC.DAQIF_DCS"
        in alert.description
    )

    log = Path(client.get_internal_daq_status("DICT1").merge_log).read_text()
    assert log.count(f"dictionary ESO-VLT-DIC.SITE: {dics}/ESO-VLT-DIC.SITE") == 1  # provenance

    with open(dics / "ESO-VLT-DIC.SITE", "a") as handle:
        handle.write("\nParameter Name: INS MODE\nType: string\nComment Format: Instrument mode\n")
    client.retry_merge_daq("DICT1")

    assert wait_archived(client, server, "DICT1")["substate"] == "COMPLETED"
    with h5py.File(dpm.receiver / "DICT1.product.h5", "r") as f:
        comments = dict(f.attrs["KEYWORD_COMMENTS"].tolist())
        assert comments == {
            "ESO INS MODE": "Instrument mode",
            "ESO DET CHIP1 GAIN": "Gain of chip 1 [e-/ADU]",
        }
        assert f.attrs["ESO DET CHIP1 GAIN"] == 1.235


def test_a_fits_product_gets_formatted_values_and_default_comments_and_refuses_undefined_keywords(
    tmp_path: Path,
) -> None:
    dcs = write_fits_detector_file(
        tmp_path / "dcs.fits",
        keywords={"ESO DET CHIP1 GAIN": 1.23456, "ESO DET NDIT": (4, "frames"), "ESO DET DIT": 0.5},
    )
    document = spec_document(
        [
            keyword_source("tcs", [{"type": "esoKeyword", "name": "TEL AIRM START", "value": 1.23456}]),
            fits_file_source("dcs", dcs),
        ],
        file_id="DICT",
    )
    document["keywordDictionaries"] = ["ESO-VLT-DIC.DAQIF_TCS", DCS]
    spec = load_specification(document)
    outfile = tmp_path / "DICT.fits"
    merge(spec, {"dcs": dcs}, outfile, dictionaries=load_dictionaries(spec.keyword_dictionaries, []))

    with fits.open(outfile) as hdus:
        header = hdus[0].header
        assert header["HIERARCH ESO DET CHIP1 GAIN"] == 1.235
        assert header.comments["HIERARCH ESO DET CHIP1 GAIN"] == "Gain of chip 1 [e-/ADU]"
        assert header["HIERARCH ESO TEL AIRM START"] == 1.235
        assert header.comments["HIERARCH ESO TEL AIRM START"] == "Airmass at start"
        assert header.comments["HIERARCH ESO DET NDIT"] == "frames"  # the source's own comment wins
        cards = {card.keyword: card.image for card in header.cards}
        assert cards["ESO DET DIT"].startswith("HIERARCH ESO DET DIT = 0.5000 / Detector integration time")
        assert cards["ESO DET CHIP1 GAIN"].startswith("HIERARCH ESO DET CHIP1 GAIN = 1.235 / Gain of chip 1")
    assert verify(outfile).ok

    document["keywordDictionaries"] = ["ESO-VLT-DIC.DAQIF_TCS"]
    spec = load_specification(document)
    with pytest.raises(
        MergeError, match=r"ESO keyword 'DET CHIP1 GAIN' of source 'dcs' is not defined in ESO-VLT"
    ):
        merge(
            spec,
            {"dcs": dcs},
            tmp_path / "BAD.fits",
            dictionaries=load_dictionaries(spec.keyword_dictionaries, []),
        )
    assert not (tmp_path / "BAD.fits").exists()


def test_the_eso_keywords_of_copied_extensions_are_checked_too_and_named_with_their_hdu(
    tmp_path: Path,
) -> None:
    dcs = write_fits_detector_file(tmp_path / "dcs.fits", keywords={"ESO DET DIT": 0.5}, chips=2)
    document = spec_document([fits_file_source("dcs", dcs)], file_id="EXT")
    document["keywordDictionaries"] = [DCS]
    spec = load_specification(document)
    dictionaries = load_dictionaries(spec.keyword_dictionaries, [])
    # Each chip extension carries `HIERARCH ESO DET CHIP<n> ID`, which DAQIF_DCS defines.
    merge(spec, {"dcs": dcs}, tmp_path / "EXT.fits", dictionaries=dictionaries)
    with fits.open(tmp_path / "EXT.fits") as hdus:
        assert hdus[2].header["HIERARCH ESO DET CHIP2 ID"] == "chip-2"

    with fits.open(dcs, mode="update") as hdus:
        hdus[2].header["HIERARCH ESO DET CHIP2 VOLT"] = (3.3, "bias [V]")  # defined nowhere
        hdus[1].header["HIERARCH ESO DET CHIP1 GAIN"] = "high"  # a double in DAQIF_DCS
    with pytest.raises(MergeError) as raised:
        merge(spec, {"dcs": dcs}, tmp_path / "BAD.fits", dictionaries=dictionaries)
    message = str(raised.value)
    where = "of source sources[0] 'dcs' HDU 1 (CHIP1)"
    assert message.startswith(f"ESO keyword 'DET CHIP1 GAIN' {where} "), message
    assert "(and 1 more ESO keywords); fix the source or the dictionary" in message
    assert not (tmp_path / "BAD.fits").exists()


def test_a_default_comment_too_long_for_the_card_is_cut_and_made_ascii(tmp_path: Path) -> None:
    (tmp_path / "dics").mkdir()
    long_comment = "Temperature (°K) of the cold plate in the dewar, as read by sensor %d at the start"
    (tmp_path / "dics" / "ESO-VLT-DIC.SITE").write_text(
        SITE
        + "\nParameter Name: INS SENSORi TEMP\nType: double\nValue Format: %.2f\n"
        + f"Comment Format: {long_comment}\n"
    )
    dcs = write_fits_detector_file(tmp_path / "dcs.fits", keywords={"ESO INS SENSOR12 TEMP": 77.123456})
    document = spec_document([fits_file_source("dcs", dcs)], file_id="CUT")
    document["keywordDictionaries"] = ["ESO-VLT-DIC.SITE", DCS]  # DCS: the chips' DET CHIPn ID
    spec = load_specification(document)
    outfile = tmp_path / "CUT.fits"
    merge(
        spec,
        {"dcs": dcs},
        outfile,
        dictionaries=load_dictionaries(spec.keyword_dictionaries, [tmp_path / "dics"]),
    )

    with fits.open(outfile) as hdus:
        (image,) = [c.image for c in hdus[0].header.cards if c.keyword == "ESO INS SENSOR12 TEMP"]
    assert image.startswith("HIERARCH ESO INS SENSOR12 TEMP = 77.12 / Temperature (?K) of the cold plate in")
    assert len(image) == 80
    assert verify(outfile).ok
