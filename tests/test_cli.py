"""The Quick start path as a newcomer runs it: real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mssante import demo

pytestmark = pytest.mark.slow


def _env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MSSANTE_STORE__DATA_DIR=str(data_dir),
        MSSANTE_SMTP__HOST="127.0.0.1",
        MSSANTE_SMTP__PORT="0",
        MSSANTE_SUBMISSION__PORT="0",
        MSSANTE_WEB__PORT="0",  # no fixed port: the webmail listens too
        MSSANTE_OPS__PORT="0",  # nor for the metrics endpoint
        PYTHONUNBUFFERED="1",
        COLUMNS="200",  # rich tables: no wrapping in the assertions
    )
    return env


def mssante(
    data_dir: Path, *args: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = _env(data_dir)
    if port is not None:
        env["MSSANTE_SMTP__PORT"] = str(port)
    return subprocess.run(
        [sys.executable, "-m", "mssante", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mssante", "serve", "--demo"],
        env=_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = None
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"MX on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "server did not print its address"
        yield data_dir, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout is not None:
                proc.stdout.close()


def test_quick_start_demo_message_is_delivered(server: tuple[Path, int]) -> None:
    data_dir, port = server
    sent = mssante(data_dir, "send-test", "--port", str(port))
    assert sent.returncode == 0, sent.stderr
    assert "2.0.0 Message enregistre" in sent.stdout
    box = mssante(data_dir, "mailbox", demo.ACTIVATED)
    assert box.returncode == 0, box.stderr
    assert "Compte rendu de consultation" in box.stdout
    assert "Dr Alice Durand" in box.stdout


def test_send_test_to_opposed_profile_is_refused(server: tuple[Path, int]) -> None:
    data_dir, port = server
    sent = mssante(data_dir, "send-test", "--port", str(port), "--to", demo.OPPOSED)
    assert sent.returncode == 1
    assert "550 5.2.1 Messagerie fermee" in sent.stderr


def test_set_status_applies_at_once_to_the_running_server(server: tuple[Path, int]) -> None:
    data_dir, port = server
    changed = mssante(data_dir, "patients", "set-status", demo.ACTIVATED, "closed")
    assert changed.returncode == 0, changed.stderr
    sent = mssante(data_dir, "send-test", "--port", str(port))
    assert sent.returncode == 1
    assert "5.2.1" in sent.stderr
    shown = mssante(data_dir, "patients", "show", demo.ACTIVATED)
    assert re.search(r"status\s+.*closed", shown.stdout)


def test_patients_show_lists_links(tmp_path: Path, server: tuple[Path, int]) -> None:
    data_dir, _ = server
    shown = mssante(data_dir, "patients", "show", demo.MINOR)
    assert shown.returncode == 0, shown.stderr
    assert demo.ACTIVATED in shown.stdout
    assert "representative" in shown.stdout
    bad = mssante(data_dir, "patients", "show", "123")
    assert bad.returncode == 2
    assert "not a valid INS" in bad.stderr


def test_config_check_reports_key_and_value(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[smtp]\nmax_message_size = -1\n")
    out = mssante(tmp_path, "config", "check", str(f))
    assert out.returncode == 1
    assert "smtp.max_message_size = -1" in out.stderr


def test_patients_import_reports_line_and_imports_nothing_on_error(tmp_path: Path) -> None:
    from mssante.routing.ins import with_key

    good = with_key("1850575123401")
    f = tmp_path / "patients.csv"
    f.write_text(
        f"ins,status,activation_email\n{good},activated,a@example.org\n{good[:13]}00,created,\n"
    )
    data_dir = tmp_path / "data"
    out = mssante(data_dir, "patients", "import", str(f))
    assert out.returncode == 1
    assert f"{f}:3: ins: key does not match" in out.stderr
    assert "nothing imported" in out.stdout
    assert mssante(data_dir, "patients", "show", good).returncode == 1

    out = mssante(data_dir, "patients", "import", "--skip-invalid", str(f))
    assert out.returncode == 0, out.stderr
    assert "1 created" in out.stdout
    shown = mssante(data_dir, "patients", "show", good)
    assert "activated" in shown.stdout


def test_keys_rotate_and_erase_from_the_command_line(server: tuple[Path, int]) -> None:
    data_dir, port = server
    assert mssante(data_dir, "send-test", "--port", str(port)).returncode == 0
    out = mssante(data_dir, "keys", "rotate")
    assert out.returncode == 0, out.stderr
    assert "1 data keys re-wrapped" in out.stdout
    assert len(list((data_dir / "keys").glob("*.key"))) == 2
    box = mssante(data_dir, "mailbox", demo.ACTIVATED)
    assert "Compte rendu de consultation" in box.stdout

    refused = mssante(data_dir, "patients", "erase", "--yes", demo.ACTIVATED)
    assert refused.returncode == 1
    assert "close it before erasing" in refused.stderr
    assert mssante(data_dir, "patients", "set-status", demo.ACTIVATED, "closed").returncode == 0
    erased = mssante(data_dir, "patients", "erase", "--yes", demo.ACTIVATED)
    assert erased.returncode == 0, erased.stderr
    assert "data key destroyed" in erased.stdout


def test_accounts_add_list_disable(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "mssante",
            "accounts",
            "add",
            "dr.x@cabinet.mssante.fr",
            "--password-stdin",
            "--alias",
            "accueil@cabinet.mssante.fr",
        ],
        input="s3cret-passphrase\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    from tests.pki import Pki

    cert = Pki(tmp_path / "pki").issue("dpi", "CN=dpi.cabinet.fr,O=Cabinet,C=FR")
    again = mssante(
        data_dir, "accounts", "add", "dr.x@cabinet.mssante.fr", "--cert", str(cert.cert_path)
    )
    assert again.returncode == 1 and "exists" in again.stderr
    listed = mssante(data_dir, "accounts", "list")
    assert "dr.x@cabinet.mssante.fr" in listed.stdout and "active" in listed.stdout
    assert "s3cret" not in listed.stdout
    assert mssante(data_dir, "accounts", "disable", "dr.x@cabinet.mssante.fr").returncode == 0
    assert "disabled" in mssante(data_dir, "accounts", "list").stdout
