"""The writer core's config model: validation, partial updates, the config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daqif.errors import DaqException, ErrorCode
from servers.writer.core import Acquisition, DaqConfig, WriterState, WriterStatus, _config_id, load_config


def test_partial_update_changes_only_the_given_fields() -> None:
    config = DaqConfig().updated({"bit_depth": 32, "writer_user_id": 0})
    assert config.bit_depth == 32 and config.dtype == "uint32"
    assert config.detector_name == DaqConfig().detector_name
    assert config.image_pixel_height == DaqConfig().image_pixel_height


def test_module_positions_replace_the_whole_mapping() -> None:
    config = DaqConfig().updated({"module_positions": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}})
    assert config.to_json()["module_positions"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"detector_type": "pilatus"}, "detector_type must be one of eiger, gigafrost, jungfrau, bsread"),
        ({"bit_depth": 16.0}, "bit_depth must be an integer, got 16.0"),
        ({"bit_depth": "16"}, 'bit_depth must be an integer, got "16"'),
        ({"image_pixel_height": True}, "image_pixel_height must be an integer, got true"),
        ({"writer_user_id": "e12345"}, 'writer_user_id must be an integer, got "e12345"'),
        ({"bit_depth": 12}, "bit_depth must be one of 8, 16, 32, got 12"),
        ({"image_pixel_width": 0}, "image_pixel_width must be > 0, got 0"),
        ({"start_udp_port": 70000}, "start_udp_port must be in 0..65535"),
        ({"detector_name": "a/b"}, "detector_name must be a non-empty name without '/'"),
        ({"module_positions": {"0": [1, 2]}}, "module_positions['0'] must be 4 integers"),
        ({"bit_dept": 16}, "unknown field(s) bit_dept"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(update: dict[str, Any], expected: str) -> None:
    with pytest.raises(DaqException) as info:
        DaqConfig().updated(update)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert expected in info.value.message


def test_a_refused_update_lists_every_problem() -> None:
    with pytest.raises(DaqException) as info:
        DaqConfig().updated({"detector_type": "x", "n_modules": 1.5})
    assert "detector_type" in info.value.message and "n_modules" in info.value.message


def test_writer_user_id_below_one_means_the_service_user() -> None:
    assert DaqConfig().updated({"writer_user_id": 0}).owner_uid is None
    assert DaqConfig().updated({"writer_user_id": -1}).owner_uid is None
    assert DaqConfig().updated({"writer_user_id": 12345}).owner_uid == 12345


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


def test_config_ids_increase_like_redis_stream_ids() -> None:
    first = _config_id(1000.0, None)
    assert first == "1000000-0"
    assert _config_id(1000.0, first) == "1000000-1"
    assert _config_id(999.0, "1000000-1") == "1000000-2"
    assert _config_id(1001.0, "1000000-2") == "1001000-0"


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
