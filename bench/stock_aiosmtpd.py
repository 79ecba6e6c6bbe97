"""Baseline servers for bench/throughput.py.

Usage: ``stock_aiosmtpd.py PORT [--sqlite PATH] [--tls CERT KEY]``

- without ``--sqlite``: "stock aiosmtpd": aiosmtpd's own ``SMTP`` protocol
  (its line-by-line DATA loop, message held in memory) with a handler whose
  ``handle_DATA`` only answers ``250 OK``.  The floor cost of an aiosmtpd
  server on this machine.
- with ``--sqlite PATH``: "naive design": the same server, but ``handle_DATA``
  inserts the message into a SQLite database (WAL, ``synchronous=FULL``) and
  commits, one transaction per message, before answering ``250``.  A single
  worker thread owns the connection, so transactions are serialised and each
  one pays its own fsync: no group commit.

Both listen on 127.0.0.1, with a configured hostname (no DNS lookup) and a
25 MB ``data_size_limit`` like mssante.  aiosmtpd's logging is left at
Python's default (warnings only).  SIGTERM or SIGINT stops the server.

``--tls CERT KEY`` (PEM chain and key; bench/throughput.py gives the
development server certificate of the mssante data directory): STARTTLS is
offered through aiosmtpd's own ``tls_context`` and required before MAIL
(``require_starttls``), like mssante's MX.  The context mirrors mssante's
server settings (TLS 1.2 minimum, ECDHE+AEAD suites for TLS 1.2, no
compression nor renegotiation) but asks for no client certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

HOST = "127.0.0.1"
HOSTNAME = "mx.stock.localhost"
DATA_SIZE_LIMIT = 25_000_000


# The TLS 1.2 suites of mssante.smtp.tls.server_context (TLS 1.3 suites are OpenSSL's).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context like mssante's, without the client certificate request."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    return context


class StockHandler:
    """Accepts every recipient (aiosmtpd's default) and every message."""

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        return "250 OK"


class SqliteHandler:
    """Stores each message in its own committed SQLite transaction before 250."""

    def __init__(self, path: Path) -> None:
        # One thread, one connection: the commits are strictly one by one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._path = path
        self._db: sqlite3.Connection | None = None

    def _open(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS message ("
            " id INTEGER PRIMARY KEY,"
            " received_at REAL NOT NULL,"
            " mail_from TEXT NOT NULL,"
            " rcpt_tos TEXT NOT NULL,"
            " content BLOB NOT NULL)"
        )
        self._db = db

    def _insert(self, mail_from: str, rcpt_tos: str, content: bytes) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO message (received_at, mail_from, rcpt_tos, content)"
                " VALUES (?, ?, ?, ?)",
                (time.time(), mail_from, rcpt_tos, content),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def close(self) -> None:
        if self._db is not None:
            self._executor.submit(self._db.close).result()
        self._executor.shutdown()

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        await asyncio.get_running_loop().run_in_executor(
            self._executor,
            self._insert,
            envelope.mail_from or "",
            ",".join(envelope.rcpt_tos),
            bytes(content),
        )
        return "250 OK"


async def serve(port: int, sqlite_path: Path | None, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    handler: StockHandler | SqliteHandler
    if sqlite_path is None:
        handler = StockHandler()
    else:
        handler = SqliteHandler(sqlite_path)
        await handler.open()

    def protocol() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=DATA_SIZE_LIMIT,
            hostname=HOSTNAME,
            ident="stock-aiosmtpd ESMTP",
            tls_context=tls,
            require_starttls=tls is not None,
            loop=loop,
        )

    server = await loop.create_server(protocol, HOST, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {HOST}:{port}" + (" (STARTTLS)" if tls else ""), flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        if isinstance(handler, SqliteHandler):
            handler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--sqlite", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--tls", type=Path, nargs=2, default=None, metavar=("CERT", "KEY"), help="offer STARTTLS"
    )
    args = parser.parse_args()
    tls = tls_context(*args.tls) if args.tls else None
    asyncio.run(serve(args.port, args.sqlite, tls))


if __name__ == "__main__":
    main()
