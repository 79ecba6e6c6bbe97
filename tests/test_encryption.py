"""Encryption at rest: the stream format, no plaintext on disk, rotation, crypto-shredding."""

from __future__ import annotations

import base64
import io
import os
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway, Store
from mssante.cli import seed_demo
from mssante.store import crypto
from mssante.store import directory as dirops
from mssante.store.crypto import DecryptionError, StreamEncryptor, decrypt_all
from mssante.store.keys import KeyDestroyedError
from mssante.store.models import Message, PatientKey
from mssante.store.patient_changes import PatientChange, apply
from mssante.store.reading import read_view
from tests.conftest import FakeClock, make_settings
from tests.test_gateway import DOCTOR, addr, professional_message

KEY = bytes(range(32))


def encrypt(data: bytes, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    enc = StreamEncryptor(key, out)
    for i in range(0, len(data), 1000):
        enc.write(data[i : i + 1000])
    enc.finish()
    return out.getvalue()


@pytest.mark.parametrize(
    "size", [0, 1, crypto.SEGMENT - 1, crypto.SEGMENT, crypto.SEGMENT + 1, 3 * crypto.SEGMENT]
)
def test_stream_round_trip(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data)
    assert len(blob) == crypto.encrypted_size(size)
    assert decrypt_all(KEY, io.BytesIO(blob)) == data


def test_stream_refuses_tampering_truncation_reordering_and_wrong_key() -> None:
    data = os.urandom(3 * crypto.SEGMENT + 10)
    blob = encrypt(data)
    seg = crypto.SEGMENT + crypto.TAG_SIZE
    h = crypto.HEADER_SIZE
    flipped = bytearray(blob)
    flipped[h + 5] ^= 1
    truncated = blob[: h + 3 * seg]  # drops the last segment: must not look complete
    swapped = blob[:h] + blob[h + seg : h + 2 * seg] + blob[h : h + seg] + blob[h + 2 * seg :]
    for bad in (bytes(flipped), truncated, swapped):
        with pytest.raises(DecryptionError):
            decrypt_all(KEY, io.BytesIO(bad))
    with pytest.raises(DecryptionError):
        decrypt_all(bytes(32), io.BytesIO(blob))


async def _send(gw: Gateway, rcpts: list[str], marker: str) -> str:
    msg = professional_message(
        rcpts,
        subject=f"Bilan {marker}",
        body=f"Corps {marker}\n",
        pdf=f"%PDF-1.4 {marker}".encode(),
    )
    msg.replace_header("From", f"Dr {marker} <{DOCTOR}>")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp.port, start_tls=False) as c:
        _, text = await c.send_message(msg)
    return text.split()[4]


async def test_no_plaintext_anywhere_on_disk(gateway: Gateway) -> None:
    marker = "Zx9SecretMarkerQq"
    ref = await _send(gateway, [addr(demo.ACTIVATED)], marker)
    raw = await gateway.store.read_original(ref)
    assert marker.encode() in raw  # it really was sent
    for path in gateway.store.data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for needle in (marker.encode(), base64.b64encode(f"%PDF-1.4 {marker}".encode())):
                assert needle not in content, f"plaintext in {path}"


async def test_one_message_two_patients_stored_once_readable_by_both(gateway: Gateway) -> None:
    ref = await _send(gateway, [addr(demo.ACTIVATED), addr(demo.CREATED_POSTAL)], "two")
    async with gateway.store.reads() as s:
        pids = [p.patient_id for p in await s.scalars(select(PatientKey))]
    assert len(pids) == 2
    for pid in pids:
        v = await read_view(gateway.store.reads, gateway.store.keyring, ref, patient_id=pid)
        assert v.subject == "Bilan two"


async def test_crypto_shredding_erases_one_patient_only(gateway: Gateway, clock: FakeClock) -> None:
    from mssante.store.models import ProfileStatus

    ref = await _send(gateway, [addr(demo.ACTIVATED), addr(demo.CREATED_POSTAL)], "shred")
    only = await _send(gateway, [addr(demo.ACTIVATED)], "only")
    store = gateway.store

    async def close_and_erase(session):  # type: ignore[no-untyped-def]
        with pytest.raises(ValueError, match="close it before erasing"):
            await dirops.erase_patient(session, demo.ACTIVATED, at=clock.now(), actor="t")
        change = PatientChange(demo.ACTIVATED, {"status": ProfileStatus.CLOSED})
        await apply(session, change, at=clock.now(), actor="t", details={})
        return await dirops.erase_patient(session, demo.ACTIVATED, at=clock.now(), actor="t")

    assert await store.writer.run(close_and_erase) is True
    async with store.reads() as s:
        activated = await dirops.get_patient(s, demo.ACTIVATED)
        assert activated is not None
        row = await s.get(PatientKey, activated.id)
        assert row is not None and row.wrapped is None and row.destroyed_at is not None
    with pytest.raises(KeyDestroyedError):
        await read_view(store.reads, store.keyring, ref, patient_id=activated.id)
    with pytest.raises(KeyDestroyedError):
        await store.read_original(only)
    # The other recipient keeps the shared message.
    assert b"Corps shred" in await store.read_original(ref)


async def test_key_rotation_rewraps_without_touching_bodies(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    settings = make_settings(data_dir, database_url=db_url)
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    refs = [
        await _send(gw, [addr(ins)], f"rot{i}")
        for i, ins in enumerate((demo.ACTIVATED, demo.CREATED_EMAIL, demo.CREATED_POSTAL))
    ]
    async with gw.store.reads() as s:
        blobs_before = {m.blob_key: m.size for m in await s.scalars(select(Message))}
    await gw.stop()
    keys_dir = settings.store.keys_path()
    (old_key_file,) = keys_dir.glob("*.key")
    body_bytes = {p: p.read_bytes() for p in (data_dir / "blobs").rglob("*") if p.is_file()}

    new = crypto.new_key_file(keys_dir)
    crypto.set_current(keys_dir, new.id)
    store = Store(settings)
    await store.open()
    try:
        assert await store.writer.run(store.keyring.pending_rotation) == 3
        # Interrupted after one batch, then resumed.
        assert (
            await store.writer.run(lambda s: store.keyring.rewrap_batch(s, at=clock.now(), limit=1))
            == 1
        )
        assert await store.writer.run(store.keyring.pending_rotation) == 2
        assert (
            await store.writer.run(
                lambda s: store.keyring.rewrap_batch(s, at=clock.now(), limit=10)
            )
            == 2
        )
        assert await store.writer.run(store.keyring.pending_rotation) == 0
    finally:
        await store.close()
    # Bodies untouched; the old master key is no longer needed.
    assert body_bytes == {p: p.read_bytes() for p in (data_dir / "blobs").rglob("*") if p.is_file()}
    old_key_file.unlink()
    store = Store(settings)
    await store.open()
    try:
        for i, ref in enumerate(refs):
            assert f"Corps rot{i}".encode() in await store.read_original(ref)
        async with store.reads() as s:
            assert {m.blob_key: m.size for m in await s.scalars(select(Message))} == blobs_before
    finally:
        await store.close()


async def test_rotation_by_another_process_while_the_gateway_runs(gateway: Gateway) -> None:
    """Regression: `mssante keys rotate` (another process) re-wrapped the data
    keys under a key the running gateway had never loaded, so every later
    message to those patients got 451.  The gateway reads the key directory
    again on a miss, and takes the new current key on SIGHUP (reload)."""
    await _send(gateway, [addr(demo.ACTIVATED)], "before")
    settings = gateway.settings
    keys_dir = settings.store.keys_path()
    new = crypto.new_key_file(keys_dir)
    crypto.set_current(keys_dir, new.id)
    other = Store(settings)  # what `mssante keys rotate` opens
    await other.open()
    try:
        rewrap = other.keyring.rewrap_batch
        assert await other.writer.run(lambda s: rewrap(s, at=datetime.now(UTC), limit=10)) == 1
    finally:
        await other.close()

    ref = await _send(gateway, [addr(demo.ACTIVATED)], "after")  # a 250, not 451
    assert b"Corps after" in await gateway.store.read_original(ref)
    assert gateway.store.keys.current().id == new.id  # read with the missing key

    # Without a miss to tell it, SIGHUP makes a newer current key its own.
    newer = crypto.new_key_file(keys_dir)
    crypto.set_current(keys_dir, newer.id)
    gateway.reload()
    assert gateway.store.keys.current().id == newer.id
    await _send(gateway, [addr(demo.CREATED_EMAIL)], "new key")
    async with gateway.store.reads() as s:
        created = await dirops.get_patient(s, demo.CREATED_EMAIL)
        assert created is not None
        row = await s.get(PatientKey, created.id)
    assert row is not None and row.master_key_id == newer.id


def test_master_key_from_environment(tmp_path: Path) -> None:
    raw = os.urandom(32)
    env = {"MSSANTE_MASTER_KEY": base64.b64encode(raw).decode()}
    provider = crypto.load_key_provider(tmp_path / "none", environ=env)
    assert provider.current().key == raw
    assert "key=" not in repr(provider.current())
    with pytest.raises(KeyError, match="no master key"):
        crypto.load_key_provider(tmp_path / "none", environ={})
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.load_key_provider(tmp_path, environ={"MSSANTE_MASTER_KEY": "c2hvcnQ="})
