"""Throughput benchmark of the SMTP gateway against two aiosmtpd baselines.

Run with ``./dev bench [options]`` (= ``.venv/bin/python bench/throughput.py``).
See BENCHMARKS.md for what is measured and the latest results.

Targets, all started here as subprocesses on 127.0.0.1 and a free port,
once per TLS mode (``--tls-modes off,on``):

- ``mssante``: the real server, ``python -m mssante serve --demo``, on a fresh
  temporary data directory; TLS off: plaintext (see MSSANTE_PLAINTEXT); TLS
  on: its defaults (STARTTLS and a trust-space operator certificate
  required); database SQLite in the data directory, or (``--database
  postgresql``) a database of a throwaway PostgreSQL cluster started here;
- ``stock``: stock aiosmtpd whose handler only answers 250 (bench/stock_aiosmtpd.py);
- ``naive``: the same, committing each message to SQLite (WAL,
  ``synchronous=FULL``) in its own transaction before 250.

With TLS on, the baselines offer (and require) STARTTLS with the same
development server certificate as mssante, and the client says EHLO,
STARTTLS, EHLO again before the transaction, presenting the development
operator certificate (as ``mssante send-test`` does).

Load: one new connection per message (greeting, EHLO, [STARTTLS, EHLO,]
MAIL, RCPT, DATA, message, QUIT), ``sessions`` concurrent loops, realistic
MIME messages with a PDF attachment.  For each cell (target x TLS mode x
size x sessions): a warm-up, then a measured run bounded by ``--seconds``
and ``--messages``.  Cells are run target after target and mode after mode
for each (size, sessions), so the ratios compare runs made minutes apart at
most.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import mssante, tests.pg

from mssante import demo  # noqa: E402
from mssante.settings import SmtpSettings  # noqa: E402
from mssante.smtp.tls import client_context, ensure_dev_certificate  # noqa: E402

HOST = "127.0.0.1"
SENDER = "dr.durand@chu-exemple.mssante.fr"
PATIENT_DOMAIN = "patient.mssante.fr"
# The demo patients whose profile accepts mail (activated or created).
PATIENTS = (demo.ACTIVATED, demo.CREATED_EMAIL, demo.CREATED_POSTAL, demo.CORSICAN)
EHLO_NAME = "smtp.chu-exemple.mssante.fr"
KB = 1000  # sizes are in kB (10^3 octets) of the message as sent, after dot-stuffing
REPLY_TIMEOUT = 60.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
MSGID_MARK = b"@@BENCH-MSGID@@"
MSGID_LEN = len("<mssante-200-50.1234.123456@chu-exemple.mssante.fr>")  # typical
# TLS off measures the plaintext path: mssante is told not to require
# STARTTLS nor a trust-space client certificate (both on by default).  TLS on
# sets neither (and removes them from the inherited environment): the client
# then presents the development operator certificate of the data dir
# (tls/dev-operator.pem, trusted through tls/dev-ca.pem, as `mssante
# send-test` does), whose subject the dev whitelist lists for SENDER's domain.
MSSANTE_PLAINTEXT = {
    "MSSANTE_SMTP__REQUIRE_TLS": "false",
    "MSSANTE_TRUST__REQUIRE_CLIENT_CERTIFICATE": "false",
}
# In every mode: the abuse limit of 120 messages per minute per peer identity
# (the certificate subject, else the IP address: here one identity for all
# sessions) would answer 451 4.7.0 after two seconds of load.  The limit
# check itself still runs for each MAIL.
MSSANTE_BENCH = {"MSSANTE_LIMITS__MESSAGES_PER_MINUTE": "100000000"}
TLS_MODES = ("off", "on")
DATABASES = ("sqlite", "postgresql")

# Wide enough for the results table when the output is a file or a pipe.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One message as DATA bytes, split around its Message-ID so each send is unique.

    ``head + msgid + body + END`` is what goes on the wire: CRLF line endings,
    dot-stuffed; ``body`` does not end with CRLF, ``END`` is the final
    ``<CRLF>.<CRLF>``.
    """

    recipient: str
    head: bytes
    body: bytes

    END = b"\r\n.\r\n"

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body) + MSGID_LEN + len(self.END)


def _message(recipient: str, pdf_size: int) -> bytes:
    pdf = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    pdf += os.urandom(max(pdf_size - len(pdf) - 6, 0))
    pdf += b"%%EOF\n"
    msg = EmailMessage()
    msg["From"] = f"Dr Alice Durand <{SENDER}>"
    msg["To"] = recipient
    msg["Subject"] = "Compte rendu de consultation"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = MSGID_MARK.decode()
    msg["X-MSS-NIL"] = "mssante-bench/0.1"
    msg.set_content(
        "Bonjour,\n\nVous trouverez ci-joint le compte rendu de votre consultation "
        "du 21 novembre et l'ordonnance correspondante.\n\n"
        "Bien cordialement,\nDr Alice Durand\nService de cardiologie, CHU Exemple\n"
    )
    msg.add_attachment(
        bytes(pdf), maintype="application", subtype="pdf", filename="compte-rendu.pdf"
    )
    return msg.as_bytes(policy=SMTP_POLICY)


def dot_stuff(raw: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with a dot gets one more."""
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def build_payload(recipient: str, size: int) -> Payload:
    """A message of about ``size`` octets on the wire (text part + base64 PDF)."""
    pdf_size = max(size * 3 // 4, 1000)
    for _ in range(6):  # base64 and MIME overhead: converge on the wanted size
        raw = _message(recipient, pdf_size)
        if abs(len(raw) - size) < 64:
            break
        pdf_size = max(pdf_size + (size - len(raw)) * 57 // 78, 100)
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF in message"
    wire = dot_stuff(raw.removesuffix(b"\r\n"))
    head, mark, body = wire.partition(MSGID_MARK)
    assert mark, "Message-ID placeholder not found"
    return Payload(recipient, head, body)


# --- SMTP client ----------------------------------------------------------------------


class SmtpFailure(Exception):
    """A reply the client did not expect (its code and first line are the error kind)."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage = stage
        self.code = code
        self.text = text


@dataclass
class ClientConfig:
    host: str
    port: int
    # With a context, the client sends STARTTLS after EHLO and says EHLO again.
    tls: ssl.SSLContext | None = None
    tls_server_name: str | None = None


def tls_client_config(host: str, port: int, tls_dir: Path) -> ClientConfig:
    """STARTTLS trusting the development CA, presenting the development operator."""
    context = client_context(
        tls_dir / "dev-ca.pem", tls_dir / "dev-operator.pem", tls_dir / "dev-operator.key"
    )
    # The dev server certificate names 127.0.0.1 (and localhost): checked as such.
    return ClientConfig(host, port, tls=context, tls_server_name=host)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    first = ""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        text = line.decode("ascii", "replace").rstrip("\r\n")
        first = first or text[4:]
        if text[3:4] != "-":
            return int(text[:3]), first


async def _expect(reader: asyncio.StreamReader, stage: str, want: int) -> None:
    code, text = await _reply(reader)
    if code != want:
        raise SmtpFailure(stage, code, text)


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stage: str, line: str, want: int
) -> None:
    writer.write(line.encode("ascii") + b"\r\n")
    await _expect(reader, stage, want)


@dataclass
class Timing:
    time_to_250: float  # final <CRLF>.<CRLF> written -> 250 reply read
    transaction: float  # connect -> QUIT answered and socket closed


async def transaction(
    config: ClientConfig, payload: Payload, msgid: bytes, tls_info: list[str] | None = None
) -> Timing:
    """One message on one new connection.  Raises on any failure.

    Commands are sent one at a time (no PIPELINING), like a plain client.
    With TLS, ``tls_info`` (if given) receives the negotiated version and cipher.
    """
    stage = ["connect"]  # for exceptions that are not replies
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            reader, writer = await asyncio.open_connection(config.host, config.port)
        try:
            # drain() then waits until every byte is in the kernel: the time of
            # the end mark below is the time it was really sent.
            raw = writer.transport
            raw.set_write_buffer_limits(high=0)
            async with asyncio.timeout(REPLY_TIMEOUT):
                stage[0] = "greeting"
                await _expect(reader, "greeting", 220)
                stage[0] = "EHLO"
                await _command(reader, writer, "EHLO", f"EHLO {EHLO_NAME}", 250)
                if config.tls is not None:
                    stage[0] = "STARTTLS"
                    await _command(reader, writer, "STARTTLS", "STARTTLS", 220)
                    await writer.start_tls(config.tls, server_hostname=config.tls_server_name)
                    # The TLS transport has its own buffer: drain() must wait for it
                    # too.  high=1, not 0: asyncio's SSL flow control pauses at
                    # size >= high, so 0 would pause an empty buffer for good.
                    writer.transport.set_write_buffer_limits(high=1, low=0)
                    if tls_info is not None:
                        ssl_object = writer.get_extra_info("ssl_object")
                        tls_info += [str(ssl_object.version()), str(ssl_object.cipher()[0])]
                    stage[0] = "EHLO after STARTTLS"
                    await _command(reader, writer, "EHLO after STARTTLS", f"EHLO {EHLO_NAME}", 250)
                stage[0] = "MAIL"
                await _command(
                    reader, writer, "MAIL", f"MAIL FROM:<{SENDER}> SIZE={payload.size}", 250
                )
                stage[0] = "RCPT"
                await _command(reader, writer, "RCPT", f"RCPT TO:<{payload.recipient}>", 250)
                stage[0] = "DATA"
                await _command(reader, writer, "DATA", "DATA", 354)
                stage[0] = "message"
                writer.write(payload.head)
                writer.write(msgid)
                writer.write(payload.body)
                await writer.drain()
                # With TLS, drain() returns once the records are handed to the
                # socket transport, which may still hold the last ones.
                while raw.get_write_buffer_size():
                    await asyncio.sleep(0.0002)
                writer.write(Payload.END)  # buffers empty: sent at once
                t_end = time.perf_counter()
                stage[0] = "end of data"
                await _expect(reader, "end of data", 250)
                t_250 = time.perf_counter()
                stage[0] = "QUIT"
                await _command(reader, writer, "QUIT", "QUIT", 221)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    except SmtpFailure:
        raise
    except TimeoutError as exc:
        raise SmtpFailure(stage[0], 0, "client timeout") from exc
    except Exception as exc:
        raise SmtpFailure(stage[0], 0, type(exc).__name__) from exc
    return Timing(t_250 - t_end, time.perf_counter() - t0)


# --- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


CLK_TCK = os.sysconf("SC_CLK_TCK")


class Server:
    """A server subprocess: started, probed until it delivers, stopped for sure."""

    def __init__(
        self,
        target: str,
        tls: bool,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        client: ClientConfig,
    ) -> None:
        self.target = target
        self.tls = tls
        self.name = f"{target}+tls" if tls else target  # for messages and log files
        self.argv = argv
        self.env = env
        self.log = log
        self.port = int(env["BENCH_PORT"])
        self.client = client
        self.negotiated = ""  # TLS version and cipher seen by the probe
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches only us, and we
                # stop the servers in order (SIGTERM, then SIGKILL).
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            console.print(
                f"[yellow]{self.name}: no exit {STOP_TIMEOUT:.0f} s after SIGTERM, SIGKILL"
            )
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            console.print(f"[yellow]{self.name}: exit status {proc.returncode} after SIGTERM")

    async def wait_ready(self, probe: Payload) -> None:
        """Until the port accepts and a probe message gets its 250 (demo data seeded)."""
        deadline = time.monotonic() + START_TIMEOUT
        last = "no connection yet"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            try:
                info: list[str] = []
                await transaction(self.client, probe, b"<probe@bench.invalid>", info)
                self.negotiated = " ".join(info)
                return
            except SmtpFailure as exc:
                last = str(exc)
                # Not listening yet, or the demo patients not seeded yet
                # (550 at RCPT): try again.  Anything else is a broken server.
                if exc.stage not in ("connect", "greeting", "RCPT"):
                    raise RuntimeError(
                        f"{self.name}: probe message failed: {exc}\n{self.log_tail()}"
                    ) from exc
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT:.0f} s ({last})")

    def cpu_seconds(self) -> float:
        """utime + stime of the server and its worker processes (all threads), from /proc."""
        return process_tree_cpu_seconds(self.pid)

    def _pids(self) -> list[int]:
        """The server and its direct children (``serve`` with several workers)."""
        pids = [self.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rpartition(")")[2].split()[1]) == self.pid:
                    pids.append(int(stat.parent.name))
        return pids

    def peak_rss_mb(self) -> float:
        """Sum of the peak RSS (VmHWM) of the server's processes."""
        total = 0
        for pid in self._pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        return total / 1024 if total else float("nan")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
        try:
            for pid in self._pids():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_levels(self) -> Counter[str]:
        """Lines per level in the server log (mssante's logging format)."""
        counts: Counter[str] = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.match(r"\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
            if m:
                counts[m.group(1)] += 1
            elif line.startswith("Traceback"):
                counts["Traceback"] += 1
        return counts


def mssante_data_dir(tmp: Path, tls: bool) -> Path:
    return tmp / ("mssante-tls-data" if tls else "mssante-data")


def prepare_tls(tmp: Path) -> Path:
    """The development CA, server and operator certificates of the TLS mssante.

    Made here with mssante's own function before any server starts, so the
    baselines can use the server certificate too; mssante finds them at start
    and uses them as if it had made them.  Returns the ``tls`` directory.
    """
    tls_dir = mssante_data_dir(tmp, True) / "tls"
    ensure_dev_certificate(tls_dir, SmtpSettings().hostname)
    return tls_dir


def make_server(
    target: str, tls: bool, tmp: Path, *, database_url: str | None = None, workers: int = 1
) -> Server:
    port = free_port()
    env = dict(os.environ)
    env["BENCH_PORT"] = str(port)
    env["PYTHONUNBUFFERED"] = "1"
    name = f"{target}+tls" if tls else target
    log = tmp / f"{name}.log"
    python = sys.executable
    stock = [python, str(REPO / "bench" / "stock_aiosmtpd.py"), str(port)]
    tls_dir = mssante_data_dir(tmp, True) / "tls"
    if tls and target != "mssante":
        stock += ["--tls", str(tls_dir / "dev-server.pem"), str(tls_dir / "dev-server.key")]
    if target == "mssante":
        env |= {
            "MSSANTE_STORE__DATA_DIR": str(mssante_data_dir(tmp, tls)),
            "MSSANTE_SMTP__HOST": HOST,
            "MSSANTE_SMTP__PORT": str(port),
            "MSSANTE_SUBMISSION__PORT": "0",
            "MSSANTE_WEB__ENABLED": "false",  # SMTP only; bench/webmail.py measures the webmail
            "MSSANTE_OPS__PORT": "0",  # metrics served (and recorded) as in production
            "MSSANTE_SMTP__WORKERS": str(workers),
            **MSSANTE_BENCH,
        }
        if tls:
            for key in MSSANTE_PLAINTEXT:
                env.pop(key, None)
        else:
            env |= MSSANTE_PLAINTEXT
        if database_url is not None:
            env["MSSANTE_STORE__DATABASE_URL"] = database_url
        argv = [python, "-m", "mssante", "serve", "--demo"]
    elif target == "stock":
        argv = stock
    elif target == "naive":
        db = tmp / f"{name}-db" / "naive.db"
        db.parent.mkdir()
        argv = [*stock, "--sqlite", str(db)]
    else:
        raise ValueError(target)
    client = tls_client_config(HOST, port, tls_dir) if tls else ClientConfig(HOST, port)
    return Server(target, tls, argv, env, log, client)


# --- load -----------------------------------------------------------------------------


@dataclass
class CellResult:
    target: str
    tls: bool
    size_kb: int
    sessions: int
    messages: int = 0
    elapsed: float = 0.0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    warmup_errors: dict[str, int] = field(default_factory=dict)  # not in "errors"
    msgs_per_s: float = 0.0
    t250_p50_ms: float = float("nan")
    t250_p99_ms: float = float("nan")
    txn_p50_ms: float = float("nan")
    txn_p99_ms: float = float("nan")
    server_cpu_s_per_msg: float = float("nan")
    # PostgreSQL only, mssante cells: CPU of the whole cluster (postmaster and
    # every backend) over the measured run, per message: work the server
    # process no longer does itself.
    db_cpu_s_per_msg: float = float("nan")
    server_peak_rss_mb: float = float("nan")
    peak_rss_since_start: bool = False
    client_cpu_frac: float = float("nan")
    load: str = "asyncio"  # what made the load: asyncio client or smtp-source
    note: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class _Load:
    timings: list[Timing] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    started: int = 0


async def run_load(
    config: ClientConfig,
    payloads: Sequence[Payload],
    sessions: int,
    *,
    seconds: float,
    messages: int,
    tag: str,
) -> tuple[_Load, float]:
    """``sessions`` loops of one-message transactions until a budget is spent.

    A loop takes a ticket before each transaction, so at most ``messages``
    are sent; none starts after ``seconds``; those under way are finished.
    Returns the outcome and the wall time from start to the last completion.
    """
    load = _Load()
    deadline = time.perf_counter() + seconds
    rotation = itertools.cycle(payloads)

    async def loop() -> None:
        while load.started < messages and time.perf_counter() < deadline:
            n = load.started
            load.started += 1
            payload = next(rotation)
            msgid = f"<{tag}.{n}.{os.getpid()}@chu-exemple.mssante.fr>".encode()
            try:
                load.timings.append(await transaction(config, payload, msgid))
            except SmtpFailure as exc:
                kind = f"{exc.code} {exc.text}" if exc.code else exc.text
                load.errors[f"{exc.stage}: {kind}"] += 1
                await asyncio.sleep(0.01)  # a dead server must not make a busy loop

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(sessions)))
    return load, time.perf_counter() - t0


SMTP_SOURCE = shutil.which("smtp-source") or (
    "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None
)
_COUNTER = re.compile(rb"(\d+)\s*$")


def smtp_source_file(tmp: Path, payload: Payload) -> Path:
    """The message for ``smtp-source -F``: LF line ends, not dot-stuffed (it does both)."""
    wire = payload.head + b"<smtp-source@chu-exemple.mssante.fr>" + payload.body
    raw = wire.replace(b"\r\n..", b"\r\n.")
    raw = raw[1:] if raw.startswith(b"..") else raw
    path = tmp / f"smtp-source-{payload.size}.eml"
    path.write_bytes(raw.replace(b"\r\n", b"\n") + b"\n")
    return path


async def run_smtp_source(
    config: ClientConfig,
    message: Path,
    recipient: str,
    sessions: int,
    *,
    seconds: float,
    messages: int,
) -> tuple[int, float, str]:
    """Postfix's smtp-source (C, one new connection per message, no TLS) as the load.

    Returns messages completed (its -c counter: DATA answered 250), the
    wall time until the last one, and what it wrote on stderr.
    """
    assert SMTP_SOURCE is not None
    argv = [
        SMTP_SOURCE,
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-M",
        EHLO_NAME,
        "-f",
        SENDER,
        "-t",
        recipient,
        "-F",
        str(message),
        f"{config.host}:{config.port}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    t0 = time.perf_counter()
    deadline = t0 + seconds
    count, t_last, tail = 0, t0, b""
    stderr_task = asyncio.create_task(proc.stderr.read())
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        try:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), left)
        except TimeoutError:
            break
        if not chunk:
            break
        tail = (tail + chunk)[-64:]
        m = _COUNTER.search(tail.replace(b"\r", b" "))
        if m and int(m.group(1)) > count:
            count, t_last = int(m.group(1)), time.perf_counter()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    await proc.wait()
    stderr = (await stderr_task).decode(errors="replace").strip()
    return count, t_last - t0, stderr


async def run_probe(
    config: ClientConfig, payloads: Sequence[Payload], stop: asyncio.Event, tag: str
) -> _Load:
    """One message at a time while another load runs: its time-to-250 under that load."""
    load = _Load()
    rotation = itertools.cycle(payloads)
    while not stop.is_set():
        n = load.started
        load.started += 1
        msgid = f"<{tag}.{n}.{os.getpid()}@chu-exemple.mssante.fr>".encode()
        try:
            load.timings.append(await transaction(config, next(rotation), msgid))
        except SmtpFailure as exc:
            load.errors[f"probe {exc.stage}: {exc.code} {exc.text}"] += 1
            await asyncio.sleep(0.05)
    return load


async def run_paced(
    config: ClientConfig,
    payloads: Sequence[Payload],
    rate: float,
    *,
    seconds: float,
    tag: str,
) -> tuple[_Load, float]:
    """Open-loop load: a new connection every 1/rate s whatever the replies (at most 1,000
    under way), so the time-to-250 measures the server at that rate."""
    load = _Load()
    rotation = itertools.cycle(payloads)
    running: set[asyncio.Task[None]] = set()

    async def one(n: int, payload: Payload) -> None:
        msgid = f"<{tag}.{n}.{os.getpid()}@chu-exemple.mssante.fr>".encode()
        try:
            load.timings.append(await transaction(config, payload, msgid))
        except SmtpFailure as exc:
            kind = f"{exc.code} {exc.text}" if exc.code else exc.text
            load.errors[f"{exc.stage}: {kind}"] += 1

    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        due = t0 + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(running) < 1000:
            task = asyncio.create_task(one(n, next(rotation)))
            running.add(task)
            task.add_done_callback(running.discard)
            load.started += 1
        else:
            load.errors["client: 1,000 under way, arrival skipped"] += 1
        n += 1
    if running:
        await asyncio.wait(running)
    return load, time.perf_counter() - t0


def use_smtp_source(args: argparse.Namespace, server: Server) -> bool:
    return args.load != "asyncio" and SMTP_SOURCE is not None and not server.tls


async def run_cell(
    server: Server,
    payloads: Sequence[Payload],
    size_kb: int,
    sessions: int,
    args: argparse.Namespace,
    db_cpu: Callable[[], float] | None = None,
) -> CellResult:
    result = CellResult(server.target, server.tls, size_kb, sessions)
    if not server.alive():
        result.note = "server not running"
        return result
    config = server.client
    tag = f"{server.name}-{size_kb}-{sessions}"
    if args.warmup > 0:
        warm, _ = await run_load(
            config, payloads, sessions, seconds=args.warmup, messages=10**9, tag=f"w{tag}"
        )
        result.warmup_errors = dict(warm.errors)
    rss_reset = server.reset_peak_rss()
    cpu0 = server.cpu_seconds()
    db0 = db_cpu() if db_cpu else 0.0
    client0 = time.process_time()
    if use_smtp_source(args, server):
        # The load is smtp-source; one asyncio session beside it measures
        # time-to-250 under that load (its messages count in msgs/s too).
        result.load = "smtp-source"
        stop = asyncio.Event()
        probe = asyncio.create_task(run_probe(config, payloads, stop, tag))
        count, elapsed, stderr = await run_smtp_source(
            config,
            smtp_source_file(args.tmp, payloads[0]),
            payloads[0].recipient,
            sessions,
            seconds=args.seconds,
            messages=args.messages,
        )
        stop.set()
        load = await probe
        if stderr:
            load.errors[f"smtp-source: {stderr.splitlines()[-1][:120]}"] += 1
        sourced = count
    else:
        load, elapsed = await run_load(
            config, payloads, sessions, seconds=args.seconds, messages=args.messages, tag=tag
        )
        sourced = 0
    client_cpu = time.process_time() - client0
    done = len(load.timings) + sourced
    if db_cpu is not None and done:
        result.db_cpu_s_per_msg = (db_cpu() - db0) / done
    if not server.alive():
        result.note = "server died during the cell"
    else:
        cpu = server.cpu_seconds() - cpu0
        result.server_peak_rss_mb = server.peak_rss_mb()
        result.peak_rss_since_start = not rss_reset
        if done:
            result.server_cpu_s_per_msg = cpu / done
    result.messages = done
    result.elapsed = elapsed
    result.errors = sum(load.errors.values())
    result.error_kinds = dict(load.errors)
    result.msgs_per_s = result.messages / elapsed if elapsed > 0 else 0.0
    t250 = [t.time_to_250 * 1000 for t in load.timings]
    txn = [t.transaction * 1000 for t in load.timings]
    result.t250_p50_ms = percentile(t250, 0.50)
    result.t250_p99_ms = percentile(t250, 0.99)
    result.txn_p50_ms = percentile(txn, 0.50)
    result.txn_p99_ms = percentile(txn, 0.99)
    result.client_cpu_frac = client_cpu / elapsed if elapsed > 0 else float("nan")
    return result


# --- report ---------------------------------------------------------------------------


def source_fingerprint() -> str:
    """SHA-256 (12 hex) of the server's sources: which code a result belongs to."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "mssante").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "sources": source_fingerprint(),
    }


def filesystem_of(path: Path) -> str:
    """``device fstype`` of the mount holding ``path`` (fsync cost depends on it)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, dev, fstype)
    return f"{best[1]} {best[2]} (mounted on {best[0]})"


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def _onoff(tls: bool) -> str:
    return "on" if tls else "off"


def results_table(results: Sequence[CellResult]) -> Table:
    table = Table(title="Throughput (one new connection per message)")
    with_db = any(r.db_cpu_s_per_msg == r.db_cpu_s_per_msg for r in results)  # not all NaN
    for name, justify in (
        ("target", "left"),
        ("TLS", "left"),
        ("size kB", "right"),
        ("sessions", "right"),
        ("msgs", "right"),
        ("msgs/s", "right"),
        ("t250 p50 ms", "right"),
        ("t250 p99 ms", "right"),
        ("txn p99 ms", "right"),
        ("errors", "right"),
        ("srv CPU ms/msg", "right"),
        ("db CPU ms/msg", "right"),
        ("srv peak RSS MiB", "right"),
        ("client CPU", "right"),
        ("load", "left"),
    ):
        if with_db or name != "db CPU ms/msg":
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in results:
        db = [_f(r.db_cpu_s_per_msg * 1000, 2)] if with_db else []
        table.add_row(
            r.target,
            _onoff(r.tls),
            str(r.size_kb),
            str(r.sessions),
            str(r.messages),
            _f(r.msgs_per_s),
            _f(r.t250_p50_ms, 2),
            _f(r.t250_p99_ms, 2),
            _f(r.txn_p99_ms, 2),
            f"[bold red]{r.errors}[/]" if r.errors else "0",
            _f(r.server_cpu_s_per_msg * 1000, 2),
            *db,
            _f(r.server_peak_rss_mb) + ("*" if r.peak_rss_since_start else ""),
            _f(r.client_cpu_frac * 100, 0) + "%",
            r.load,
        )
    return table


def ratios(results: Sequence[CellResult]) -> list[dict[str, object]]:
    """mssante msgs/s over each baseline's, same TLS mode, size and sessions."""
    by_key = {(r.target, r.tls, r.size_kb, r.sessions): r for r in results}
    rows: list[dict[str, object]] = []
    for r in results:
        if r.target != "mssante":
            continue
        row: dict[str, object] = {"tls": r.tls, "size_kb": r.size_kb, "sessions": r.sessions}
        for base in ("stock", "naive"):
            other = by_key.get((base, r.tls, r.size_kb, r.sessions))
            if other is not None and other.msgs_per_s > 0:
                row[f"mssante/{base}"] = r.msgs_per_s / other.msgs_per_s
        if len(row) > 3:
            rows.append(row)
    return rows


def ratio_table(rows: Sequence[dict[str, object]]) -> Table:
    table = Table(title="mssante msgs/s over the baselines (same run and TLS mode)")
    for name in ("TLS", "size kB", "sessions", "mssante / stock", "mssante / naive"):
        table.add_column(name, justify="left" if name == "TLS" else "right")
    for row in rows:
        cells = []
        for base in ("mssante/stock", "mssante/naive"):
            value = row.get(base)
            cells.append(f"{value:.2f}" if isinstance(value, float) else "-")
        table.add_row(_onoff(bool(row["tls"])), str(row["size_kb"]), str(row["sessions"]), *cells)
    return table


def tls_pairs(results: Sequence[CellResult]) -> list[tuple[CellResult, CellResult]]:
    """(TLS off, TLS on) results of each target, size and sessions run in both modes."""
    by_key = {(r.target, r.tls, r.size_kb, r.sessions): r for r in results}
    return [
        (r, on)
        for r in results
        if not r.tls and (on := by_key.get((r.target, True, r.size_kb, r.sessions)))
    ]


def tls_table(pairs: Sequence[tuple[CellResult, CellResult]]) -> Table:
    table = Table(title="TLS off vs on (same run): off / on")
    with_db = any(r.db_cpu_s_per_msg == r.db_cpu_s_per_msg for pair in pairs for r in pair)
    for name, justify in (
        ("target", "left"),
        ("size kB", "right"),
        ("sessions", "right"),
        ("msgs/s", "right"),
        ("on/off", "right"),
        ("t250 p50 ms", "right"),
        ("t250 p99 ms", "right"),
        ("txn p50 ms", "right"),
        ("srv CPU ms/msg", "right"),
        ("+CPU ms/msg", "right"),
        ("db CPU ms/msg", "right"),
        ("srv peak RSS MiB", "right"),
    ):
        if with_db or name != "db CPU ms/msg":
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for off, on in pairs:
        db = (
            [f"{_f(off.db_cpu_s_per_msg * 1000, 2)} / {_f(on.db_cpu_s_per_msg * 1000, 2)}"]
            if with_db
            else []
        )
        speed = on.msgs_per_s / off.msgs_per_s if off.msgs_per_s > 0 else float("nan")
        extra = (on.server_cpu_s_per_msg - off.server_cpu_s_per_msg) * 1000
        table.add_row(
            off.target,
            str(off.size_kb),
            str(off.sessions),
            f"{_f(off.msgs_per_s)} / {_f(on.msgs_per_s)}",
            _f(speed, 2),
            f"{_f(off.t250_p50_ms, 2)} / {_f(on.t250_p50_ms, 2)}",
            f"{_f(off.t250_p99_ms, 2)} / {_f(on.t250_p99_ms, 2)}",
            f"{_f(off.txn_p50_ms, 2)} / {_f(on.txn_p50_ms, 2)}",
            f"{_f(off.server_cpu_s_per_msg * 1000, 2)} / {_f(on.server_cpu_s_per_msg * 1000, 2)}",
            _f(extra, 2),
            *db,
            f"{_f(off.server_peak_rss_mb)} / {_f(on.server_peak_rss_mb)}",
        )
    return table


# --- database -------------------------------------------------------------------------


@dataclass
class Database:
    """Where mssante keeps its tables: ``urls`` by TLS mode (None: SQLite in the data dir)."""

    kind: str
    description: str
    urls: dict[bool, str | None]
    cpu_seconds: Callable[[], float] | None = None  # of the database server, if separate


def process_tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its children, live or exited (from /proc).

    PostgreSQL: the postmaster and its backends and auxiliary processes,
    which are all its direct children.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root:  # cutime + cstime: its children that exited and were waited for
            total += sum(int(f) for f in fields[11:15])
        elif ppid == root:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@contextlib.contextmanager
def sqlite_database() -> Iterator[Database]:
    yield Database(
        "sqlite",
        "sqlite: mssante.db in each mssante data dir (WAL, synchronous=FULL)",
        {False: None, True: None},
    )


@contextlib.contextmanager
def postgresql_database(modes: Sequence[bool], tmpdir: Path | None) -> Iterator[Database]:
    """A throwaway PostgreSQL cluster (tests/pg.py) and one database per TLS mode.

    The cluster listens on 127.0.0.1 (and a unix socket in its directory)
    only, runs as the ``postgres`` user when we are root, and is stopped and
    its directory removed on the way out, Ctrl-C and SIGTERM included.  Its
    directory is a sibling of the data dir (under ``--tmpdir`` if given): the
    ``postgres`` user cannot enter our own 0700 temporary directory.
    """
    from tests import pg  # here: the SQLite runs need neither asyncpg nor tests/

    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir) if tmpdir is not None else saved
    try:
        cluster = pg.PgCluster()  # makes its temporary directory at once
    finally:
        tempfile.tempdir = saved
    try:
        t0 = time.monotonic()
        cluster.start()
        urls: dict[bool, str | None] = {
            tls: asyncio.run(pg.create_database(cluster.url(), f"bench_tls_{_onoff(tls)}"))
            for tls in modes
        }
        version = subprocess.run(
            [str(cluster.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        names = ", ".join(str(url).rpartition("/")[2] for url in urls.values())
        description = (
            f"postgresql: {version}, throwaway cluster in {cluster.root} on "
            f"{filesystem_of(cluster.root)}, 127.0.0.1:{cluster.port}, fsync=on, "
            f"synchronous_commit=on (tests/pg.py), databases {names}; "
            f"started in {time.monotonic() - t0:.1f} s"
        )
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield Database(
            "postgresql", description, urls, lambda: process_tree_cpu_seconds(postmaster)
        )
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.running = True  # interrupted while pg_ctl started it: stop it all the same
        cluster.remove()


# --- main -----------------------------------------------------------------------------

TARGETS = ("mssante", "stock", "naive")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return values


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets among {', '.join(TARGETS)}; got {text!r}")
    return names


def _tls_modes(text: str) -> list[bool]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in TLS_MODES for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"'off', 'on' or 'off,on' expected; got {text!r}")
    return [n == "on" for n in names]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="SMTP throughput of mssante against stock aiosmtpd baselines (loopback).",
    )
    parser.add_argument("--sizes", type=_int_list, default=[20, 200], help="message sizes, kB")
    parser.add_argument(
        "--sessions", type=_int_list, default=[1, 10, 50], help="concurrent sessions"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per cell")
    parser.add_argument("--messages", type=int, default=3000, help="message cap per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell")
    parser.add_argument("--targets", type=_targets, default=list(TARGETS), help="servers to run")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--tls-modes",
        type=_tls_modes,
        default=[False],
        metavar="off,on",
        help="TLS off (plaintext), on (STARTTLS, operator certificate) or both, in this "
        "order within each size and session count (default: off)",
    )
    tls.add_argument(
        "--tls",
        dest="tls_modes",
        action="store_const",
        const=[True],
        help="the same as --tls-modes on",
    )
    parser.add_argument(
        "--database",
        choices=DATABASES,
        default="sqlite",
        help="mssante's database: SQLite in its data dir, or a throwaway PostgreSQL "
        "cluster started for the run (default: sqlite; the naive baseline stays SQLite)",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "asyncio"),
        default="auto",
        help="auto: Postfix's smtp-source for the TLS-off cells when installed (Debian "
        "package postfix), the built-in asyncio client otherwise and for TLS; asyncio: "
        "always the built-in client",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="mssante worker processes (smtp.workers)"
    )
    parser.add_argument(
        "--paced",
        type=float,
        default=0.5,
        help="after each mssante cell, an open-loop run at this fraction of its rate "
        "to measure time-to-250 there (0: off)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the temporary data directories (and PostgreSQL cluster) go "
        "(default: $TMPDIR or /tmp)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="copy the server logs next to --json"
    )
    return parser.parse_args(argv)


def header(args: argparse.Namespace, info: dict[str, str], tmp: Path) -> None:
    command = shlex.join([sys.executable, *sys.argv])
    console.print(f"[bold]command[/]  {command}")
    console.print(
        f"[bold]machine[/]  nproc={info['nproc']}  cpu={info['cpu']}  "
        f"python={info['python']}  kernel={info['kernel']}"
    )
    console.print(f"[bold]data dir[/] {tmp} on {filesystem_of(tmp)}")
    console.print(f"[bold]sources[/]  mssante/**/*.py sha256 {info['sources']}")
    console.print(f"[bold]database[/] {args.database} (mssante; the naive baseline uses SQLite)")
    bench = " ".join(f"{k}={v}" for k, v in MSSANTE_BENCH.items())
    console.print(f"[bold]mssante[/]  every mode: {bench}")
    if False in args.tls_modes:
        overrides = " ".join(f"{k}={v}" for k, v in MSSANTE_PLAINTEXT.items())
        console.print(f"[bold]TLS off[/]  mssante: {overrides}; client: plain SMTP")
    if True in args.tls_modes:
        console.print(
            "[bold]TLS on[/]   mssante: defaults (STARTTLS and operator certificate required); "
            "baselines: STARTTLS with the same tls/dev-server.pem, no client certificate "
            "asked; client: EHLO, STARTTLS (trusts tls/dev-ca.pem, presents "
            "tls/dev-operator.pem), EHLO, then the transaction; a full handshake per message"
        )
    inherited = sorted(k for k in os.environ if k.startswith("MSSANTE_"))
    if inherited:
        console.print(f"[yellow]inherited environment (also seen by mssante): {inherited}")
    console.print(
        f"[bold]plan[/]     targets={','.join(args.targets)} "
        f"TLS={','.join(_onoff(t) for t in args.tls_modes)} sizes={args.sizes} kB "
        f"sessions={args.sessions} warm-up={args.warmup:g} s "
        f"cell<= {args.seconds:g} s / {args.messages} msgs"
    )
    source = SMTP_SOURCE if args.load == "auto" and SMTP_SOURCE else None
    console.print(
        f"[bold]load[/]     TLS off: {source or 'built-in asyncio client'}"
        + (" (+ one asyncio session measuring time-to-250)" if source else "")
        + "; TLS on: built-in asyncio client (smtp-source has no STARTTLS)"
    )
    console.print(
        f"[bold]mssante[/]  workers={args.workers}"
        + (f"; paced run at {args.paced:.0%} of each measured rate" if args.paced > 0 else "")
    )


async def run_all(
    args: argparse.Namespace,
    servers: dict[tuple[str, bool], Server],
    payloads: dict[int, list[Payload]],
    database: Database,
) -> list[CellResult]:
    for server in servers.values():
        t0 = time.monotonic()
        await server.wait_ready(payloads[min(payloads)][0])
        console.print(
            f"{server.name}: ready on {HOST}:{server.port} in {time.monotonic() - t0:.1f} s"
            + (f" ({server.negotiated})" if server.negotiated else "")
        )
    results: list[CellResult] = []
    for size_kb in args.sizes:
        for sessions in args.sessions:
            for tls in args.tls_modes:
                for target in args.targets:
                    server = servers[(target, tls)]
                    db_cpu = database.cpu_seconds if target == "mssante" else None
                    r = await run_cell(server, payloads[size_kb], size_kb, sessions, args, db_cpu)
                    results.append(r)
                    _progress(server.name, r)
                    if target == "mssante" and args.paced > 0 and r.msgs_per_s > 0:
                        paced = await run_paced_cell(
                            server, payloads[size_kb], size_kb, sessions, r, args, db_cpu
                        )
                        results.append(paced)
                        _progress(paced.target, paced)
    return results


def _progress(name: str, r: CellResult) -> None:
    console.print(
        f"  {name:12} {r.size_kb:4} kB {r.sessions:3} sessions: "
        f"{r.messages:5} msgs {r.msgs_per_s:7.1f}/s  "
        f"t250 p50 {_f(r.t250_p50_ms, 2)} p99 {_f(r.t250_p99_ms, 2)} ms  errors {r.errors}"
        f"  ({r.load})" + (f"  [red]{r.note}" if r.note else "")
    )


async def run_paced_cell(
    server: Server,
    payloads: Sequence[Payload],
    size_kb: int,
    sessions: int,
    peak: CellResult,
    args: argparse.Namespace,
    db_cpu: Callable[[], float] | None,
) -> CellResult:
    """The time-to-250 at a fraction (--paced) of the rate just measured."""
    rate = peak.msgs_per_s * args.paced
    result = CellResult(f"mssante@{args.paced:.0%}", server.tls, size_kb, sessions)
    result.load = f"paced {rate:.0f}/s"
    cpu0 = server.cpu_seconds()
    db0 = db_cpu() if db_cpu else 0.0
    tag = f"paced-{server.name}-{size_kb}-{sessions}"
    load, elapsed = await run_paced(server.client, payloads, rate, seconds=args.seconds, tag=tag)
    done = len(load.timings)
    if done and server.alive():
        result.server_cpu_s_per_msg = (server.cpu_seconds() - cpu0) / done
        result.server_peak_rss_mb = server.peak_rss_mb()
        if db_cpu is not None:
            result.db_cpu_s_per_msg = (db_cpu() - db0) / done
    result.messages = done
    result.elapsed = elapsed
    result.errors = sum(load.errors.values())
    result.error_kinds = dict(load.errors)
    result.msgs_per_s = done / elapsed if elapsed > 0 else 0.0
    t250 = [t.time_to_250 * 1000 for t in load.timings]
    txn = [t.transaction * 1000 for t in load.timings]
    result.t250_p50_ms = percentile(t250, 0.50)
    result.t250_p99_ms = percentile(t250, 0.99)
    result.txn_p50_ms = percentile(txn, 0.50)
    result.txn_p99_ms = percentile(txn, 0.99)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    payloads = {
        kb: [build_payload(f"{ins}@{PATIENT_DOMAIN}", kb * KB) for ins in PATIENTS]
        for kb in args.sizes
    }
    # A SIGTERM to the benchmark unwinds like Ctrl-C: servers (and the
    # PostgreSQL cluster) are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: list[CellResult] = []
    levels: dict[str, dict[str, int]] = {}
    negotiated: dict[str, str] = {}
    database_description = ""
    with tempfile.TemporaryDirectory(prefix="mssante-bench-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        args.tmp = tmp
        header(args, info, tmp)
        sizes = ", ".join(f"{kb} kB -> {payloads[kb][0].size} octets" for kb in args.sizes)
        console.print(f"[bold]messages[/] {sizes}")
        servers: dict[tuple[str, bool], Server] = {}
        try:
            with contextlib.ExitStack() as stack:
                # Entered first, left last: the cluster outlives the servers.
                if args.database == "postgresql":
                    database = stack.enter_context(postgresql_database(args.tls_modes, args.tmpdir))
                else:
                    database = stack.enter_context(sqlite_database())
                database_description = database.description
                console.print(f"[bold]database[/] {database.description}")
                if True in args.tls_modes:
                    prepare_tls(tmp)
                for tls in args.tls_modes:
                    for target in args.targets:
                        server = make_server(
                            target,
                            tls,
                            tmp,
                            database_url=database.urls[tls],
                            workers=args.workers,
                        )
                        servers[(target, tls)] = stack.enter_context(server)
                results = asyncio.run(run_all(args, servers, payloads, database))
                for server in servers.values():
                    if not server.alive():
                        console.print(f"[red]{server.name} is not running:\n{server.log_tail()}")
            # Servers stopped (SIGTERM): their logs are complete.
            for server in servers.values():
                levels[server.name] = dict(server.log_levels())
                if server.negotiated:
                    negotiated[server.name] = server.negotiated
                if args.keep_logs and args.json is not None:
                    dest = args.json.with_name(f"{args.json.stem}.{server.name}.log")
                    dest.write_bytes(server.log.read_bytes())
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: servers stopped, temporary data removed")
            return 130

    if source_fingerprint() != info["sources"]:
        console.print(
            "[yellow]mssante sources changed during the run (servers use the code at start)"
        )
    console.print()
    console.print(results_table(results))
    if any(r.peak_rss_since_start for r in results):
        console.print("* peak RSS since server start (VmHWM could not be reset)")
    ratio_rows = ratios(results)
    if ratio_rows:
        console.print(ratio_table(ratio_rows))
    pairs = tls_pairs(results)
    if pairs:
        console.print(tls_table(pairs))
    errors = [r for r in results if r.errors or r.note or r.warmup_errors]
    for r in errors:
        console.print(f"[red]{r.target} TLS {_onoff(r.tls)} {r.size_kb} kB x{r.sessions}: {r.note}")
        for kind, n in sorted(r.error_kinds.items(), key=lambda kv: -kv[1]):
            console.print(f"[red]    {n:5}  {kind}")
        for kind, n in sorted(r.warmup_errors.items(), key=lambda kv: -kv[1]):
            console.print(f"[red]    {n:5}  {kind} (during the warm-up)")
    for name, counts in levels.items():
        bad = {k: v for k, v in counts.items() if k not in ("INFO", "DEBUG")}
        if bad:
            console.print(f"[yellow]{name} log: {bad}")

    if args.json is not None:
        report = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": info,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "database": database_description,
            "tls_negotiated": negotiated,
            "message_octets": {kb: payloads[kb][0].size for kb in args.sizes},
            "results": [asdict(r) for r in results],
            "ratios": ratio_rows,
            "tls_on_over_off": [
                {
                    "target": off.target,
                    "size_kb": off.size_kb,
                    "sessions": off.sessions,
                    "msgs_per_s": on.msgs_per_s / off.msgs_per_s if off.msgs_per_s else None,
                    "extra_server_cpu_ms_per_msg": (
                        on.server_cpu_s_per_msg - off.server_cpu_s_per_msg
                    )
                    * 1000,
                }
                for off, on in pairs
            ],
            "server_log_levels": levels,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
