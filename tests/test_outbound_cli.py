"""``mssante queue list/retry/hold/release/delete/run``, as an operator runs them.

The commands run in a subprocess against the test gateway's database (SQLite
and PostgreSQL), while the fake operator runs in the test's event loop.
The subprocess uses the real clock, which is later than the FakeClock's
morning: the in-process worker's clock is moved up to it when needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mssante.app import Gateway
from mssante.store.models import OutboundMessage, OutboundStatus
from tests.conftest import FakeClock
from tests.outbound_fakes import (
    CHU,
    CHU_DN,
    FakeOperator,
    TrustWorld,
    running_operator,
)
from tests.test_outbound_worker import enqueue, events, outbound_settings, recipients, worker


@pytest.fixture
def world(tmp_path: Path) -> TrustWorld:
    return TrustWorld(tmp_path / "world")


@pytest.fixture
async def chu(world: TrustWorld) -> AsyncIterator[FakeOperator]:
    async with running_operator(world, "chu", CHU_DN) as fake:
        yield fake


@pytest.fixture
async def gw(
    data_dir: Path, db_url: str, clock: FakeClock, world: TrustWorld, chu: FakeOperator
) -> AsyncIterator[Gateway]:
    gateway = Gateway(outbound_settings(data_dir, db_url, world, {CHU: chu.hop}), clock=clock)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def cli_env(gw: Gateway) -> dict[str, str]:
    s = gw.settings
    env = dict(os.environ)
    env.update(
        MSSANTE_STORE__DATA_DIR=str(s.store.data_dir),
        MSSANTE_STORE__DATABASE_URL=s.store.url(),
        MSSANTE_TRUST__ANCHORS=str(s.trust.anchors),
        MSSANTE_TRUST__WHITELIST=str(s.trust.whitelist),
        MSSANTE_OUTBOUND__ROUTES=json.dumps(s.outbound.routes),
        MSSANTE_OUTBOUND__CLIENT_CERT=str(s.outbound.client_cert),
        MSSANTE_OUTBOUND__CLIENT_KEY=str(s.outbound.client_key),
        MSSANTE_OUTBOUND__TIMEOUT="10",
        COLUMNS="250",
    )
    env.pop("MSSANTE_CONFIG", None)
    return env


def mssante(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(gw)
    return subprocess.run(
        [sys.executable, "-m", "mssante", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def cli(gw: Gateway, *args: str) -> str:
    done = await asyncio.to_thread(mssante, gw, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def row_ids(listed: str) -> set[int]:
    """The ids in the first column of a `queue list` table."""
    return {int(m) for m in re.findall(r"^│ (\d+) ", listed, re.M)}


async def statuses(gw: Gateway) -> dict[int, OutboundStatus]:
    return {r.id: r.status for r in await recipients(gw)}


async def test_list_retry_hold_release_run_and_delete(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    gone = f"parti@{CHU}"
    chu.refuse = {gone: "550 5.1.1 Destinataire inconnu"}
    await enqueue(gw, [f"dr.durand@{CHU}"])
    await enqueue(gw, [gone])
    w, _ = worker(gw, clock)
    assert await w.run_once() == 2
    sent, failed = (r.id for r in await recipients(gw))
    assert await statuses(gw) == {sent: OutboundStatus.SENT, failed: OutboundStatus.FAILED}

    # list: ids, kind, domain, recipient, attempts, error; never content.
    listed = await cli(gw, "queue", "list", "--status", "failed")
    assert row_ids(listed) == {failed}
    assert "reply" in listed and gone in listed and "550 5.1.1 Destinataire inconnu" in listed
    assert "Merci" not in listed and "confidentiel" not in listed
    everything = await cli(gw, "queue", "list")
    assert row_ids(everything) == {sent, failed}

    # retry: back to pending, due now, attempts start over.
    assert "1 recipients queued again" in await cli(gw, "queue", "retry", "--all-failed")
    (_, r) = await recipients(gw)
    assert (r.status, r.attempts, r.failed_at) == (OutboundStatus.PENDING, 0, None)
    assert r.next_attempt_at is not None and r.expires_at > r.next_attempt_at

    # hold: the worker leaves it alone, even when due.
    assert "1 recipients held" in await cli(gw, "queue", "hold", str(failed))
    assert (await statuses(gw))[failed] is OutboundStatus.HELD
    clock._now = max(clock.now(), r.next_attempt_at)
    assert await w.run_once() == 0
    assert "0 recipients held" in await cli(gw, "queue", "hold", str(sent))  # not pending

    # release, then `queue run --once` (a process of its own) delivers it.
    chu.refuse = {}
    assert "1 recipients released" in await cli(gw, "queue", "release", str(failed))
    assert (await statuses(gw))[failed] is OutboundStatus.PENDING
    ran = await cli(gw, "queue", "run", "--once")
    assert "1 recipients handled: 1 sent, 0 failed" in ran
    assert (await statuses(gw))[failed] is OutboundStatus.SENT
    assert [m.rcpt_tos for m in chu.received] == [[f"dr.durand@{CHU}"], [gone]]

    # delete: the recipient, its message and the encrypted blob go; audited.
    await enqueue(gw, ["x@" + CHU])
    (*_, doomed) = await recipients(gw)
    async with gw.store.reads() as s:
        message = await s.get(OutboundMessage, doomed.outbound_id)
        assert message is not None
    blob = gw.store.blobs.path_of(message.blob_key)
    assert blob.exists()
    assert "1 recipients deleted, 1 messages removed" in await cli(
        gw, "queue", "delete", str(doomed.id), str(sent)
    )
    assert doomed.id not in await statuses(gw)
    assert sent in await statuses(gw)  # sent rows are history, not deleted
    assert not blob.exists()

    kinds: dict[str, Any] = {}
    for kind in ("outbound.retried", "outbound.held", "outbound.released", "outbound.deleted"):
        (kinds[kind],) = await events(gw, kind)
        assert kinds[kind].actor == "cli"
    assert kinds["outbound.deleted"].details == {
        "outbound": doomed.outbound_id,
        "recipients": [doomed.id],
    }


async def test_retry_needs_ids_or_all_failed(gw: Gateway) -> None:
    done = await asyncio.to_thread(mssante, gw, "queue", "retry")
    assert done.returncode == 2
    assert "give recipient ids or --all-failed" in done.stderr


async def test_queue_run_delivers_until_stopped(gw: Gateway, chu: FakeOperator) -> None:
    await enqueue(gw, [f"dr.durand@{CHU}"])
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mssante",
        "queue",
        "run",
        env=cli_env(gw),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(chu.wait_received(1), 60)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert "stopped: 1 sent, 0 failed" in out.decode()
    assert [r.status for r in await recipients(gw)] == [OutboundStatus.SENT]
