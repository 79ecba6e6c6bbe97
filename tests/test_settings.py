"""Configuration: the example file stays generated from the schema; errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mssante.settings import (
    REFERENCE_END,
    REFERENCE_START,
    Settings,
    SettingsError,
    example_toml,
    load_settings,
    reference_markdown,
)

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "config" / "mssante.example.toml"


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


def test_errors_say_where_and_how_to_fix(tmp_path: Path) -> None:
    """Issue 9.1: each problem names the key, the value, where it was set and the fix."""
    f = tmp_path / "c.toml"
    f.write_text('[smtp]\nprot = 25\n[notfy]\nx = 1\n[store]\nsqlite_synchronous = "MAYBE"\n')
    with pytest.raises(SettingsError) as err:
        load_settings(f, environ={"MSSANTE_WEB__PORT": "abc"})
    lines = str(err.value).splitlines()[1:]
    assert f"  smtp.prot in {f}: unknown key: remove it or write 'smtp.port'" in lines
    assert f"  notfy in {f}: unknown key: remove it or write 'notify'" in lines
    assert (
        f"  store.sqlite_synchronous = 'MAYBE' in {f}: should be 'FULL' or 'EXTRA'"
        " (SQLite synchronous pragma (durability).)" in lines
    )
    web = [line for line in lines if line.startswith("  web.port")]
    assert web == [
        "  web.port = 'abc' from $MSSANTE_WEB__PORT: should be a valid integer, unable to parse"
        " string as an integer (Webmail HTTP(S) port.)"
    ]
    assert len(lines) == 4


def test_readme_configuration_reference_matches_schema() -> None:
    """Issue 9: the README's configuration reference is the schema's, every key."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END)
    block = readme[start : end + len(REFERENCE_END)] + "\n"
    assert block == reference_markdown(), (
        "README.md's configuration reference drifted: replace it with `mssante config reference`"
    )
    keys = sum(len(type(getattr(Settings(), s)).model_fields) for s in Settings.model_fields)
    assert block.count("\n| `") == keys
