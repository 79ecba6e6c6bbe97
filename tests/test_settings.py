"""Configuration: the example file stays generated from the schema; errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mssante.settings import Settings, SettingsError, example_toml, load_settings

EXAMPLE = Path(__file__).parent.parent / "config" / "mssante.example.toml"


def test_example_config_matches_schema() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == example_toml(), (
        "config/mssante.example.toml drifted: regenerate with "
        "`mssante config example > config/mssante.example.toml`"
    )


def test_example_config_loads_to_defaults() -> None:
    assert load_settings(EXAMPLE, environ={}) == Settings()
    assert tomllib.loads(example_toml())["smtp"]["max_message_size"] == 25_000_000


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[smtp]\nport = 25\npatient_domain = "Patient.Example.FR."\n')
    s = load_settings(f, environ={"MSSANTE_SMTP__PORT": "2526"})
    assert s.smtp.port == 2526
    assert s.smtp.patient_domain == "patient.example.fr"


def test_error_names_key_value_and_problem(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[smtp]\nport = 70000\nbogus = 1\n")
    with pytest.raises(SettingsError) as err:
        load_settings(f, environ={})
    text = str(err.value)
    assert "smtp.port = 70000" in text
    assert "smtp.bogus" in text
