"""The writer's config model: validation, partial updates, the config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daqif.errors import DaqException, ErrorCode
from servers.writer.models import DaqConfig, UidRange, load_config, parse_config, parse_write_request
from servers.writer.states import WriterState
from servers.writer.status import Acquisition, WriterStatus


def test_partial_update_changes_only_the_given_fields() -> None:
    config = DaqConfig().updated(parse_config({"bit_depth": 32, "writer_user_id": 0}))
    assert config.bit_depth == 32 and config.dtype == "uint32"
    assert config.detector_name == DaqConfig().detector_name
    assert config.image_pixel_height == DaqConfig().image_pixel_height


def test_module_positions_replace_the_whole_mapping() -> None:
    config = DaqConfig().updated(parse_config({"module_positions": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}}))
    assert config.to_json()["module_positions"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"detector_type": "pilatus"}, "detector_type: must be one of eiger, gigafrost, jungfrau, bsread"),
        ({"bit_depth": 16.0}, "bit_depth: Input should be a valid integer (got 16.0)"),
        ({"bit_depth": "16"}, 'bit_depth: Input should be a valid integer (got "16")'),
        ({"image_pixel_height": True}, "image_pixel_height: Input should be a valid integer (got true)"),
        ({"writer_user_id": "e12345"}, 'writer_user_id: Input should be a valid integer (got "e12345")'),
        ({"bit_depth": 12}, "bit_depth: must be one of 8, 16, 32, got 12"),
        ({"image_pixel_width": 0}, "image_pixel_width: Input should be greater than or equal to 1 (got 0)"),
        ({"start_udp_port": 70000}, "start_udp_port: Input should be less than or equal to 65535"),
        ({"detector_name": "a/b"}, "detector_name: must be 1-64 letters, digits, '_', '-' or '.'"),
        (
            {"detector_name": "a\x00b"},
            "detector_name: must be 1-64 letters, digits, '_', '-' or '.', not starting "
            "with '.' or '-' (it names the HDF5 group), got \"a\\u0000b\"",
        ),
        ({"detector_name": ".."}, "detector_name: must be 1-64 letters"),
        ({"detector_name": "x" * 65}, "detector_name: must be 1-64 letters"),
        ({"writer_user_id": 2**40}, "writer_user_id: Input should be less than or equal to 4294967294"),
        ({"writer_user_id": -2}, "writer_user_id: Input should be greater than or equal to -1"),
        ({"module_positions": {"0": [1, 2]}}, "module_positions.0: List should have at least 4 items"),
        ({"bit_dept": 16}, "bit_dept: unknown field"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(update: dict[str, Any], expected: str) -> None:
    with pytest.raises(DaqException) as info:
        parse_config(update)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message.startswith("invalid config: ")
    assert expected in info.value.message


def test_a_refused_update_lists_every_problem() -> None:
    with pytest.raises(DaqException) as info:
        parse_config({"detector_type": "x", "n_modules": 1.5})
    assert "detector_type" in info.value.message and "n_modules" in info.value.message


def test_a_long_refused_value_is_quoted_shortly() -> None:
    with pytest.raises(DaqException) as info:
        parse_config({"detector_type": "x" * 10_000})
    assert len(info.value.message) < 400


def test_writer_user_id_below_one_means_the_service_user() -> None:
    assert DaqConfig(writer_user_id=0).owner_uid is None
    assert DaqConfig(writer_user_id=-1).owner_uid is None
    assert DaqConfig(writer_user_id=12345).owner_uid == 12345


def test_config_file_is_merged_into_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "det.json"
    path.write_text(json.dumps({"detector_name": "EG9M", "image_pixel_height": 100}))
    config = load_config(path)
    assert (config.detector_name, config.image_pixel_height) == ("EG9M", 100)
    assert config.bit_depth == DaqConfig().bit_depth


def test_an_unreadable_config_file_says_where(tmp_path: Path) -> None:
    path = tmp_path / "det.json"
    path.write_text("{ not json")
    with pytest.raises(DaqException, match=r"det.json is not valid JSON: .* line 1"):
        load_config(path)
    with pytest.raises(DaqException, match="cannot read config file"):
        load_config(tmp_path / "missing.json")


def test_status_before_any_acquisition_has_null_file_and_times() -> None:
    status = WriterStatus(WriterState.READY, Acquisition()).to_json()
    assert status["state"] == "READY"
    assert status["acquisition"]["info"]["output_file"] is None
    assert status["acquisition"]["stats"] == {
        "n_write_completed": 0,
        "n_write_requested": 0,
        "start_time": None,
        "stop_time": None,
    }
    assert set(status["acquisition"]) == {"info", "message", "state", "stats"}


@pytest.mark.parametrize("name", ["TESTDET", "jf_1M.module-0", "0", "_x"])
def test_safe_detector_names_are_accepted(name: str) -> None:
    assert parse_config({"detector_name": name}).detector_name == name


@pytest.mark.parametrize(
    ("output_file", "expected"),
    [
        ("/data/" + "x" * 300 + ".h5", "output_file: has a path component of 303 bytes, the limit is 255"),
        ("/data/" + "x" * 5000, "output_file: is 5006 characters long, the limit is 4096"),
        ("/data/a\x00.h5", "output_file: contains a NUL character"),
        ("/data/\ud800.h5", "output_file: is not valid Unicode text"),
    ],
)
def test_output_file_beyond_path_limits_is_refused_with_a_short_message(
    output_file: str, expected: str
) -> None:
    with pytest.raises(DaqException) as info:
        parse_write_request({"output_file": output_file, "n_images": 1})
    assert expected in info.value.message
    assert len(info.value.message) < 400


def test_uid_range_parses_min_max_and_a_single_uid() -> None:
    assert (1000 in UidRange.parse("1000-1999"), 2000 in UidRange.parse("1000-1999")) == (True, False)
    assert str(UidRange.parse("4242")) == "4242" and 4242 in UidRange.parse("4242")
    for bad in ("0-10", "20-10", "x", "1-2-3", ""):
        with pytest.raises(ValueError, match="expected MIN-MAX"):
            UidRange.parse(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12345", 'writer_user_id: Input should be a valid integer (got "12345")'),
        (-2, "writer_user_id: Input should be greater than or equal to -1"),
        (2**40, "writer_user_id: Input should be less than or equal to 4294967294"),
    ],
)
def test_a_write_request_writer_user_id_is_a_uid_or_refused_naming_it(value: Any, expected: str) -> None:
    with pytest.raises(DaqException) as refused:
        parse_write_request({"output_file": "/data/a.h5", "n_images": 1, "writer_user_id": value})
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT and expected in refused.value.message
    assert parse_write_request({"output_file": "/data/a.h5", "n_images": 1}).writer_user_id is None


def test_an_acquisition_reports_writer_user_id_only_when_its_request_named_one() -> None:
    assert "writer_user_id" not in Acquisition(output_file="/data/a.h5").to_json()["info"]
    assert Acquisition(output_file="/data/a.h5", writer_user_id=0).to_json()["info"]["writer_user_id"] == 0
