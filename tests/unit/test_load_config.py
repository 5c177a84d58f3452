"""Config files fail at start-up with the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli import app
from streams.settings import ConfigError, default_config_path, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "switchboard.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_config_loads() -> None:
    config = load_config(default_config_path())
    assert config.routing.default_persona in config.personas


def test_error_names_the_file_the_field_and_the_expectation(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "personas:\n  a: {name: A}\nrouting:\n  default_persona: a\n"
        "conversation:\n  max_history_turns: zero\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "conversation.max_history_turns" in message
    assert "valid integer" in message


def test_not_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "personas: [1\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_custom_rule_is_refused_with_the_registered_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "personas:\n  a: {name: A}\nrouting:\n  default_persona: a\n"
        "  rules:\n    - {name: r, custom: no_such_rule, action: {persona: a}}\n",
    )
    with pytest.raises(ConfigError, match=r"unknown custom rule 'no_such_rule'"):
        load_config(path)


def test_check_config_command_exits_2_with_a_one_line_reason(tmp_path: Path) -> None:
    path = _write(tmp_path, "personas:\n  a: {name: A}\nrouting:\n  default_persona: b\n")
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "default_persona 'b' is not a persona" in result.output
    assert "Traceback" not in result.output


def test_settings_survive_the_trip_through_a_child_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from streams.settings import Settings

    original = Settings(
        kafka_brokers="k:1",
        partitions=7,
        single_record_batches=True,
        fetch_max_wait_ms=50,
        config=tmp_path / "c.yaml",
        data_dir=tmp_path,
    )
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original
