"""DPM settings: defaults, the JSON file, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servers.dpm.config import ConfigError, build_config


def test_defaults_derive_data_root_and_allowed_roots_from_the_workspace(tmp_path: Path) -> None:
    config = build_config(workspace=tmp_path / "data" / "dpm")
    assert config.data_root == tmp_path / "data"
    assert config.allowed_roots == (tmp_path / "data",)
    assert (config.max_active_daqs, config.max_transfers, config.max_merges) == (4, 2, 1)
    assert config.debug_delays == {}


def test_data_root_alone_puts_the_workspace_under_it(tmp_path: Path) -> None:
    config = build_config(data_root=tmp_path)
    assert config.workspace == tmp_path / "dpm"
    assert config.allowed_roots == (tmp_path,)


def test_file_settings_apply_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "dpm.json"
    path.write_text(
        json.dumps(
            {
                "workspace": "/srv/dpm",
                "allowed_roots": ["/srv/a", "/srv/b"],
                "max_merges": 3,
                "free_space_reserve_bytes": 1000,
                "rsync_remote_shell": "ssh -o BatchMode=yes",
                "debug_delays": {"MERGING": 1.5},
            }
        )
    )
    config = build_config(config_file=path, allowed_roots=[tmp_path])
    assert config.workspace == Path("/srv/dpm")
    assert config.allowed_roots == (tmp_path,)
    assert config.max_merges == 3
    assert config.free_space_reserve_bytes == 1000
    assert config.rsync_remote_shell == "ssh -o BatchMode=yes"
    assert config.debug_delay("MERGING") == 1.5 and config.debug_delay("RELEASING") == 0.0


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"max_merge": 1}, ["unknown key 'max_merge'; known keys: allowed_roots, data_root"]),
        ([], ["expected a JSON object, got list"]),
        ({"max_merges": 0}, ["key 'max_merges': Input should be greater than or equal to 1"]),
        ({"max_active_daqs": -1}, ["key 'max_active_daqs'"]),
        ({"max_transfers": True}, ["key 'max_transfers': Input should be a valid integer"]),
        ({"watch_queue_size": 1.5}, ["key 'watch_queue_size'"]),
        ({"free_space_reserve_bytes": "1G"}, ["key 'free_space_reserve_bytes'"]),
        ({"workspace": "relative/dir"}, ["key 'workspace': expected an absolute path, got 'relative/dir'"]),
        ({"allowed_roots": []}, ["key 'allowed_roots'", "at least 1 item"]),
        ({"allowed_roots": ["/ok", "rel"]}, ["key 'allowed_roots[1]'"]),
        ({"rsync_remote_shell": "ssh -o 'unbalanced"}, ["key 'rsync_remote_shell': cannot split"]),
        ({"rsync_command": ""}, ["key 'rsync_command'"]),
        ({"storage_report_interval_s": 0}, ["key 'storage_report_interval_s'", "greater than 0"]),
        ({"debug_delays": {"WRITING": 1}}, ["key 'debug_delays.WRITING'", "'SCHEDULED'"]),
        ({"debug_delays": {"MERGING": -1}}, ["key 'debug_delays.MERGING'"]),
    ],
)
def test_invalid_setting_is_refused_naming_the_file_and_key(
    tmp_path: Path, settings: object, words: list[str]
) -> None:
    path = tmp_path / "dpm.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as caught:
        build_config(config_file=path)
    assert str(caught.value).startswith(f"config file {path}: ")
    for word in words:
        assert word in str(caught.value)


def test_config_file_that_is_not_json_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "dpm.json"
    path.write_text('{\n "max_merges": 2,\n}')
    with pytest.raises(ConfigError, match=r"not valid JSON: .* at line 3"):
        build_config(config_file=path)


def test_every_problem_of_a_file_is_reported_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "dpm.json"
    path.write_text(json.dumps({"max_merges": 0, "max_transfers": -1}))
    with pytest.raises(ConfigError) as caught:
        build_config(config_file=path)
    message = str(caught.value)
    assert "\n" not in message
    assert "key 'max_merges'" in message and "key 'max_transfers'" in message


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^key 'max_active_daqs': Input should be greater than or equal to 0$"
    ):
        build_config(workspace=tmp_path / "dpm", overrides={"max_active_daqs": -1})
