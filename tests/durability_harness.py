"""Kill -9 durability harness: the server must never lose a message it acknowledged.

The real server runs as a subprocess (``python -m mssante serve --demo``) on
a temporary data directory, with its database there (SQLite, the default)
or at ``database_url`` (a PostgreSQL database the caller provides).  Several
client tasks send distinct messages over new connections (STARTTLS, as the
development trust-space operator), byte-exact (CRLF, dot-stuffing), and
record for each message its exact bytes and what the server answered:

- ``acked``: the ``250`` came back, with the ref it quotes;
- ``unknown``: the connection broke before the final reply (stored or not,
  both are fine), with ``end_sent`` telling whether the end of data was ever
  written to the socket (if not, the message must *not* be stored: a
  partial message must never become visible);
- ``refused``: any other final reply (the message must not be stored).

At a random moment, once transactions are in flight, the server gets
SIGKILL; the clients see their connections fail; the server is restarted on
the same data directory, and so on for several cycles.  A last calm cycle
checks that the restarted server accepts mail, then stops it cleanly, and
:func:`verify_store` opens the store in-process and checks that every
acknowledged message is there and byte-identical, that none is there twice,
that every stored message is one that was sent, that nothing half-written
is visible (blob readable, deliveries complete, spool empty) and that the
audit chain verifies.

Messages are only ever read through ``Store.read_original`` (blobs may be
encrypted at rest); the harness looks at file names and sizes, never at
file contents.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import IO, Literal

from sqlalchemy import select

from mssante import demo
from mssante.app import Store
from mssante.settings import Settings, StoreSettings
from mssante.store.audit import verify_chain
from mssante.store.models import AuditEvent, Delivery, Message

DOMAIN = "patient.mssante.fr"
SENDER = "dr.harness@chu-exemple.mssante.fr"
ACCEPTING = (demo.ACTIVATED, demo.CREATED_EMAIL, demo.CREATED_POSTAL, demo.CORSICAN)

START_TIMEOUT = 60.0  # server start (import, schema, dev certificate, demo seeding)
STOP_TIMEOUT = 30.0
REPLY_TIMEOUT = 60.0  # one SMTP reply while the server is alive
CLIENTS_TIMEOUT = 120.0  # all clients of a cycle, after the kill

_BANNER = re.compile(r"MX on 127\.0\.0\.1:(\d+)")
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)\r$", re.MULTILINE | re.IGNORECASE)
_REF = re.compile(r"\bref ([0-9A-Za-z_-]+)")
_STUFF = re.compile(rb"^\.", re.MULTILINE)
_PRINTABLE = bytes(32 + (i % 95) for i in range(256))  # random bytes -> printable ASCII

Status = Literal["unknown", "acked", "refused"]


class HarnessError(AssertionError):
    """The harness itself could not do its job (server did not start, hang, ...)."""


# --- messages ----------------------------------------------------------------------------


@dataclass
class SentMessage:
    message_id: str
    data: bytes  # the message exactly as it must be stored (unstuffed, CRLF)
    recipients: list[str]
    style: str
    cycle: int
    status: Status = "unknown"
    ref: str | None = None
    reply: str | None = None
    end_sent: bool = False  # the end of data was (at least partly) handed to the socket


def _text(rng: Random, n: int) -> bytes:
    return rng.randbytes(n).translate(_PRINTABLE)


def _lines_body(rng: Random, size: int) -> list[bytes]:
    """Printable lines of varied length, a few at the 998 limit, some dotted."""
    pool = _text(rng, size + 1000)
    lines: list[bytes] = []
    pos = total = 0
    while total < size:
        r = rng.random()
        n = 998 if r < 0.03 else rng.randint(0, 80) if r < 0.7 else rng.randint(80, 997)
        line = pool[pos % len(pool) : pos % len(pool) + n]
        pos += n
        if rng.random() < 0.05:
            line = b"." + line[:997]
        lines.append(line)
        total += len(line) + 2
    return lines


def _dotty_body(rng: Random, size: int) -> list[bytes]:
    """Many short lines, many starting with a dot (including lone '.' lines)."""
    pool = _text(rng, 4096)
    specials = [b".", b"..", b"...", b". ", b".\t.", b"", b" ."]
    starts = [rng.randint(0, len(pool) - 20) for _ in range(400)]
    shapes = [pool[i : i + rng.randint(0, 16)] for i in starts]
    shapes += [b"." + s for s in shapes[:200]] + specials * 10
    return rng.choices(shapes, k=max(1, size // 10))


def make_message(
    rng: Random, *, message_id: str, size: int, cycle: int, style: str | None = None
) -> SentMessage:
    """A distinct message of about ``size`` octets: text, dotty text or MIME with base64."""
    if rng.random() < 0.7:
        recipients = [rng.choice(ACCEPTING)]
    else:
        recipients = rng.sample(ACCEPTING, rng.randint(2, len(ACCEPTING)))
    rcpts = [f"{ins}@{DOMAIN}" for ins in recipients]
    style = style or rng.choice(("lines", "dotty", "mime"))
    headers = [
        b"From: Dr Harness <" + SENDER.encode() + b">",
        b"To: " + ", ".join(rcpts).encode(),
        b"Subject: durability " + message_id.encode(),
        b"Date: Mon, 23 Nov 2026 09:00:00 +0100",
        b"Message-ID: " + message_id.encode(),
        b"MIME-Version: 1.0",
    ]
    if style == "mime":
        boundary = b"=_harness_" + rng.randbytes(8).hex().encode()
        attachment = base64.encodebytes(rng.randbytes(max(1, size * 3 // 4))).replace(
            b"\n", b"\r\n"
        )
        headers.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
        body = (
            b"--" + boundary + b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            b"Bonjour,\r\n.ci-joint\r\n..\r\n.\r\n"
            b"--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="piece.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--" + boundary + b"--\r\n"
        )
    else:
        headers.append(b"Content-Type: text/plain; charset=us-ascii")
        lines = _lines_body(rng, size) if style == "lines" else _dotty_body(rng, size)
        body = b"\r\n".join(lines) + b"\r\n"
    data = b"\r\n".join(headers) + b"\r\n\r\n" + body
    return SentMessage(message_id, data, rcpts, style, cycle)


def wire_data(data: bytes) -> bytes:
    """DATA content on the wire: dot-stuffed, then the end mark (``data`` ends in CRLF)."""
    assert data.endswith(b"\r\n")
    return _STUFF.sub(b"..", data) + b".\r\n"


# --- a byte-exact SMTP client --------------------------------------------------------------


class SmtpConnection:
    """Minimal client: a reply only counts when its last line came whole (CRLF)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> SmtpConnection:
        """Connect; ``tls`` is used for STARTTLS when the server offers it."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), REPLY_TIMEOUT
        )
        return cls(reader, writer, tls)

    async def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if not raw.endswith(b"\r\n"):
                raise ConnectionError(f"connection closed mid-reply: {lines} {raw!r}")
            line = raw[:-2].decode("ascii", "replace")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)

    async def command(self, line: str) -> tuple[int, str]:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def expect(self, line: str, code: int) -> None:
        got, text = await self.command(line)
        if got != code:
            raise UnexpectedReplyError(f"{line!r} -> {got} {text}")

    async def greet(self) -> None:
        """Greeting, EHLO, and STARTTLS when offered (the trust space requires it)."""
        code, text = await self.reply()
        if code != 220:
            raise UnexpectedReplyError(f"greeting {code} {text}")
        code, text = await self.command("EHLO client.harness.test")
        if code != 250:
            raise UnexpectedReplyError(f"EHLO -> {code} {text}")
        if self.tls is not None and "STARTTLS" in text.upper().split("\n"):
            await self.expect("STARTTLS", 220)
            await asyncio.wait_for(
                self.writer.start_tls(self.tls, server_hostname="localhost"), REPLY_TIMEOUT
            )
            await self.expect("EHLO client.harness.test", 250)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def client_tls(data_dir: Path) -> ssl.SSLContext:
    """Client TLS as the development operator (``<data_dir>/tls/dev-operator.*``, made
    by the server at its first start), so the trust-space checks accept the sender.

    The server certificate is not verified: this harness tests storage.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    cert, key = data_dir / "tls" / "dev-operator.pem", data_dir / "tls" / "dev-operator.key"
    if cert.exists() and key.exists():
        context.load_cert_chain(cert, key)
    return context


class UnexpectedReplyError(Exception):
    """A reply the server should not give to a valid command."""


# Errors that mean "the server went away" (expected after SIGKILL).
CONNECTION_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError)


# --- the server process --------------------------------------------------------------------


class ServerProcess:
    """``mssante serve --demo`` on ``data_dir``, port 0, its log in ``log_path``.

    ``database_url``: the store's database (default: SQLite in ``data_dir``).
    """

    def __init__(
        self, data_dir: Path, log_path: Path, database_url: str | None = None, workers: int = 1
    ) -> None:
        self.workers = workers
        self.data_dir = data_dir
        self.log_path = log_path
        self.database_url = database_url
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self._log: IO[bytes] | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MSSANTE_STORE__DATA_DIR=str(self.data_dir),
            MSSANTE_SMTP__HOST="127.0.0.1",
            MSSANTE_SMTP__PORT="0",
            MSSANTE_SUBMISSION__PORT="0",
            MSSANTE_WEB__PORT="0",  # no fixed port: the webmail listens too
            MSSANTE_OPS__PORT="0",  # nor for the metrics endpoint
            # Every client is the same operator: the per-identity rate limit
            # (451 4.7.0) must not refuse the load, which checks storage.
            MSSANTE_LIMITS__MESSAGES_PER_MINUTE="1000000",
            MSSANTE_SMTP__WORKERS=str(self.workers),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["MSSANTE_STORE__DATABASE_URL"] = self.database_url
        else:
            env.pop("MSSANTE_STORE__DATABASE_URL", None)
        return env

    async def start(self) -> int:
        assert self.proc is None or self.proc.returncode is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _closed()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mssante",
            "serve",
            "--demo",
            env=self.env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        deadline = time.monotonic() + START_TIMEOUT
        port = None
        while port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"server did not print its address; log:\n{self.log_tail()}")
            try:
                line = await asyncio.wait_for(stdout.readline(), left)
            except TimeoutError:
                continue
            if not line:
                await self._reap(5)
                raise HarnessError(
                    f"server exited ({self.proc.returncode}) before listening; "
                    f"log:\n{self.log_tail()}"
                )
            m = _BANNER.search(line.decode("utf-8", "replace"))
            if m:
                port = int(m.group(1))
        self.port = port
        self._drain = asyncio.create_task(self._drain_stdout(stdout))
        return port

    async def _drain_stdout(self, stdout: asyncio.StreamReader) -> None:
        while await stdout.read(65536):
            pass

    def kill(self) -> None:
        """SIGKILL, at once."""
        assert self.proc is not None and self.proc.returncode is None
        os.kill(self.proc.pid, signal.SIGKILL)

    async def wait_killed(self) -> int:
        rc = await self._reap(STOP_TIMEOUT)
        if rc != -signal.SIGKILL:
            raise HarnessError(f"killed server exited with {rc}; log:\n{self.log_tail()}")
        return rc

    async def stop(self) -> int:
        """SIGTERM and wait; the clean shutdown must exit 0."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = await self._reap(STOP_TIMEOUT)
        if rc != 0:
            raise HarnessError(f"server stopped with {rc}; log:\n{self.log_tail()}")
        return rc

    async def ensure_dead(self) -> None:
        """For ``finally``: whatever happened, no process is left running."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            await self._reap(STOP_TIMEOUT)

    async def _reap(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), timeout)
            raise HarnessError(
                f"server did not exit in {timeout}s; log:\n{self.log_tail()}"
            ) from None
        finally:
            if self._drain is not None and self.proc.returncode is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._drain, 5)
                self._drain = None
            if self._log is not None and self.proc.returncode is not None:
                self._log.close()
                self._log = None
        return rc

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


# --- load ----------------------------------------------------------------------------------


@dataclass
class CycleReport:
    index: int
    kill_delay_ms: int | None = None  # None: the calm last cycle, no kill
    kill_when: str = ""  # what the kill waited for (see _kill_when_busy)
    inflight_at_kill: int = 0  # transactions between MAIL and the final reply
    awaiting_250_at_kill: int = 0  # end of data sent, final reply not received
    acked_before_kill: int = 0
    sent: int = 0
    acked: int = 0
    unknown: int = 0
    refused: int = 0
    spool_files_at_start: int = 0
    exit_code: int | None = None

    def line(self) -> str:
        kill = (
            f"kill ({self.kill_when}) at {self.kill_delay_ms} ms "
            f"(in flight {self.inflight_at_kill}, "
            f"awaiting 250 {self.awaiting_250_at_kill}, acked before {self.acked_before_kill})"
            if self.kill_delay_ms is not None
            else "clean stop"
        )
        return (
            f"cycle {self.index}: sent {self.sent}, acked {self.acked}, unknown {self.unknown}, "
            f"refused {self.refused}; {kill}; exit {self.exit_code}"
        )


class Load:
    """K client tasks sending messages until told to stop (or the server goes away)."""

    def __init__(
        self,
        *,
        port: int,
        rng: Random,
        cycle: int,
        clients: int,
        max_size: int,
        make_id: Callable[[], str],
        sink: list[SentMessage],
        tls: ssl.SSLContext | None = None,
        per_client: int | None = None,
    ) -> None:
        self.port = port
        self.tls = tls
        self.cycle = cycle
        self.max_size = max_size
        self.make_id = make_id
        self.sink = sink
        self.per_client = per_client
        self.stop = asyncio.Event()
        self.inflight = 0
        self.awaiting_250 = 0
        self.acked = 0
        self.errors: list[str] = []
        self._rngs = [Random(rng.getrandbits(64)) for _ in range(clients)]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client(r)) for r in self._rngs]

    async def wait(self, timeout: float) -> None:
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        if pending:
            raise HarnessError(f"{len(pending)} client(s) still running after {timeout}s")
        for task in done:
            task.result()

    async def _client(self, rng: Random) -> None:
        sent = 0
        while not self.stop.is_set():
            if self.per_client is not None and sent >= self.per_client:
                return
            # TimeoutError is an OSError: caught first, a hang is not a kill.
            try:
                conn = await SmtpConnection.open(self.port, self.tls)
            except TimeoutError as exc:
                self.errors.append(f"connect: {type(exc).__name__}: {exc}")
                return
            except CONNECTION_ERRORS:
                return  # the server is gone
            try:
                await self._session(conn, rng, rng.randint(1, 3))
            except (TimeoutError, UnexpectedReplyError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc!r}")
                return
            except CONNECTION_ERRORS:
                return  # the server is gone: the current message stays "unknown"
            finally:
                await conn.close()
            sent += 1

    async def _session(self, conn: SmtpConnection, rng: Random, count: int) -> None:
        await conn.greet()
        for _ in range(count):
            if self.stop.is_set():
                break
            size = rng.randint(1024, self.max_size)
            msg = make_message(rng, message_id=self.make_id(), size=size, cycle=self.cycle)
            self.sink.append(msg)
            self.inflight += 1
            try:
                await self._transaction(conn, rng, msg)
            finally:
                self.inflight -= 1
        with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
            await conn.command("QUIT")

    async def _transaction(self, conn: SmtpConnection, rng: Random, msg: SentMessage) -> None:
        size = f" SIZE={len(msg.data)}" if rng.random() < 0.5 else ""
        await conn.expect(f"MAIL FROM:<{SENDER}>{size}", 250)
        for rcpt in msg.recipients:
            await conn.expect(f"RCPT TO:<{rcpt}>", 250)
        await conn.expect("DATA", 354)
        wire = wire_data(msg.data)
        # Sometimes in several writes, so a kill can fall in the middle of DATA.
        cut = rng.randint(0, len(wire) - 1) if rng.random() < 0.5 else 0
        if cut:
            await conn.send(wire[:cut])
        msg.end_sent = True
        self.awaiting_250 += 1
        try:
            await conn.send(wire[cut:])
            code, text = await conn.reply()
        finally:
            self.awaiting_250 -= 1
        msg.reply = f"{code} {text}"
        if code == 250:
            m = _REF.search(text)
            if m is None:
                raise UnexpectedReplyError(f"250 without a ref: {text}")
            msg.status, msg.ref = "acked", m.group(1)
            self.acked += 1
        else:
            msg.status = "refused"


# --- checks --------------------------------------------------------------------------------


@dataclass
class StoreCheck:
    problems: list[str] = field(default_factory=list)
    stored: int = 0
    stored_unknown: int = 0
    deliveries: int = 0
    audit_events: int = 0
    orphan_blobs: int = 0


def spool_files(data_dir: Path) -> list[Path]:
    spool = data_dir / "spool"
    return sorted(spool.rglob("*.tmp")) if spool.exists() else []


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


async def verify_store(
    data_dir: Path, messages: list[SentMessage], database_url: str | None = None
) -> StoreCheck:
    """Open the store in-process (server stopped) and check it against what was sent.

    ``database_url`` must be the one the server used (default: SQLite in ``data_dir``).
    """
    check = StoreCheck()
    problems = check.problems
    leftovers = spool_files(data_dir)  # a clean stop leaves no spool file
    if leftovers:
        problems.append(f"spool not empty after a clean stop: {[p.name for p in leftovers]}")
    by_id = {m.message_id: m for m in messages}
    if len(by_id) != len(messages):
        raise HarnessError("the harness sent two messages with the same Message-ID")

    store = Store(Settings(store=StoreSettings(data_dir=data_dir, database_url=database_url)))
    await store.open()
    try:
        async with store.reads() as session:
            rows = (await session.execute(select(Message.id, Message.ref))).all()
            deliveries = (
                await session.execute(select(Delivery.id, Delivery.message_id, Delivery.rcpt))
            ).all()
            events = list(await session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        check.stored, check.deliveries, check.audit_events = len(rows), len(deliveries), len(events)

        # 2. refs unique
        for ref, n in Counter(r.ref for r in rows).items():
            if n > 1:
                problems.append(f"ref {ref} stored {n} times")

        # 4. deliveries point to messages; each message has all its recipients
        rcpts_of: dict[int, list[str]] = {}
        row_ids = {r.id for r in rows}
        for d in deliveries:
            if d.message_id not in row_ids:
                problems.append(f"delivery {d.id} points to missing message {d.message_id}")
            rcpts_of.setdefault(d.message_id, []).append(d.rcpt)

        # 1-4. every row reads fully, is a message we sent, byte-identical, once
        seen: dict[str, str] = {}
        stored_refs: set[str] = set()
        for row in rows:
            stored_refs.add(row.ref)
            try:
                data = await store.read_original(row.ref)
            except Exception as exc:
                problems.append(f"ref {row.ref}: unreadable: {type(exc).__name__}: {exc}")
                continue
            header = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
            m = _MESSAGE_ID.search(header)
            sent = by_id.get(m.group(1).decode()) if m else None
            if sent is None:
                problems.append(
                    f"ref {row.ref}: {len(data)} octets that match no message sent "
                    f"(Message-ID {m.group(1) if m else None!r}): partial or foreign"
                )
                continue
            if sent.message_id in seen:
                problems.append(
                    f"{sent.message_id} stored twice: refs {seen[sent.message_id]} and {row.ref}"
                )
            seen[sent.message_id] = row.ref
            if data != sent.data:
                problems.append(
                    f"ref {row.ref} ({sent.message_id}, {sent.status}): not byte-identical: "
                    f"{len(data)} octets stored, {len(sent.data)} sent, first difference at "
                    f"{_first_difference(data, sent.data)}"
                )
            if sent.status == "acked" and sent.ref != row.ref:
                problems.append(f"{sent.message_id} acked as {sent.ref} but stored as {row.ref}")
            if sent.status == "refused":
                problems.append(f"{sent.message_id} stored as {row.ref} but refused: {sent.reply}")
            if sent.status == "unknown":
                check.stored_unknown += 1
                if not sent.end_sent:
                    problems.append(
                        f"{sent.message_id} stored as {row.ref} although its end of data "
                        "was never sent"
                    )
            got = sorted(rcpts_of.get(row.id, []))
            if got != sorted(sent.recipients):
                problems.append(
                    f"ref {row.ref}: deliveries to {got}, recipients were {sorted(sent.recipients)}"
                )

        # 1. nothing acknowledged is missing
        for msg in messages:
            if msg.status == "acked" and msg.ref not in stored_refs:
                problems.append(
                    f"LOST: {msg.message_id} acknowledged as ref {msg.ref} "
                    f"(cycle {msg.cycle}) is not in the store"
                )

        # 5. the audit chain
        problems.extend(f"audit: {p}" for p in verify_chain(events))
    finally:
        await store.close()

    blob_dir = data_dir / "blobs"
    if blob_dir.exists():
        files = sum(1 for p in blob_dir.rglob("*") if p.is_file())
        check.orphan_blobs = max(0, files - check.stored)
    return check


# --- the harness ---------------------------------------------------------------------------


@dataclass
class RunReport:
    seed: int
    cycles: list[CycleReport]
    messages: list[SentMessage]
    check: StoreCheck
    seconds: float

    def count(self, status: Status) -> int:
        return sum(1 for m in self.messages if m.status == status)

    @property
    def kills(self) -> int:
        return sum(1 for c in self.cycles if c.kill_delay_ms is not None)

    @property
    def kills_in_flight(self) -> int:
        return sum(1 for c in self.cycles if c.kill_delay_ms is not None and c.inflight_at_kill)

    def summary(self) -> str:
        c = self.check
        head = (
            f"seed {self.seed}: {len(self.messages)} messages, {self.count('acked')} acked, "
            f"{self.count('unknown')} unknown ({c.stored_unknown} of them stored), "
            f"{self.count('refused')} refused; {self.kills} kills "
            f"({self.kills_in_flight} with transactions in flight); stored {c.stored}, "
            f"deliveries {c.deliveries}, audit events {c.audit_events}, "
            f"orphan blobs {c.orphan_blobs}; {self.seconds:.1f} s"
        )
        return "\n".join([head, *(f"  {cy.line()}" for cy in self.cycles)])


async def _kill_when_busy(
    server: ServerProcess, load: Load, report: CycleReport, delay: float, *, wait_for: str
) -> None:
    """SIGKILL ``delay`` s after the load started, at the next moment of ``wait_for``.

    ``wait_for`` is ``"in-flight"`` (a transaction between MAIL and its final
    reply), ``"storing"`` (a message whose end of data was sent and whose
    250 has not come: the server is persisting it) or ``"ack"`` (at least one
    message acknowledged in this cycle, and one in flight).  The wait is
    bounded: the kill happens anyway after 10 s and the report says what
    was in flight.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    report.kill_when = wait_for
    await asyncio.sleep(delay)

    def ready() -> bool:
        if wait_for == "storing":
            return load.awaiting_250 > 0
        if wait_for == "ack":
            return load.acked > 0 and load.inflight > 0
        return load.inflight > 0

    deadline = loop.time() + 10
    while not ready() and loop.time() < deadline and not all(t.done() for t in load.tasks):
        await asyncio.sleep(0.001)
    report.kill_delay_ms = round((loop.time() - t0) * 1000)
    report.inflight_at_kill = load.inflight
    report.awaiting_250_at_kill = load.awaiting_250
    report.acked_before_kill = load.acked
    server.kill()
    load.stop.set()


def _tally(report: CycleReport, messages: list[SentMessage]) -> None:
    mine = [m for m in messages if m.cycle == report.index]
    report.sent = len(mine)
    report.acked = sum(1 for m in mine if m.status == "acked")
    report.unknown = sum(1 for m in mine if m.status == "unknown")
    report.refused = sum(1 for m in mine if m.status == "refused")


async def run_harness(
    tmp: Path,
    *,
    seed: int,
    kills: int = 3,
    clients: int = 8,
    max_size: int = 300 * 1024,
    kill_after: tuple[float, float] = (0.05, 1.2),
    calm_per_client: int = 1,
    database_url: str | None = None,
    workers: int = 1,
) -> RunReport:
    """Load, SIGKILL and restart ``kills`` times, then a calm cycle, then check the store.

    The data directory is ``tmp / "data"``; the database is ``database_url``
    (default: SQLite in the data directory).
    """
    started = time.monotonic()
    rng = Random(seed)
    data_dir = tmp / "data"
    server = ServerProcess(data_dir, tmp / "server.log", database_url, workers)
    messages: list[SentMessage] = []
    cycles: list[CycleReport] = []
    serial = iter(range(1, 1 << 30))

    def make_id() -> str:
        return f"<harness.{seed}.{next(serial)}.{rng.getrandbits(48):012x}@chu-exemple.test>"

    try:
        for index in range(kills + 1):
            report = CycleReport(index)
            cycles.append(report)
            port = await server.start()
            # The server removed what a crash left in the spool before listening.
            report.spool_files_at_start = len(spool_files(data_dir))
            calm = index == kills
            load = Load(
                port=port,
                rng=rng,
                cycle=index,
                clients=clients,
                max_size=max_size,
                make_id=make_id,
                sink=messages,
                tls=client_tls(data_dir),
                per_client=calm_per_client if calm else None,
            )
            load.start()
            if calm:
                await load.wait(CLIENTS_TIMEOUT)
                report.exit_code = await server.stop()
            else:
                # Random moments, some of them while a message is being
                # persisted; the last kill waits for an acknowledgement if
                # none came yet, so a run cannot pass without one.
                wait_for = rng.choice(("in-flight", "storing"))
                if index == kills - 1 and not any(m.status == "acked" for m in messages):
                    wait_for = "ack"
                killer = asyncio.create_task(
                    _kill_when_busy(
                        server, load, report, rng.uniform(*kill_after), wait_for=wait_for
                    )
                )
                try:
                    await asyncio.wait_for(asyncio.shield(killer), CLIENTS_TIMEOUT)
                    await load.wait(CLIENTS_TIMEOUT)
                finally:
                    killer.cancel()
                report.exit_code = await server.wait_killed()
            _tally(report, messages)
            if load.errors:
                raise HarnessError(
                    f"cycle {index}: client errors while the server was alive: {load.errors[:5]}"
                    f"\nlog:\n{server.log_tail()}"
                )
    finally:
        await server.ensure_dead()
    check = await verify_store(data_dir, messages, database_url)
    for c in cycles:
        if c.kill_delay_ms is None and (c.unknown or c.refused or not c.acked):
            check.problems.append(
                f"cycle {c.index} (no kill): {c.acked} acked, {c.unknown} unknown, "
                f"{c.refused} refused: the restarted server must accept every message"
            )
        if c.spool_files_at_start:
            check.problems.append(
                f"cycle {c.index}: {c.spool_files_at_start} spool file(s) left after restart"
            )
    return RunReport(seed, cycles, messages, check, time.monotonic() - started)


# --- one large message killed in DATA ------------------------------------------------------


@dataclass
class LargeReport:
    spool_bytes_at_kill: int
    spool_files_after_restart: int
    resent_ref: str | None
    check: StoreCheck
    seconds: float


async def _wait_for_spool(data_dir: Path, at_least: int, timeout: float) -> int:
    """Size of the biggest spool file, once it reaches ``at_least`` octets."""
    deadline = time.monotonic() + timeout
    biggest = 0
    while time.monotonic() < deadline:
        sizes = []
        for p in spool_files(data_dir):
            with contextlib.suppress(OSError):
                sizes.append(p.stat().st_size)
        biggest = max(sizes, default=0)
        if biggest >= at_least:
            return biggest
        await asyncio.sleep(0.01)
    raise HarnessError(f"no spool file reached {at_least} octets in {timeout}s (max {biggest})")


async def send_whole(port: int, tls: ssl.SSLContext, msg: SentMessage) -> None:
    conn = await SmtpConnection.open(port, tls)
    try:
        await conn.greet()
        await conn.expect(f"MAIL FROM:<{SENDER}> SIZE={len(msg.data)}", 250)
        for rcpt in msg.recipients:
            await conn.expect(f"RCPT TO:<{rcpt}>", 250)
        await conn.expect("DATA", 354)
        msg.end_sent = True
        await conn.send(wire_data(msg.data))
        code, text = await conn.reply()
        msg.reply = f"{code} {text}"
        m = _REF.search(text)
        if code == 250 and m:
            msg.status, msg.ref = "acked", m.group(1)
        else:
            msg.status = "refused"
        await conn.command("QUIT")
    finally:
        await conn.close()


async def run_large_kill(
    tmp: Path, *, seed: int, size: int = 20_000_000, database_url: str | None = None
) -> LargeReport:
    """SIGKILL while a ``size``-octet message is in DATA, restart, resend, check."""
    started = time.monotonic()
    rng = Random(seed)
    data_dir = tmp / "data"
    server = ServerProcess(data_dir, tmp / "server.log", database_url)
    big = make_message(
        rng, message_id=f"<large.{seed}.1@chu-exemple.test>", size=size, cycle=0, style="mime"
    )
    again = make_message(
        rng, message_id=f"<large.{seed}.2@chu-exemple.test>", size=size, cycle=1, style="lines"
    )
    messages = [big, again]
    try:
        port = await server.start()
        conn = await SmtpConnection.open(port, client_tls(data_dir))
        try:
            await conn.greet()
            await conn.expect(f"MAIL FROM:<{SENDER}> SIZE={len(big.data)}", 250)
            for rcpt in big.recipients:
                await conn.expect(f"RCPT TO:<{rcpt}>", 250)
            await conn.expect("DATA", 354)
            wire = wire_data(big.data)
            half = len(wire) // 2
            for start in range(0, half, 256 * 1024):
                await conn.send(wire[start : min(half, start + 256 * 1024)])
            spooled = await _wait_for_spool(data_dir, len(wire) // 4, timeout=30)
            server.kill()
            await server.wait_killed()
            # The client sees the failure; the end of data is never sent.
            with contextlib.suppress(*CONNECTION_ERRORS):
                await conn.send(wire[half : len(wire) - 3])
                code, text = await conn.reply()
                raise HarnessError(f"a reply from a killed server: {code} {text}")
        finally:
            await conn.close()
        port = await server.start()
        after_restart = len(spool_files(data_dir))
        await send_whole(port, client_tls(data_dir), again)
        await server.stop()
    finally:
        await server.ensure_dead()
    check = await verify_store(data_dir, messages, database_url)
    return LargeReport(spooled, after_restart, again.ref, check, time.monotonic() - started)
