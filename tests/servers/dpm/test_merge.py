"""The merge on real HDF5 files: layout, raw chunk copy, keywords and rules, checksums, safety."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daqif.frame import expected_frame
from daqif.spec import load_specification
from servers.dpm.merge import (
    KEYWORD_COMMENTS,
    MergeError,
    MergeResult,
    merge,
    parse_card,
    resolve_sources,
    verify,
)

from .merge_samples import frames, hdf5_source, keyword_source, spec_document, write_detector_file

BITSHUFFLE = 32008


def run_merge(tmp_path: Path, document: dict[str, Any], **kwargs: Any) -> tuple[MergeResult, Path]:
    spec = load_specification(document)
    outfile = tmp_path / "out" / spec.product_name
    outfile.parent.mkdir(exist_ok=True)
    result = merge(spec, resolve_sources(spec, tmp_path / "nowhere"), outfile, **kwargs)
    return result, outfile


@pytest.fixture
def two_detectors(tmp_path: Path) -> tuple[Path, Path]:
    det1 = write_detector_file(
        tmp_path / "det1.h5",
        "jf1",
        seed=1,
        keywords={
            "OBJECT": "from det1",
            "ESO DET DIT": 0.1,
            "ESO INS TEMP1 VAL": 20.5,
            "COMMENT": ["det1 c"],
        },
    )
    det2 = write_detector_file(
        tmp_path / "det2.h5",
        "jf2",
        seed=2,
        compressed=True,
        keywords={"OBJECT": "from det2", "ESO DET NDIT": 7, "COMMENT": ["det2 c"], "HISTORY": ["det2 h"]},
    )
    return det1, det2


def full_document(det1: Path, det2: Path) -> dict[str, Any]:
    return spec_document(
        [
            keyword_source(
                "ocm",
                [
                    {"type": "valueKeyword", "name": "OBJECT", "value": "M31", "comment": "target name"},
                    {"type": "esoKeyword", "name": "OBS ID", "value": 42},
                    {"type": "literalKeyword", "value": "COMMENT from ocm"},
                    {"type": "literalKeyword", "value": "HISTORY ocm history"},
                ],
            ),
            hdf5_source("det1", det1),
            hdf5_source("det2", det2),
        ]
    )


# -- layout and data ---------------------------------------------------------------------------


def test_each_hdf5_source_appears_under_its_source_name_with_equal_data(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    result, out = run_merge(tmp_path, full_document(*two_detectors))

    assert result.product == out and out.exists() and result.bytes == out.stat().st_size
    assert result.datasets == 9  # 3 per source, 3 of the NeXus view (/entry/instrument/jf1)
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["det1", "det2", "entry"]
        np.testing.assert_array_equal(f["det1/jf1/data"][()], frames(4, 1))
        np.testing.assert_array_equal(f["det2/jf2/data"][()], frames(4, 2))
        np.testing.assert_array_equal(f["det1/jf1/image_id"][()], np.arange(4))
        assert f["det1/jf1/data"].maxshape == (None, 32, 48)
        assert f["det1/jf1/data"].attrs["units"] == "counts"
        # the writer's non-keyword root attributes go onto the source's group, not the root
        assert f["det1"].attrs["run_id"] == 1001
        assert f["det1"].attrs["detector_name"] == "jf1"
        assert f["det2"].attrs["n_images"] == 4
        assert "run_id" not in f.attrs


def test_compressed_chunks_are_copied_raw_and_stay_readable(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    _, out = run_merge(tmp_path, full_document(*two_detectors))

    with h5py.File(two_detectors[1], "r") as src, h5py.File(out, "r") as f:
        made, source = f["det2/jf2/data"], src["jf2/data"]
        assert made.id.get_create_plist().get_filter(0)[:3] == source.id.get_create_plist().get_filter(0)[:3]
        assert made.id.get_create_plist().get_filter(0)[0] == BITSHUFFLE
        assert made.id.get_storage_size() == source.id.get_storage_size()
        assert made.id.get_storage_size() < made.size * made.dtype.itemsize  # still compressed
        for i in range(4):
            assert made.id.read_direct_chunk((i, 0, 0)) == source.id.read_direct_chunk((i, 0, 0))
        np.testing.assert_array_equal(made[()], source[()])


# -- keywords ----------------------------------------------------------------------------------


def test_keywords_become_root_attributes_with_comments(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    result, out = run_merge(tmp_path, full_document(*two_detectors))

    with h5py.File(out, "r") as f:
        assert f.attrs["OBJECT"] == "M31"
        assert f.attrs["ESO OBS ID"] == 42
        assert f.attrs["ESO DET DIT"] == pytest.approx(0.1)
        assert f.attrs["ESO DET NDIT"] == 7
        assert f.attrs["ESO INS TEMP1 VAL"] == pytest.approx(20.5)
        comments = dict(f.attrs[KEYWORD_COMMENTS].tolist())
        assert comments == {"OBJECT": "target name"}
    assert result.keywords == 5 + 3 + 2  # value keywords + COMMENT lines + HISTORY lines


def test_highest_priority_source_wins_a_keyword_collision(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    det1, det2 = two_detectors
    document = spec_document([hdf5_source("det2", det2), hdf5_source("det1", det1)])

    result, out = run_merge(tmp_path, document)

    with h5py.File(out, "r") as f:
        assert f.attrs["OBJECT"] == "from det2"
    assert any("'OBJECT' of source 'det1' overridden by source 'det2'" in line for line in result.log)


def test_commentary_keywords_are_appended_in_priority_order(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    _, out = run_merge(tmp_path, full_document(*two_detectors))

    with h5py.File(out, "r") as f:
        assert list(f.attrs["COMMENT"]) == ["from ocm", "det1 c", "det2 c"]
        assert list(f.attrs["HISTORY"]) == ["ocm history", "det2 h"]


def test_filter_rule_adds_and_removes_by_kind_and_glob(tmp_path: Path) -> None:
    det = write_detector_file(
        tmp_path / "d.h5",
        "jf",
        keywords={
            "ESO INS TEMP1 VAL": 1.0,
            "ESO INS TEMP2 VAL": 2.0,
            "ESO INS TEMP3 VAL": 3.0,
            "ESO INS MODE": "fast",
            "ESO DET DIT": 0.5,
            "OBJECT": "M31",
            "EXPTIME": 10.0,
            "INS": "value keyword named like an ESO category",
        },
    )
    rules = [{"type": "filter", "selectionPatterns": ["+e INS *", "-e INS TEMP[12] *", "+v OBJECT"]}]

    _, out = run_merge(tmp_path, spec_document([hdf5_source("det", det, rules)]))

    with h5py.File(out, "r") as f:
        kept = {name for name in f.attrs if name.startswith("ESO ") or name in ("OBJECT", "EXPTIME", "INS")}
        assert kept == {"ESO INS TEMP3 VAL", "ESO INS MODE", "OBJECT"}


def test_transform_rule_renames_only_selected_keywords(tmp_path: Path) -> None:
    det = write_detector_file(
        tmp_path / "d.h5",
        "jf",
        keywords={"ESO INS TEMP1 VAL": 1.0, "ESO INS MODE": "fast", "ESO DET DIT": 0.5, "OBJECT": "M31"},
    )
    rules = [
        {
            "type": "transform",
            "selectionPatterns": ["+e INS *", "-e INS MODE"],
            "regex": "^INS ",
            "format": "INS2 ",
        },
        {"type": "transform", "selectionPatterns": ["+v OBJ*"], "regex": "^OBJECT$", "format": "TARGET"},
    ]

    _, out = run_merge(tmp_path, spec_document([hdf5_source("det", det, rules)]))

    with h5py.File(out, "r") as f:
        assert f.attrs["ESO INS2 TEMP1 VAL"] == 1.0
        assert "ESO INS TEMP1 VAL" not in f.attrs
        assert f.attrs["ESO INS MODE"] == "fast"  # not selected: unchanged
        assert f.attrs["ESO DET DIT"] == 0.5
        assert f.attrs["TARGET"] == "M31" and "OBJECT" not in f.attrs


def test_transform_to_an_invalid_name_is_an_error_naming_the_rule(tmp_path: Path) -> None:
    det = write_detector_file(tmp_path / "d.h5", "jf", keywords={"ESO INS MODE": "fast"})
    rules = [{"type": "transform", "selectionPatterns": ["+e INS *"], "regex": "^INS", "format": "ins"}]
    document = spec_document([hdf5_source("det", det, rules)])

    with pytest.raises(
        MergeError, match=r"sources\[0\]\.keywordRules\[0\]: transform renames 'ESO INS MODE'"
    ):
        run_merge(tmp_path, document)
    assert not list((tmp_path / "out").iterdir())


def test_transform_of_a_value_keyword_to_more_than_8_characters_is_an_error(tmp_path: Path) -> None:
    det = write_detector_file(tmp_path / "d.h5", "jf", keywords={"OBJECT": "M31"})
    rules = [
        {"type": "transform", "selectionPatterns": ["+v OBJECT"], "regex": "OBJECT", "format": "OBJECTNAME"}
    ]

    with pytest.raises(MergeError, match="'OBJECTNAME', which is not a valid value keyword name"):
        run_merge(tmp_path, spec_document([hdf5_source("det", det, rules)]))


def test_no_rules_copy_every_keyword_and_an_empty_rule_list_copies_none(tmp_path: Path) -> None:
    keywords = {"OBJECT": "M31", "ESO DET DIT": 0.5, "COMMENT": ["c"]}
    det_all = write_detector_file(tmp_path / "all.h5", "a", keywords=keywords)
    det_none = write_detector_file(tmp_path / "none.h5", "b", keywords={"EXPTIME": 3.0, "ESO DET NDIT": 2})

    _, out = run_merge(
        tmp_path, spec_document([hdf5_source("all", det_all), hdf5_source("none", det_none, [])])
    )

    with h5py.File(out, "r") as f:
        assert (
            f.attrs["OBJECT"] == "M31" and f.attrs["ESO DET DIT"] == 0.5 and list(f.attrs["COMMENT"]) == ["c"]
        )
        assert "EXPTIME" not in f.attrs and "ESO DET NDIT" not in f.attrs
        assert f["none"].attrs["detector_name"] == "b"  # non-keyword attributes are not subject to rules


def test_literal_cards_become_value_eso_and_commentary_keywords(tmp_path: Path) -> None:
    cards = [
        "EXPTIME =                 10.5 / exposure time",
        "OBSERVER= 'O''Brien '",
        "HIERARCH ESO TEL AIRM START = 1.2 / airmass",
        "SIMPLE  =                    T",
        "NAXIS   =                    3",
        "        blank-name commentary",
        "HISTORY first",
    ]
    document = spec_document(
        [keyword_source("ocm", [{"type": "literalKeyword", "value": card} for card in cards])]
    )

    _, out = run_merge(tmp_path, document)

    with h5py.File(out, "r") as f:
        assert f.attrs["EXPTIME"] == 10.5
        assert f.attrs["OBSERVER"] == "O'Brien"
        assert f.attrs["ESO TEL AIRM START"] == 1.2
        assert bool(f.attrs["SIMPLE"]) is True
        assert f.attrs["NAXIS"] == 3 and f.attrs["NAXIS"].dtype == np.int64
        assert list(f.attrs["COMMENT"]) == ["blank-name commentary"]
        assert list(f.attrs["HISTORY"]) == ["first"]
        assert dict(f.attrs[KEYWORD_COMMENTS].tolist()) == {
            "EXPTIME": "exposure time",
            "ESO TEL AIRM START": "airmass",
        }


@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("NOEQUALS just text", "neither commentary"),
        ("TOOLONGNAME = 1", "not a valid keyword name"),
        ("lower = 1", "not a valid keyword name"),
        ("EMPTY   =  / no value", "has no value"),
        ("BADSTR  = 'unterminated", "no closing quote"),
        ("BADVAL  = 1.2.3", "is not a string, T/F, an integer or a real"),
        ("TRAIL   = 'x' junk", "unexpected"),
    ],
)
def test_invalid_literal_card_is_a_merge_error_naming_the_keyword(
    tmp_path: Path, card: str, problem: str
) -> None:
    document = spec_document(
        [
            keyword_source(
                "ocm",
                [
                    {"type": "valueKeyword", "name": "A", "value": 1},
                    {"type": "literalKeyword", "value": card},
                ],
            )
        ]
    )

    with pytest.raises(MergeError, match=r"sources\[0\]\.keywords\[1\]: .*" + problem):
        run_merge(tmp_path, document)


def test_parse_card_reads_fits_real_with_d_exponent() -> None:
    card = parse_card("BSCALE  =               1.0D+2 / scale")
    assert (card.name, card.value, card.comment) == ("BSCALE", 100.0, "scale")


# -- reserved attributes -----------------------------------------------------------------------


def test_reserved_attributes_are_written_and_those_from_sources_dropped(tmp_path: Path) -> None:
    det = write_detector_file(
        tmp_path / "d.h5", "jf", keywords={"DATE": "1999-01-01", "ARCFILE": "old.h5", "OBJECT": "x"}
    )
    document = spec_document(
        [
            keyword_source("ocm", [{"type": "valueKeyword", "name": "ORIGFILE", "value": "fake.h5"}]),
            hdf5_source("det", det),
        ],
        file_id="PROD.1",
    )

    result, out = run_merge(tmp_path, document)

    with h5py.File(out, "r") as f:
        assert f.attrs["ARCFILE"] == "PROD.1.h5"
        assert f.attrs["ORIGFILE"] == "PROD.1.h5"
        assert f.attrs["DATE"].startswith("20") and f.attrs["DATE"] != "1999-01-01"
        assert f.attrs["DATASUM"] == result.checksum and result.checksum.startswith("xxh3-sha256:")
        assert verify(out).ok  # DATASUM covers every other attribute: it was written last
        assert "DATE" not in f["det"].attrs and "ARCFILE" not in f["det"].attrs
    dropped = [w for w in result.warnings if "reserved" in w]
    assert len(dropped) == 3 and any("'ORIGFILE'" in w for w in dropped)


# -- target.source -----------------------------------------------------------------------------


def test_target_source_is_the_base_copied_to_the_root_with_lowest_keyword_priority(tmp_path: Path) -> None:
    base = write_detector_file(
        tmp_path / "instrument.h5",
        "cam",
        seed=5,
        keywords={"OBJECT": "base object", "ESO BASE ONLY": 1, "HISTORY": ["base history"]},
    )
    det = write_detector_file(
        tmp_path / "d.h5", "jf", keywords={"OBJECT": "det object", "HISTORY": ["det history"]}
    )
    document = spec_document([hdf5_source("det", det)], target_source=hdf5_source("inst", base))

    _, out = run_merge(tmp_path, document)

    with h5py.File(out, "r") as f:
        # base at the root, the other source under its name, the NeXus view of the base's detector
        assert sorted(f.keys()) == ["cam", "det", "entry"]
        np.testing.assert_array_equal(f["cam/data"][()], frames(4, 5))
        assert f.attrs["run_id"] == 1005  # the base's own attributes stay at the root
        assert f.attrs["OBJECT"] == "det object"  # the specification's sources override the base
        assert f.attrs["ESO BASE ONLY"] == 1
        assert list(f.attrs["HISTORY"]) == ["det history", "base history"]
        assert f.attrs["ORIGFILE"] == "instrument.h5"
    assert verify(out).ok


def test_base_holding_a_group_named_like_a_source_is_an_error(tmp_path: Path) -> None:
    base = write_detector_file(tmp_path / "base.h5", "det")
    det = write_detector_file(tmp_path / "d.h5", "jf")
    document = spec_document([hdf5_source("det", det)], target_source=hdf5_source("inst", base))

    with pytest.raises(MergeError, match=r"sources\[0\] 'det': target.source .* already has /det"):
        run_merge(tmp_path, document)


# -- other HDF5 objects ------------------------------------------------------------------------


@pytest.mark.parametrize("path_taken", ["cloned", "copied"])
def test_links_strings_and_contiguous_datasets_are_copied_and_verified(
    tmp_path: Path, path_taken: str
) -> None:
    # The largest source is cloned byte for byte; the others are copied object by object.
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["plain"] = np.arange(10.0)  # contiguous
        f.create_dataset("names", data=["a", "bb", "ccc"], dtype=h5py.string_dtype())  # variable length
        f["grp/alias"] = h5py.SoftLink("/plain")
        f["grp/same"] = f["plain"]  # a second hard link
        f.create_dataset("empty", shape=(0, 3), maxshape=(None, 3), dtype="f4", chunks=(4, 3))
        f["scalar"] = 7
        f["odd/inner"] = np.ones(3)  # a link named like the source itself
    sources = [hdf5_source("odd", path)]
    if path_taken == "copied":
        sources.append(hdf5_source("big", write_detector_file(tmp_path / "big.h5", "jf", n=40)))

    result, out = run_merge(tmp_path, spec_document(sources))

    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["odd/plain"][()], np.arange(10.0))
        assert [s.decode() for s in f["odd/names"][()]] == ["a", "bb", "ccc"]
        assert f["odd/grp"].get("alias", getlink=True).path == "/odd/plain"
        np.testing.assert_array_equal(f["odd/grp/alias"][()], np.arange(10.0))
        assert h5py.h5o.get_info(f["odd/grp/same"].id).addr == h5py.h5o.get_info(f["odd/plain"].id).addr
        assert f["odd/empty"].shape == (0, 3)
        assert f["odd/scalar"][()] == 7
        np.testing.assert_array_equal(f["odd/odd/inner"][()], np.ones(3))
        # /entry: the NeXus view of big's detector group ('odd' is laid out as no detector)
        assert sorted(f.keys()) == (["big", "entry", "odd"] if path_taken == "copied" else ["odd"])
    assert any(f"copying 'odd' ({path}) to /odd (file clone)" in line for line in result.log) == (
        path_taken == "cloned"
    )
    assert verify(out).ok


def test_a_cloned_compressed_source_keeps_its_chunks_and_verifies(tmp_path: Path) -> None:
    det = write_detector_file(tmp_path / "d.h5", "jf", compressed=True, keywords={"OBJECT": "x"})

    _, out = run_merge(tmp_path, spec_document([hdf5_source("jf", det)]))

    with h5py.File(det, "r") as src, h5py.File(out, "r") as f:
        made, source = f["jf/jf/data"], src["jf/data"]
        assert made.id.get_create_plist().get_filter(0)[:3] == source.id.get_create_plist().get_filter(0)[:3]
        assert made.id.read_direct_chunk((3, 0, 0)) == source.id.read_direct_chunk((3, 0, 0))
        np.testing.assert_array_equal(made[()], frames(4, 1))
        assert f["jf"].attrs["detector_name"] == "jf" and "detector_name" not in f.attrs
        assert f.attrs["OBJECT"] == "x" and "OBJECT" not in f["jf"].attrs
    assert verify(out).ok


# -- checksums ---------------------------------------------------------------------------------


def test_verify_accepts_a_fresh_product(tmp_path: Path, two_detectors: tuple[Path, Path]) -> None:
    result, out = run_merge(tmp_path, full_document(*two_detectors))

    checked = verify(out)

    assert checked.ok, checked.message
    assert checked.stored == checked.computed == result.checksum
    assert checked.datasets == 9  # with the 3 of the NeXus view


def test_verify_names_the_dataset_whose_data_byte_was_flipped(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    _, out = run_merge(tmp_path, full_document(*two_detectors))
    with h5py.File(out, "r") as f:
        offset = f["det1/jf1/data"].id.get_chunk_info(0).byte_offset
    with open(out, "r+b") as handle:
        handle.seek(offset + 10)
        byte = handle.read(1)
        handle.seek(offset + 10)
        handle.write(bytes([byte[0] ^ 0x01]))

    checked = verify(out)

    assert not checked.ok
    assert any(m.startswith("dataset /det1/jf1/data:") for m in checked.mismatches), checked.mismatches
    assert "/det1/jf1/data" in checked.message


def test_verify_detects_a_flipped_byte_in_a_compressed_chunk(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    _, out = run_merge(tmp_path, full_document(*two_detectors))
    with h5py.File(out, "r") as f:
        info = f["det2/jf2/data"].id.get_chunk_info(2)
    with open(out, "r+b") as handle:
        handle.seek(info.byte_offset + info.size - 1)
        byte = handle.read(1)
        handle.seek(info.byte_offset + info.size - 1)
        handle.write(bytes([byte[0] ^ 0x80]))

    assert "/det2/jf2/data" in verify(out).message


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("/", "root DATASUM"),
        ("/det1", "groups, links or root attributes changed"),
        ("/det1/jf1/data", "dataset /det1/jf1/data"),
    ],
)
def test_verify_detects_a_modified_attribute(
    tmp_path: Path, two_detectors: tuple[Path, Path], where: str, expected: str
) -> None:
    _, out = run_merge(tmp_path, full_document(*two_detectors))
    with h5py.File(out, "r+") as f:
        obj = f[where]
        name = "OBJECT" if where == "/" else ("run_id" if where == "/det1" else "units")
        obj.attrs[name] = "tampered"

    checked = verify(out)

    assert not checked.ok
    assert expected in checked.message


# -- failures and crash safety -----------------------------------------------------------------


def test_missing_source_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    document = full_document(two_detectors[0], tmp_path / "gone.h5")

    with pytest.raises(MergeError, match=r"sources\[2\] 'det2': file .*gone.h5 does not exist"):
        run_merge(tmp_path, document)
    assert not list((tmp_path / "out").iterdir())


def test_source_that_is_not_hdf5_is_a_clear_error(tmp_path: Path, two_detectors: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an HDF5 file at all")

    with pytest.raises(MergeError, match=r"sources\[2\] 'det2': cannot open .*junk.h5 as an HDF5 file"):
        run_merge(tmp_path, full_document(two_detectors[0], junk))
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("broken_is_largest", [False, True])
def test_source_failing_half_way_leaves_neither_product_nor_part_file(
    tmp_path: Path, two_detectors: tuple[Path, Path], broken_is_largest: bool
) -> None:
    # A dataset whose data lives in an external raw file that has vanished: the file opens, the
    # first source is copied, and the read fails in the middle of the second one.
    raw = tmp_path / "pixels.raw"
    raw.write_bytes(bytes(4096))
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.create_dataset("first", data=np.arange(100_000 if broken_is_largest else 10))
        f.create_dataset("external", shape=(1024,), dtype="u4", external=[(str(raw), 0, 4096)])
    raw.unlink()
    document = spec_document([hdf5_source("det1", two_detectors[0]), hdf5_source("broken", broken)])

    with pytest.raises(
        MergeError,
        match=r"source .broken.: cannot copy dataset /external: dataset with external raw storage "
        r"/external refers to .*pixels.raw",
    ):
        run_merge(tmp_path, document)
    assert not list((tmp_path / "out").iterdir())  # no product, no .part


def test_a_stale_part_file_is_replaced_by_a_complete_product(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".TEST.2026-11-22T10:00:00.000.h5.part"
    stale.write_bytes(b"half a product")

    _, out = run_merge(tmp_path, full_document(*two_detectors))

    assert not stale.exists()
    assert verify(out).ok


def test_dry_run_opens_every_source_reports_the_plan_and_writes_nothing(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    stream = io.StringIO()

    result, _ = run_merge(tmp_path, full_document(*two_detectors), dry_run=True, log=stream)

    assert result.dry_run and result.datasets == 6 and result.bytes == 0
    assert not list((tmp_path / "out").iterdir())
    text = stream.getvalue()
    assert "dataset /det2/jf2/data: uint16 (4, 32, 48) chunks (1, 32, 48) filters [32008]" in text
    assert "keyword OBJECT = 'M31' / target name (from ocm)" in text
    assert "nothing written" in text


def test_dry_run_still_reports_a_missing_source(tmp_path: Path, two_detectors: tuple[Path, Path]) -> None:
    with pytest.raises(MergeError, match="does not exist"):
        run_merge(tmp_path, full_document(two_detectors[0], tmp_path / "gone.h5"), dry_run=True)


def test_log_lines_go_to_a_logger_when_given_one(
    tmp_path: Path, two_detectors: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="test.merge")
    run_merge(tmp_path, full_document(*two_detectors), log=logging.getLogger("test.merge"))

    assert any("wrote" in record.getMessage() for record in caplog.records)


# -- source resolution -------------------------------------------------------------------------


def test_resolve_sources_prefers_the_workspace_copy_then_the_local_location(tmp_path: Path) -> None:
    (tmp_path / "ws" / "sources").mkdir(parents=True)
    collected = tmp_path / "ws" / "sources" / "det1.h5"
    collected.write_bytes(b"")
    spec = load_specification(
        spec_document(
            [hdf5_source("det1", Path("/data/det1.h5")), hdf5_source("det2", Path("/data/det2.h5"))],
        )
    )

    assert resolve_sources(spec, tmp_path / "ws") == {"det1": collected, "det2": Path("/data/det2.h5")}


def test_resolve_sources_for_the_server_never_falls_back_to_an_original(tmp_path: Path) -> None:
    # The server's merges (`--consume-collected`) read snapshots only: a source whose collected
    # copy is missing is an error, never its location (which may have changed since).
    (tmp_path / "ws" / "sources").mkdir(parents=True)
    collected = tmp_path / "ws" / "sources" / "det1.h5"
    collected.write_bytes(b"")
    original = tmp_path / "det2.h5"
    original.write_bytes(b"")
    spec = load_specification(
        spec_document([hdf5_source("det1", Path("/data/det1.h5")), hdf5_source("det2", original)])
    )

    with pytest.raises(MergeError, match=r"sources\[1\] 'det2': its collected copy .*det2.h5 is missing"):
        resolve_sources(spec, tmp_path / "ws", collected_only=True)
    (tmp_path / "ws" / "sources" / "det2.h5").write_bytes(b"")
    assert resolve_sources(spec, tmp_path / "ws", collected_only=True) == {
        "det1": collected,
        "det2": tmp_path / "ws" / "sources" / "det2.h5",
    }


def test_resolve_sources_refuses_a_remote_source_without_a_collected_copy(tmp_path: Path) -> None:
    document = spec_document(
        [{"type": "hdf5File", "sourceName": "far", "location": "host.example:/data/x.h5"}]
    )

    with pytest.raises(
        MergeError, match=r"sources\[0\] 'far': remote location host.example:/data/x.h5 has no collected copy"
    ):
        resolve_sources(load_specification(document), tmp_path)


def test_a_keyword_only_specification_gives_a_product_of_keywords(tmp_path: Path) -> None:
    document = spec_document(
        [keyword_source("ocm", [{"type": "valueKeyword", "name": "OBJECT", "value": "M31"}])]
    )

    result, out = run_merge(tmp_path, document)

    with h5py.File(out, "r") as f:
        assert list(f.keys()) == [] and f.attrs["OBJECT"] == "M31"
    assert result.datasets == 0 and verify(out).ok


def test_a_missing_output_directory_is_a_clear_error(
    tmp_path: Path, two_detectors: tuple[Path, Path]
) -> None:
    spec = load_specification(full_document(*two_detectors))

    with pytest.raises(MergeError, match=r"output directory .*nowhere does not exist"):
        merge(spec, resolve_sources(spec, tmp_path), tmp_path / "nowhere" / "p.h5")


def test_verify_of_an_hdf5_file_that_is_no_product_reports_the_missing_checksum(tmp_path: Path) -> None:
    plain = write_detector_file(tmp_path / "plain.h5", "jf")

    checked = verify(plain)

    assert not checked.ok and "no root DATASUM attribute" in checked.message


def test_filter_keeps_commentary_only_when_selected_as_value_keywords(tmp_path: Path) -> None:
    keywords = {"COMMENT": ["kept"], "HISTORY": ["dropped"], "OBJECT": "M31"}
    det = write_detector_file(tmp_path / "d.h5", "jf", keywords=keywords)
    rules = [{"type": "filter", "selectionPatterns": ["+v *", "-v HISTORY"]}]

    _, out = run_merge(tmp_path, spec_document([hdf5_source("det", det, rules)]))

    with h5py.File(out, "r") as f:
        assert (
            list(f.attrs["COMMENT"]) == ["kept"] and "HISTORY" not in f.attrs and f.attrs["OBJECT"] == "M31"
        )


@pytest.mark.parametrize(
    ("keywords", "pattern", "regex", "fmt"),
    [
        ({"ESO INS MODE": "old", "ESO INS2 MODE": "new"}, "+e INS2 *", "^INS2 ", "INS "),  # renamed one later
        ({"ESO INS0 MODE": "new", "ESO INS MODE": "old"}, "+e INS0 *", "^INS0 ", "INS "),  # renamed one first
    ],
)
def test_a_transform_onto_an_existing_name_replaces_it_with_a_warning(
    tmp_path: Path, keywords: dict[str, str], pattern: str, regex: str, fmt: str
) -> None:
    det = write_detector_file(tmp_path / "d.h5", "jf", keywords=keywords)
    rules = [{"type": "transform", "selectionPatterns": [pattern], "regex": regex, "format": fmt}]

    result, out = run_merge(tmp_path, spec_document([hdf5_source("det", det, rules)]))

    with h5py.File(out, "r") as f:
        assert f.attrs["ESO INS MODE"] == "new"
        assert not any(name.startswith(("ESO INS0", "ESO INS2")) for name in f.attrs)
    assert any("two keywords are named 'ESO INS MODE' after the transform" in w for w in result.warnings)


def _joined_writer_files(directory: Path, relative: bool) -> Path:
    """Two writers' files (alternating image ids) joined into one virtual dataset."""
    from daqif.frame import expected_frame
    from daqif.vds import join_writer_files

    directory.mkdir()
    files = []
    for name, ids in (("a.h5", [1, 3, 5]), ("b.h5", [2, 4, 6])):
        with h5py.File(directory / name, "w") as f:
            f["DET/data"] = np.stack([expected_frame(i, (4, 3), "uint16") for i in ids])
            f["DET/image_id"] = np.array(ids, dtype=np.uint64)
        files.append(directory / name)
    join_writer_files(directory / "joined.h5", files, relative=relative)
    return directory / "joined.h5"


def test_joined_virtual_source_collected_elsewhere_is_merged_by_value(tmp_path: Path) -> None:
    from daqif.frame import expected_frame

    joined = _joined_writer_files(tmp_path / "raw", relative=False)
    collected = tmp_path / "workspace" / "sources" / "det.h5"  # where the DPM links a collected source
    collected.parent.mkdir(parents=True)
    collected.hardlink_to(joined)
    result, outfile = run_merge(tmp_path, spec_document([hdf5_source("det", collected)]))
    with h5py.File(outfile, "r") as product:
        data = product["det/DET/data"]
        assert not data.is_virtual
        assert np.array_equal(data[:], np.stack([expected_frame(i, (4, 3), "uint16") for i in range(1, 7)]))
    assert verify(outfile).ok, result


@pytest.mark.parametrize("path", ["cloned", "copied"])
def test_virtual_source_whose_frames_cannot_be_found_is_refused_not_zero_filled(
    tmp_path: Path, path: str
) -> None:
    joined = _joined_writer_files(tmp_path / "raw", relative=True)
    collected = tmp_path / "elsewhere" / "det.h5"
    collected.parent.mkdir()
    collected.hardlink_to(joined)  # relative source names now point next to the copy: nothing there
    sources = [hdf5_source("det", collected)]
    if path == "copied":  # a larger source is cloned; the joined file goes object by object
        sources.append(hdf5_source("big", write_detector_file(tmp_path / "big.h5", "jf", seed=3)))
    with pytest.raises(MergeError, match=r"virtual dataset /DET/data refers to 'a.h5', which is not a file"):
        run_merge(tmp_path, spec_document(sources))
    assert not list((tmp_path / "out").glob("*.h5"))


def _self_mapping_source(path: Path) -> np.ndarray:
    """A file whose virtual datasets map all of a dataset: of its own (stored as "."), of a file
    beside it (by a relative name), and of its own into rows 1-2 of a larger layout whose other
    rows are the fill value 7. Returns the frames."""
    data = np.stack([expected_frame(i, (4, 3), "uint16") for i in range(2)])
    with h5py.File(path.with_name("beside.h5"), "w") as f:
        f["raw"] = data + 100
    with h5py.File(path, "w") as f:
        f["det/raw"] = data
        for name, stored, target in (("own", ".", "det/raw"), ("beside", "beside.h5", "raw")):
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[:] = h5py.VirtualSource(stored, target, shape=data.shape)  # all of it: no slice
            f["det"].create_virtual_dataset(name, layout)
        layout = h5py.VirtualLayout(shape=(4, 4, 3), dtype=data.dtype)
        layout[1:3] = h5py.VirtualSource(".", "det/raw", shape=data.shape)
        f["det"].create_virtual_dataset("padded", layout, fillvalue=7)
    return data


@pytest.mark.parametrize("path", ["cloned", "copied"])
def test_virtual_datasets_mapping_all_of_their_own_file_or_another_are_merged_by_value(
    tmp_path: Path, path: str
) -> None:
    source = tmp_path / "raw" / "self.h5"
    source.parent.mkdir()
    data = _self_mapping_source(source)
    sources = [hdf5_source("det", source)]
    if path == "copied":  # a larger source is cloned; this one goes object by object
        sources.append(hdf5_source("big", write_detector_file(tmp_path / "big.h5", "jf", seed=3)))

    result, outfile = run_merge(tmp_path, spec_document(sources))

    with h5py.File(outfile, "r") as product:
        group = product["det/det"]
        assert not any(group[name].is_virtual for name in ("raw", "own", "beside", "padded"))
        assert np.array_equal(group["own"][:], data)
        assert np.array_equal(group["beside"][:], data + 100)
        assert np.array_equal(group["padded"][1:3], data) and (group["padded"][[0, 3]] == 7).all()
    assert verify(outfile).ok, result


@pytest.mark.parametrize("path", ["cloned", "copied"])
def test_an_extendible_virtual_dataset_is_merged_at_its_extent(tmp_path: Path, path: str) -> None:
    # The SWMR-friendly form: both sides unlimited, so readers see the frames as they come.
    data = np.stack([expected_frame(i, (4, 3), "uint16") for i in range(5)])
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f.create_dataset("data", data=data, maxshape=(None, 4, 3), chunks=(1, 4, 3))
    source = tmp_path / "growing.h5"
    with h5py.File(source, "w") as f:
        layout = h5py.VirtualLayout(shape=data.shape, maxshape=(None, 4, 3), dtype=data.dtype)
        vsource = h5py.VirtualSource("frames.h5", "data", shape=data.shape, maxshape=(None, 4, 3))
        layout[: h5py.h5s.UNLIMITED] = vsource[: h5py.h5s.UNLIMITED]
        f.create_virtual_dataset("data", layout)
    sources = [hdf5_source("det", source)]
    if path == "copied":
        sources.append(hdf5_source("big", write_detector_file(tmp_path / "big.h5", "jf", seed=3)))

    result, outfile = run_merge(tmp_path, spec_document(sources))

    with h5py.File(outfile, "r") as product:
        merged = product["det/data"]
        assert not merged.is_virtual and merged.maxshape == merged.shape == data.shape
        assert np.array_equal(merged[:], data)
    assert verify(outfile).ok, result


def test_a_virtual_dataset_mapping_a_missing_dataset_of_its_own_file_is_refused_by_name(
    tmp_path: Path,
) -> None:
    source = tmp_path / "self.h5"
    with h5py.File(source, "w") as f:
        layout = h5py.VirtualLayout(shape=(4,), dtype="uint16")
        layout[:] = h5py.VirtualSource(".", "nothing/here", shape=(4,))
        f.create_virtual_dataset("data", layout)

    missing = r"virtual dataset /data: source 'nothing/here' in .*self.h5 does not exist"
    with pytest.raises(MergeError, match=missing):
        run_merge(tmp_path, spec_document([hdf5_source("det", source)]))
    assert not list((tmp_path / "out").glob("*.h5"))


def test_a_source_declaring_an_empty_1_gib_dataset_makes_a_small_product(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.h5"
    with h5py.File(sparse, "w") as f:
        f.create_dataset("empty", shape=(1 << 30,), dtype=np.uint8, fillvalue=7)  # never written
    assert sparse.stat().st_size < 4096
    big = write_detector_file(tmp_path / "big.h5", "jf", seed=1)  # the larger one is cloned
    result, outfile = run_merge(tmp_path, spec_document([hdf5_source("big", big), hdf5_source("s", sparse)]))
    assert outfile.stat().st_size < big.stat().st_size + (1 << 20)
    with h5py.File(outfile, "r") as product:
        empty = product["s/empty"]
        assert empty.id.get_storage_size() == 0 and empty.shape == (1 << 30,) and empty[-1] == 7
    assert verify(outfile).ok, result
