"""The FITS merge on real FITS files: layout, verbatim extensions, checksums, verify, failures."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from daqif.spec import load_specification
from daqif.testing import fits_file_source, write_fits_detector_file
from servers.dpm.merge import MergeError, MergeResult, merge, resolve_sources, verify
from servers.dpm.merge_cli import main

from ..fits_samples import EXPECTED_CARDS, OCM, eso_spec, raw_hdus, write_dcs, write_fcs


def run_merge(tmp_path: Path, document: dict[str, Any], **kwargs: Any) -> MergeResult:
    spec = load_specification(document)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return merge(spec, resolve_sources(spec, tmp_path / "nowhere"), out / spec.product_name, **kwargs)


def assert_checksums_valid_by_astropy_and_fitsverify(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy warns on a checksum mismatch
        with fits.open(path, checksum=True, disable_image_compression=True) as hdul:
            for hdu in hdul:
                assert (hdu.verify_checksum(), hdu.verify_datasum()) == (1, 1), hdu.name
    done = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip() == f"verification OK: {path}", done.stdout


@pytest.fixture
def eso(tmp_path: Path) -> tuple[MergeResult, Path, Path]:
    dcs, fcs = write_dcs(tmp_path / "dcs.fits"), write_fcs(tmp_path / "fcs.fits")
    return run_merge(tmp_path, eso_spec("ESO.1", dcs, fcs)), dcs, fcs


def test_eso_example_cards_in_priority_and_dicb_order_with_reserved_keywords(
    eso: tuple[MergeResult, Path, Path],
) -> None:
    result, _, _ = eso
    assert result.product.name == "ESO.1.fits"
    header = fits.getheader(result.product)
    cards = [(c.keyword, c.value) for c in header.cards]
    assert cards[:4] == [("SIMPLE", True), ("BITPIX", 8), ("NAXIS", 0), ("EXTEND", True)]
    got = [
        (k, v if want is not None else None)
        for (k, v), (_, want) in zip(cards[4:], EXPECTED_CARDS, strict=True)
    ]
    assert got == EXPECTED_CARDS
    assert header["ARCFILE"] == "ESO.1.fits"
    assert header.comments["OBJECT"] == "target"  # the winner's comment
    images = [c.image for c in header.cards]
    assert any(i.startswith("HIERARCH ESO DPR CATG = 'SCIENCE ' / category") for i in images)
    assert any(i.startswith("HIERARCH DCS CLOCK = 5") for i in images)
    assert "source 'ocm': keyword 'ARCFILE' is reserved for the merge; dropped" in result.warnings


def test_eso_example_hdus_in_order_byte_identical_compressed_kept_and_checksums_valid(
    eso: tuple[MergeResult, Path, Path],
) -> None:
    result, dcs, fcs = eso
    product = raw_hdus(result.product)
    dcs_hdus, fcs_hdus = raw_hdus(dcs), raw_hdus(fcs)
    assert [name for name, _, _ in product] == ["PRIMARY", "CHIP1", "CHIP2", "CHIP1"]
    expected = [dcs_hdus[1], dcs_hdus[2], fcs_hdus[1]]
    for (name, _, data), (_, _, src_data) in zip(product[1:], expected, strict=True):
        assert data == src_data, name
    assert product[1][1] == dcs_hdus[1][1]  # CHIP1's checksums verified: header kept byte for byte
    assert product[3][1] == fcs_hdus[1][1]
    assert product[2][1] != dcs_hdus[2][1]  # CHIP2's were stale: written afresh
    stale, fresh = fits.Header.fromstring(dcs_hdus[2][1]), fits.Header.fromstring(product[2][1])
    assert [c.image for c in fresh.cards if c.keyword not in ("CHECKSUM", "DATASUM")] == [
        c.image for c in stale.cards if c.keyword not in ("CHECKSUM", "DATASUM")
    ]  # every other card image unchanged
    with fits.open(result.product, disable_image_compression=True) as hdul:
        assert hdul[3].header["ZIMAGE"] is True  # tile-compressed, still compressed
        assert (hdul[2].header["EXTNAME"], hdul[2].header["EXTVER"]) == ("CHIP2", 2)
    with fits.open(result.product) as hdul, fits.open(dcs) as src:
        np.testing.assert_array_equal(hdul["CHIP1", 1].data, src["CHIP1"].data)
    assert_checksums_valid_by_astropy_and_fitsverify(result.product)
    assert verify(result.product).ok


@pytest.mark.parametrize("hdu", [0, 1, 2, 3])
def test_a_flipped_byte_in_any_hdu_fails_verify_naming_that_hdu(
    eso: tuple[MergeResult, Path, Path], tmp_path: Path, hdu: int, capsys: pytest.CaptureFixture[str]
) -> None:
    result, _, _ = eso
    damaged = tmp_path / "damaged.fits"
    shutil.copy(result.product, damaged)
    with fits.open(damaged, disable_image_compression=True) as hdul:
        info = hdul[hdu].fileinfo()
    # In a data unit when there is one, else inside the value of the header's OBJECT card.
    header_text = damaged.read_bytes()[info["hdrLoc"] : info["datLoc"]]
    offset = info["datLoc"] + 7 if info["datSpan"] else info["hdrLoc"] + header_text.index(b"'M31") + 2
    blob = bytearray(damaged.read_bytes())
    blob[offset] ^= 0x01
    damaged.write_bytes(bytes(blob))

    outcome = verify(damaged)
    assert not outcome.ok
    assert len(outcome.mismatches) == 1 and outcome.mismatches[0].startswith(f"HDU {hdu}")
    assert main(["--verify", str(damaged)]) == 1
    assert f"HDU {hdu}" in capsys.readouterr().err


def test_verify_of_a_product_names_a_missing_checksum_and_refuses_a_truncated_file(tmp_path: Path) -> None:
    plain = write_fits_detector_file(tmp_path / "plain.fits", chips=1, checksum=False)
    outcome = verify(plain)
    assert outcome.mismatches == [
        "HDU 0: no CHECKSUM/DATASUM keywords",
        "HDU 1 (CHIP1): no CHECKSUM/DATASUM keywords",
    ]
    cut = tmp_path / "cut.fits"
    cut.write_bytes(plain.read_bytes()[:-100])
    assert main(["--verify", str(cut)]) == 2


def test_no_target_gives_an_empty_primary_and_primary_data_of_a_source_is_an_unmerged_warning(
    tmp_path: Path,
) -> None:
    fcs = write_fcs(tmp_path / "fcs.fits", primary_data=True)
    result = run_merge(
        tmp_path,
        {"id": "NOTGT", "target": {"fileId": "NOTGT"}, "sources": [OCM, fits_file_source("fcs", fcs)]},
    )
    with fits.open(result.product) as hdul:
        assert hdul[0].header["NAXIS"] == 0 and hdul[0].data is None
        assert hdul[0].header["ORIGFILE"] == "NOTGT.fits"
        assert hdul[0].header["HIERARCH ESO INS FILT1 NAME"] == "R"  # no rules: every keyword
        assert "EXPTIME" in hdul[0].header
        assert [h.name for h in hdul] == ["PRIMARY", "CHIP1"]
    assert set(result.alerts) == {"unmerged:fcs"}
    assert "primary HDU" in result.alerts["unmerged:fcs"]
    assert verify(result.product).ok


def test_a_target_with_primary_data_keeps_its_structure_and_data_bytes(tmp_path: Path) -> None:
    dcs = write_fits_detector_file(tmp_path / "dcs.fits", keywords={"BZERO": 0}, chips=1, primary_data=True)
    result = run_merge(
        tmp_path,
        {"id": "T", "target": {"fileId": "T", "source": fits_file_source("dcs", dcs)}, "sources": []},
    )
    product, source = raw_hdus(result.product), raw_hdus(dcs)
    assert product[0][2] == source[0][2]
    header = fits.getheader(result.product)
    assert (header["BITPIX"], header["NAXIS"], header["NAXIS1"], header["NAXIS2"]) == (16, 2, 16, 16)
    assert result.alerts == {}
    assert_checksums_valid_by_astropy_and_fitsverify(result.product)


def test_structure_keywords_are_never_copied_and_empty_rules_copy_no_keyword(tmp_path: Path) -> None:
    fcs = write_fcs(tmp_path / "fcs.fits")
    keywords = {
        "type": "fitsKeywords",
        "sourceName": "k",
        "keywords": [{"type": "valueKeyword", "name": "NAXIS", "value": 7}],
    }
    result = run_merge(
        tmp_path,
        {"id": "S", "target": {"fileId": "S"}, "sources": [keywords, fits_file_source("fcs", fcs, [])]},
    )
    header = fits.getheader(result.product)
    assert header["NAXIS"] == 0 and "HIERARCH ESO INS FILT1 NAME" not in header
    assert "source 'k': keyword 'NAXIS' is reserved for the merge; dropped" in result.warnings


def test_dry_run_writes_nothing_and_a_bad_source_is_a_merge_error_naming_it(tmp_path: Path) -> None:
    dcs, fcs = write_dcs(tmp_path / "dcs.fits"), write_fcs(tmp_path / "fcs.fits")
    result = run_merge(tmp_path, eso_spec("DRY", dcs, fcs), dry_run=True)
    assert result.dry_run and not (tmp_path / "out" / "DRY.fits").exists()
    fcs.write_bytes(b"not a FITS file at all" * 200)
    with pytest.raises(MergeError, match=r"sources\[2\] 'fcs': cannot read .* as a FITS file"):
        run_merge(tmp_path, eso_spec("BAD", dcs, fcs))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
