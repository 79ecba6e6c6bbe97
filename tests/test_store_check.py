"""`mssante store check` and `mssante audit verify` find planted corruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from mssante import demo
from mssante.app import Gateway
from mssante.store import audit
from mssante.store.check import check_store
from mssante.store.models import AuditEvent, Message, OutboundKind
from tests.test_cli import mssante
from tests.test_encryption import _send
from tests.test_gateway import addr


async def _three_messages(gw: Gateway) -> list[str]:
    return [
        await _send(gw, [addr(ins)], f"m{i}")
        for i, ins in enumerate((demo.ACTIVATED, demo.CREATED_EMAIL, demo.MINOR))
    ]


async def _check(gw: Gateway):  # type: ignore[no-untyped-def]
    return await check_store(gw.store.reads, gw.store.blobs, gw.store.keyring)


async def _blob_path(gw: Gateway, ref: str) -> Path:
    async with gw.store.reads() as s:
        key = await s.scalar(select(Message.blob_key).where(Message.ref == ref))
    assert key is not None
    return gw.store.blobs.path_of(key)


async def test_clean_store_passes(gateway: Gateway) -> None:
    await _three_messages(gateway)
    report = await _check(gateway)
    assert report.problems == []
    assert (report.messages, report.blobs) == (3, 3)
    assert report.audit_events > 3


async def test_flipped_byte_in_blob_is_found(gateway: Gateway) -> None:
    refs = await _three_messages(gateway)
    path = await _blob_path(gateway, refs[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = await _check(gateway)
    assert len(report.problems) == 1
    assert refs[1] in report.problems[0] and "undecryptable" in report.problems[0]


async def test_missing_and_orphan_blobs_are_found(gateway: Gateway) -> None:
    refs = await _three_messages(gateway)
    (await _blob_path(gateway, refs[0])).unlink()
    stray = gateway.store.blobs.path_of("ab" * 16)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"junk")
    problems = (await _check(gateway)).problems
    assert any(refs[0] in p and "missing" in p for p in problems)
    assert any("orphan blob" in p and "ab" * 16 in p for p in problems)
    assert len(problems) == 2


@pytest.mark.parametrize("tamper", ["edit", "delete-middle", "insert"])
async def test_audit_tampering_is_found(gateway: Gateway, tamper: str) -> None:
    await _three_messages(gateway)
    async with gateway.store.reads() as s:
        ids = [e.id for e in await s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    victim = ids[len(ids) // 2]
    statement = {
        "edit": f"UPDATE audit_events SET actor = 'someone-else' WHERE id = {victim}",
        "delete-middle": f"DELETE FROM audit_events WHERE id = {victim}",
        "insert": (
            "INSERT INTO audit_events (occurred_at, kind, patient_id, message_id, actor, details,"
            " prev_hash, hash) SELECT occurred_at, kind, patient_id, message_id, actor, details,"
            f" prev_hash, '{'f' * 64}' FROM audit_events WHERE id = {victim}"
        ),
    }[tamper]
    async with gateway.store.write_engine.begin() as conn:
        await conn.execute(text(statement))
    report = await _check(gateway)
    assert report.problems and all(p.startswith("audit: ") for p in report.problems)


async def test_removed_newest_events_found_with_kept_head(gateway: Gateway) -> None:
    await _three_messages(gateway)
    async with gateway.store.reads() as s:
        kept = await audit.head(s)
    async with gateway.store.write_engine.begin() as conn:
        await conn.execute(
            text("DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)")
        )
    async with gateway.store.reads() as s:
        _, problems = await audit.verify_stored_chain(s)
        assert problems == []  # the chain alone cannot tell
        _, problems = await audit.verify_stored_chain(s, expect_head=kept)
        assert problems and "expected head" in problems[0]


@pytest.mark.slow
def test_cli_exit_codes(tmp_path: Path) -> None:
    from tests.test_cli import _env  # noqa: F401  (same environment as the CLI tests)

    data_dir = tmp_path / "data"
    ok = mssante(data_dir, "store", "check")
    assert ok.returncode == 0, ok.stderr
    assert "0 messages" in ok.stdout
    ok = mssante(data_dir, "audit", "verify")
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    head = mssante(data_dir, "audit", "head")
    assert len(head.stdout.strip()) == 64
    bad = mssante(data_dir, "audit", "verify", "--expect-head", "0" * 63 + "1")
    assert bad.returncode == 1 and "PROBLEM" in bad.stdout


@pytest.mark.slow
def test_cli_removes_orphan_blobs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert mssante(data_dir, "store", "check").returncode == 0
    stray = data_dir / "blobs" / "cd" / "cd" / ("cd" * 16)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by a crash")
    found = mssante(data_dir, "store", "check")
    assert found.returncode == 1 and "orphan blob" in found.stdout
    fixed = mssante(data_dir, "store", "check", "--remove-orphans")
    assert fixed.returncode == 0, fixed.stdout
    assert not stray.exists()


async def test_queued_outbound_mail_is_not_an_orphan(gateway: Gateway) -> None:
    """Regression: outbound blobs (outbound/queue.py) were reported as orphans,
    and ``store check --remove-orphans`` would have deleted queued mail."""
    queue = gateway.store.outbound
    prepared = await queue.prepare(b"Subject: r\r\n\r\nreponse\r\n")

    async def job(session: Any) -> int:
        return await queue.add(
            session,
            prepared,
            kind=OutboundKind.REPLY,
            mail_from=f"{demo.ACTIVATED}@patient.mssante.fr",
            recipients=["dr.durand@chu-exemple.mssante.fr"],
            at=gateway.clock.now(),
        )

    await gateway.store.writer.run(job)
    report = await _check(gateway)
    assert report.orphans == [] and report.problems == []
    assert report.blobs == 1
