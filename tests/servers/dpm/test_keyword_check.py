"""QueueDaq checks a specification's ESO keywords against its keywordDictionaries (real DPM server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from daqif.errors import ErrorCode

from .dpm_helpers import DpmHarness, error_of, hdf5_source, make_spec, wait_archived, write_source

SITE = """\
# a site dictionary of the tests
Dictionary Name:   ESO-VLT-DIC.SITE
Scope:             SITE
Source:            tests

Parameter Name:    INS MODE
Class:             header
Type:              string
Value Format:      %s
Comment Format:    Instrument mode

Parameter Name:    INS LAMPi ON
Class:             header
Type:              logical
Comment Format:    Lamp %d switched on
"""


def eso(name: str, value: Any, comment: str | None = None) -> dict[str, Any]:
    keyword: dict[str, Any] = {"type": "esoKeyword", "name": name, "value": value}
    if comment is not None:
        keyword["comment"] = comment
    return keyword


def ocm(*keywords: dict[str, Any]) -> dict[str, Any]:
    return {"type": "fitsKeywords", "sourceName": "ocm", "keywords": list(keywords)}


def with_dictionaries(spec: dict[str, Any], *names: str) -> dict[str, Any]:
    spec["keywordDictionaries"] = list(names)
    return spec


def test_queue_refuses_keywords_the_dictionaries_do_not_define_and_bad_dictionaries(
    dpm: DpmHarness, tmp_path: Path
) -> None:
    dics = tmp_path / "dictionaries"
    dics.mkdir()
    (dics / "ESO-VLT-DIC.SITE").write_text(SITE)
    (dics / "ESO-VLT-DIC.BROKEN").write_text(SITE + "\nParameter Name: INS SPEED\nType: fast\n")
    server = dpm.start({"dictionary_dirs": [str(dics)]})
    client = dpm.client(server)
    names = ("ESO-VLT-DIC.SITE", "ESO-VLT-DIC.DAQIF_DCS")

    def refused(daq_id: str, keywords: list[dict[str, Any]], dictionaries: tuple[str, ...] = names) -> str:
        spec = with_dictionaries(make_spec(daq_id, [ocm(*keywords)]), *dictionaries)
        error = error_of(lambda: client.queue_daq(spec))
        assert error.code == ErrorCode.INVALID_ARGUMENT and error.id == daq_id
        return str(error.message)

    assert refused("UNKNOWN", [eso("DET DIT", 0.5), eso("INS SPEED", 3)]) == (
        "sources[0].keywords[1]: ESO keyword 'INS SPEED' of source 'ocm' is not defined in "
        "ESO-VLT-DIC.SITE, ESO-VLT-DIC.DAQIF_DCS"
    )
    assert refused("TYPE", [eso("DET CHIP3 GAIN", "high")]) == (
        "sources[0].keywords[0]: ESO keyword 'DET CHIP3 GAIN' of source 'ocm' has a string value 'high', "
        "but ESO-VLT-DIC.DAQIF_DCS line 73 defines it as double"
    )
    assert refused("BOOL", [eso("DET NDIT", True)]).endswith(
        "'DET NDIT' of source 'ocm' has a logical value True, but ESO-VLT-DIC.DAQIF_DCS line 36 defines it "
        "as integer"
    )
    card = {"type": "literalKeyword", "value": "HIERARCH ESO INS LAMP2 ON = 'yes' / a card"}
    assert refused("CARD", [eso("INS MODE", "A"), card]).startswith(
        "sources[0].keywords[1]: ESO keyword 'INS LAMP2 ON' of source 'ocm' has a string value 'yes', but "
        "ESO-VLT-DIC.SITE line 12 defines it as logical"
    )
    assert refused("MISSING", [], ("ESO-VLT-DIC.SITE", "ESO-VLT-DIC.NOWHERE")).startswith(
        f"keywordDictionaries[1]: dictionary 'ESO-VLT-DIC.NOWHERE' not found in {dics}, "
    )
    assert refused("BROKEN", [], ("ESO-VLT-DIC.BROKEN",)) == (
        f"keywordDictionaries[0]: dictionary 'ESO-VLT-DIC.BROKEN': {dics}/ESO-VLT-DIC.BROKEN line 18: "
        "parameter 'INS SPEED' has Type 'fast'; expected one of: string, logical, integer, double"
    )
    assert refused("NAME", [], ("../etc/passwd",)).startswith(
        "keywordDictionaries[0]: '../etc/passwd' is not valid"
    )
    assert client.get_active_daqs() == []  # nothing refused was kept

    # Value keywords are not ESO keywords; indexed names and both dictionaries are used.
    write_source(dpm.data / "raw" / "det1.h5", "det1", attrs={"ESO DET CHIP1 TEMP": 88.1234})
    good = with_dictionaries(
        make_spec(
            "GOOD",
            [
                ocm(
                    {"type": "valueKeyword", "name": "OBJECT", "value": "M31"},
                    eso("DET CHIP2 GAIN", 1.23456),
                    eso("INS LAMP1 ON", True, "lamp check"),
                    {"type": "literalKeyword", "value": "HIERARCH ESO INS MODE = 'IMG'"},
                ),
                hdf5_source("det1", dpm.data / "raw" / "det1.h5"),
            ],
            [dpm.receiver],
        ),
        *names,
    )
    client.queue_daq(good)
    assert wait_archived(client, server, "GOOD")["substate"] == "COMPLETED"
    with h5py.File(dpm.receiver / "GOOD.product.h5", "r") as f:
        comments = dict(f.attrs["KEYWORD_COMMENTS"].tolist())
        assert f.attrs["ESO DET CHIP2 GAIN"] == 1.235  # Value Format %.3f
        assert f.attrs["ESO DET CHIP1 TEMP"] == 88.12  # %.2f, from the HDF5 source
        assert comments["ESO DET CHIP2 GAIN"] == "Gain of chip 2 [e-/ADU]"
        assert comments["ESO DET CHIP1 TEMP"] == "Temperature of chip 1 [K]"
        assert comments["ESO INS LAMP1 ON"] == "lamp check"  # a comment given wins
        assert comments["ESO INS MODE"] == "Instrument mode"
        assert "OBJECT" not in comments
