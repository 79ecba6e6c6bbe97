"""Several nodes against one PostgreSQL (issue 9.7).

Two ``mssante serve --role gateway`` processes and two ``--role worker``
processes share one PostgreSQL database and one data directory, as in
docker/compose.yaml scaled out.  Both gateways accept mail; every message
gives the patient a notification e-mail (through a fake smarthost) and its
refused recipient a delivery status notification to the sending operator
(through the outbound queue to a fake operator).  Each of them must leave
exactly once although both workers claim from the same tables, and the
audit trail written by four processes must verify.

The workers are stopped with SIGTERM before counting, so anything sent
twice would have arrived by then.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.app import Store
from mssante.routing.ins import with_key
from mssante.settings import load_settings
from mssante.store.directory import PatientRecord, upsert_patient
from mssante.store.models import (
    Notification,
    NotificationStatus,
    OutboundRecipient,
    OutboundStatus,
    ProfileStatus,
)
from tests import pg
from tests.outbound_fakes import CHU, CHU_DN, FakeOperator, TrustWorld, running_operator
from tests.rawsmtp import RawSmtp
from tests.test_notify_fakes import PASSWORD, USER, FakeSmarthost, running_smarthost
from tests.test_outbound_dsn import UNKNOWN

pytestmark = pytest.mark.slow

DOMAIN = "patient.mssante.fr"
SENDER = f"dr.durand@{CHU}"
PER_GATEWAY = 12


def config(world: TrustWorld, relay: FakeSmarthost, chu: FakeOperator, data: Path, url: str) -> str:
    return f"""
[smtp]
port = 0
hostname = "mx.test.localhost"
require_tls = false
refusal = "dsn"

[submission]
enabled = false

[limits]
# Every message has an unknown recipient on purpose (its DSN): not a probe.
bad_recipients_per_session = 1000
bad_recipients_per_day = 1000
close_after_bad_in_session = 1000

[store]
data_dir = "{data}"
database_url = "{url}"

[trust]
anchors = "{world.anchors}"
crls = ["{world.crl}"]
whitelist = "{world.whitelist}"
require_client_certificate = false

[notify]
transport = "smarthost"
smarthost_port = {relay.port}
smarthost_ca = "{relay.ca}"
smarthost_username = "{USER}"
smarthost_password = "{PASSWORD}"
coalesce_window = 0.0
poll_interval = 0.2
batch_size = 3

[outbound]
routes = {{ "{CHU}" = "{chu.hop}" }}
client_cert = "{world.client_cert}"
client_key = "{world.client_key}"
poll_interval = 0.2
batch_size = 2
concurrency = 1

[web]
enabled = false

[ops]
port = 0
"""


class Node:
    """One ``mssante serve --role ROLE`` process; its log read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.lines: list[str] = []
        self.port = 0
        self._listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config_file: Path, role: str) -> Node:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mssante",
            "--config",
            str(config_file),
            "serve",
            "--role",
            role,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, role)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if m := re.search(r"SMTP listening on 127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()  # ended: wait_listening reports it

    async def wait_listening(self) -> int:
        await asyncio.wait_for(self._listening.wait(), 60)
        assert self.port, f"{self.role} did not start:\n{''.join(self.lines)}"
        return self.port

    async def terminate(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        await self._reader
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def mssante(config_file: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mssante",
        "--config",
        str(config_file),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def patients(gateway: int) -> list[str]:
    """The patients the messages of one gateway go to: one message each, so
    that each gets exactly one notification e-mail (no coalescing)."""
    return [with_key(f"28{gateway}0175{100 + i}456") for i in range(PER_GATEWAY)]


async def add_patients(store: Store) -> None:
    at = datetime.now(UTC)

    async def job(session: AsyncSession) -> None:
        for ins in patients(0) + patients(1):
            record = PatientRecord(
                ins=ins, status=ProfileStatus.ACTIVATED, activation_email=f"{ins}@patients.test"
            )
            await upsert_patient(session, record, at=at, actor="test")

    await store.writer.run(job)


async def send(port: int, to: list[str]) -> list[str]:
    """One message to each patient of ``to``, each also to an unknown INS; their refs."""
    refs = []
    c = await RawSmtp.connect("127.0.0.1", port)
    try:
        assert (await c.cmd("EHLO cabinet.test")).code == 250
        for i, ins in enumerate(to):
            assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await c.cmd(f"RCPT TO:<{ins}@{DOMAIN}>")).code == 250
            assert (await c.cmd(f"RCPT TO:<{UNKNOWN}>")).code == 250  # dsn mode
            assert (await c.cmd("DATA")).code == 354
            body = (
                f"From: Dr Durand <{SENDER}>\r\nTo: {ins}@{DOMAIN}\r\n"
                f"Subject: Resultat {port}-{i}\r\n"
                f"Message-ID: <{port}-{i}@{CHU}>\r\n\r\nBonjour.\r\n.\r\n"
            )
            await c.send(body.encode())
            stored = await c.reply()
            assert stored.code == 250, stored
            refs.append(stored.text)
        await c.cmd("QUIT")
    finally:
        await c.close()
    return refs


@pytest.fixture
async def pg_url(pg_admin_url: str) -> AsyncIterator[str]:
    async with pg.fresh_database(pg_admin_url) as url:
        yield url


async def test_two_gateways_and_two_workers_share_one_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    world = TrustWorld(tmp_path / "world")
    async with (
        running_smarthost(tmp_path / "relay") as relay,
        running_operator(world, "chu", CHU_DN) as chu,
    ):
        config_file = tmp_path / "mssante.toml"
        config_file.write_text(config(world, relay, chu, tmp_path / "data", pg_url))
        settings = load_settings(config_file, environ={})

        # Once, before the nodes start (compose's `migrate` service).
        code, out = await mssante(config_file, "db", "upgrade")
        assert code == 0, out
        store = Store(settings)
        await store.open()
        try:
            await add_patients(store)
        finally:
            await store.close()

        gateways = [await Node.start(config_file, "gateway") for _ in range(2)]
        nodes = list(gateways)
        try:
            ports = [await node.wait_listening() for node in gateways]
            assert ports[0] != ports[1]
            sent = await asyncio.gather(*(send(port, patients(i)) for i, port in enumerate(ports)))
            total = sum(len(refs) for refs in sent)
            assert total == 2 * PER_GATEWAY
            # Everything is queued before the workers start, and the first
            # sends are held, so both workers claim while the other holds
            # rows: a claim that ignored the other's lease would send twice.
            relay.hold()
            chu.hold()
            nodes += [await Node.start(config_file, "worker") for _ in range(2)]
            try:
                await relay.wait_waiting(2)
                await chu.wait_waiting(2)
                relay.release()
                chu.release()
                await relay.wait_received(total, timeout=120)
                await chu.wait_received(total)
            except TimeoutError:
                logs = "".join(f"--- {n.role}\n{''.join(n.lines)}" for n in nodes[2:])
                raise AssertionError(
                    f"{len(relay.received)} notifications and {len(chu.received)} DSNs"
                    f" of {total}; the workers said:\n{logs}"
                ) from None
            # Stopped gracefully: a pass under way finishes, so anything a
            # worker was about to send twice would be here by now.
            for node in nodes:
                assert await node.terminate() == 0, "".join(node.lines)
        finally:
            for node in nodes:
                node.kill()

        # Each notification e-mail exactly once, to the patient's address.
        message_ids = Counter(
            email.message_from_bytes(r.data)["Message-ID"] for r in relay.received
        )
        assert len(relay.received) == total
        assert all(count == 1 for count in message_ids.values()), message_ids
        # Each DSN exactly once to the operator, over mutual TLS.
        dsn_ids = Counter(email.message_from_bytes(r.data)["Message-ID"] for r in chu.received)
        assert len(chu.received) == total
        assert all(count == 1 for count in dsn_ids.values()), dsn_ids

        store = Store(settings)
        await store.open()
        try:
            async with store.reads() as session:
                notifications = list(await session.scalars(select(Notification)))
                recipients = list(await session.scalars(select(OutboundRecipient)))
        finally:
            await store.close()
        assert len(notifications) == total
        assert {n.status for n in notifications} == {NotificationStatus.SENT}
        assert all(n.attempts == 1 for n in notifications)
        assert {n.email_message_id for n in notifications} == set(message_ids)
        assert len(recipients) == total
        assert {r.status for r in recipients} == {OutboundStatus.SENT}
        assert all(r.attempts == 1 for r in recipients)

        # The audit chain written by four processes verifies end to end.
        code, out = await mssante(config_file, "audit", "verify")
        assert code == 0, out
