"""``smtp.workers`` = 2: two gateway processes share the MX port (SO_REUSEPORT).

The real server runs as a subprocess (tests/durability_harness.py), on
SQLite and PostgreSQL: connections are spread over both workers, every
acknowledged message is stored once with a valid audit chain, SIGTERM
stops everything cleanly, and a SIGKILL of the supervisor takes the
workers with it (no orphan keeps the port or the database) without losing
an acknowledged message.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from random import Random

import pytest

from mssante import demo
from mssante.app import Gateway, Store
from tests.durability_harness import (
    _REF,
    SENDER,
    ServerProcess,
    SmtpConnection,
    client_tls,
    make_message,
    run_harness,
    verify_store,
    wire_data,
)
from tests.rawsmtp import RawSmtp

_WORKER = re.compile(r"worker (\d+) \(pid (\d+)\) listening")
_STORED = re.compile(r"INFO \[(\d+)\] mssante\.smtp stored ref=")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    for _ in range(int(timeout * 20)):
        if not any(_alive(p) for p in pids):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.slow
async def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    server = ServerProcess(data_dir, log, None if db_url.startswith("sqlite") else db_url, 2)
    rng = Random(11)
    sent = []
    try:
        port = await server.start()
        tls = client_tls(data_dir)
        workers = [int(pid) for _, pid in _WORKER.findall(log.read_text())]
        assert len(workers) == 2 and server.pid not in workers

        async def one(n: int) -> None:
            msg = make_message(rng, message_id=f"<w{n}@chu-exemple.test>", size=4000, cycle=0)
            conn = await SmtpConnection.open(port, tls)
            try:
                await conn.greet()
                await conn.expect(f"MAIL FROM:<{SENDER}>", 250)
                for rcpt in msg.recipients:
                    await conn.expect(f"RCPT TO:<{rcpt}>", 250)
                await conn.expect("DATA", 354)
                await conn.send(wire_data(msg.data))
                code, text = await conn.reply()
                assert code == 250, text
                m = _REF.search(text)
                assert m is not None, text
                msg.status, msg.ref = "acked", m.group(1)
                sent.append(msg)
            finally:
                await conn.close()

        # One new connection per message, 8 at a time.
        for start in range(0, 40, 8):
            await asyncio.gather(*(one(n) for n in range(start, start + 8)))
        assert await server.stop() == 0  # SIGTERM: supervisor and workers exit cleanly
        assert await _gone(workers)
    finally:
        await server.ensure_dead()

    pids = set(_STORED.findall(log.read_text()))
    # Both workers stored messages (40 connections hashed over two sockets).
    assert pids == {str(p) for p in workers}
    check = await verify_store(data_dir, sent, None if db_url.startswith("sqlite") else db_url)
    assert check.problems == []
    assert check.stored == 40


@pytest.mark.slow
async def test_sigkill_of_the_supervisor_takes_the_workers_and_loses_nothing(
    tmp_path: Path, db_url: str
) -> None:
    report = await run_harness(
        tmp_path,
        seed=4242,
        kills=2,
        clients=8,
        database_url=None if db_url.startswith("sqlite") else db_url,
        workers=2,
    )
    summary = report.summary()
    assert report.check.problems == [], summary + "\n" + "\n".join(report.check.problems)
    assert report.count("acked") >= 1, summary
    assert all(c.exit_code == -9 for c in report.cycles[:-1]), summary
    assert report.cycles[-1].exit_code == 0, summary
    # Every worker of every cycle is gone (PR_SET_PDEATHSIG), none orphaned.
    workers = [int(pid) for _, pid in _WORKER.findall((tmp_path / "server.log").read_text())]
    assert len(workers) == 2 * len(report.cycles), summary
    assert await _gone(workers)


async def test_another_process_opening_the_store_keeps_messages_being_received(
    gateway: Gateway,
) -> None:
    """Regression: a process starting on the same data directory (a second
    worker, ``mssante store check``...) removed the spool files of messages
    still being received, and their end of data got 451."""
    client = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    try:
        assert (await client.cmd("EHLO pro.example")).code == 250
        assert (await client.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.cmd(f"RCPT TO:<{demo.ACTIVATED}@patient.mssante.fr>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(b"From: <" + SENDER.encode() + b">\r\nSubject: en cours\r\n\r\n")
        await client.send((b"x" * 900 + b"\r\n") * 80)  # past the first encrypted segment
        for _ in range(100):
            if list((gateway.store.data_dir / "spool").rglob("*.tmp")):
                break
            await asyncio.sleep(0.02)
        other = Store(gateway.settings, worker=1)
        await other.open()
        await other.close()
        other = Store(gateway.settings)  # what a CLI command does
        await other.open()
        await other.close()
        await client.send(b"fin\r\n.\r\n")
        reply = await client.reply()
        assert reply.code == 250, reply
    finally:
        await client.close()
