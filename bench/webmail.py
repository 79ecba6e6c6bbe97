"""Benchmark of the webmail: the conversation list of a 10,000-message mailbox (issue 8).

Run with ``.venv/bin/python bench/webmail.py [--messages 10000]
[--professionals 200] [--requests 200] [--concurrency 4] [--seconds 60]
[--smtp-sessions 20] [--tls] [--database sqlite|postgresql] [--keep]
[--profile DIR]``.  See BENCHMARKS.md for the results.

The real gateway (mssante.app.Gateway: SMTP, store, notification and
outbound workers, and the webmail on plain HTTP, or HTTPS with ``--tls``)
runs in a child process (this script with ``--serve-child``) on 127.0.0.1
and ports chosen by the system, on a fresh temporary data directory, SQLite
by default or (``--database postgresql``) a database of a throwaway
PostgreSQL cluster (tests/pg.py).  The child seeds the demo patients with
the webmail password (``seed_demo(passwords=True)``), as ``serve --demo``.
Measuring the server in its own process keeps the client's CPU (httpx,
this event loop) off the server's event loop.

Filling: ``--messages`` professional messages to the activated demo
patient from ``--professionals`` professionals (display names, subjects,
about 30 % with a PDF attachment of 15-80 kB, about a quarter replies with
In-Reply-To/References, some from a colleague answering another
professional's message, a few ending their conversation with
``X-MSS-MES: FIN``), sent over SMTP by ``--smtp-sessions`` concurrent
sessions (connection kept, one recipient per message): the gateway stores
them exactly as it stores real mail (encrypted, threaded, group commit).
The messages per professional follow a Zipf-like law (weight 1/sqrt(rank))
so that some conversations are long, and each professional writes during
a period of the mailbox's life (the ten most frequent over most of it).
Then the patient's reading: all the messages of most conversations, none
of 8 % of them, all but the last 1-3 of 12 % of them, marked read by the
function the conversation page calls at a message's first display
(``outbound.mdn.on_first_display``: read_at and the audit event), from
this process on its own store (quicker than rendering each conversation).

Measured, each ``--requests`` times sequentially after 10 warm-up
requests, bounded by ``--seconds`` per line: ``GET /messages`` (page 1),
``GET /messages?page=N`` (the middle page), ``GET /conversations/ID`` of
the longest conversation, ``GET /historique``; then the list page with
``--concurrency`` clients at once; then, in this process, the store query
behind the list page (``mssante.store.mailbox.list_conversations`` on its
own read session, as the page handler calls it).  Every response must be
200 (no redirect to the login page), the list pages must list the
expected number of conversations and the conversation page all its
messages.  "server CPU ms/req" is the server process's user + system CPU
over the measured loop (/proc), background work included, per request.

``--profile DIR``: after the timed lines, py-spy samples the server (200
Hz, raw stacks kept in DIR) while one client requests the list page, the
longest conversation and the history for ``--profile-seconds`` each, and a
summary per function is printed (threads waiting for work left out); then
each SQL statement of ``list_conversations`` with its median time, in this
process.  None of it is in the timed figures (py-spy pauses the server at
each sample).  ``--keep`` keeps the temporary directory (data, server log).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import selectors
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiosmtplib  # noqa: E402
import httpx  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from mssante import demo  # noqa: E402
from mssante.clock import SystemClock  # noqa: E402
from mssante.settings import (  # noqa: E402
    LimitsSettings,
    OpsSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    SubmissionSettings,
    TrustSettings,
    WebSettings,
)

HOST = "127.0.0.1"
HOSTNAME = "mx.bench.localhost"
PATIENT_DOMAIN = SmtpSettings().patient_domain
PATIENT = f"{demo.ACTIVATED}@{PATIENT_DOMAIN}"
WARMUP = 10
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
CONVERSATION_LIST = re.compile(r'<ul class="list" aria-label="Conversations">(.*?)</ul>', re.S)
TOTAL = re.compile(r"(\d+) conversations?")
NEVER_OPENED = 0.08  # conversations the patient has not opened at all
NEW_MESSAGES = 0.12  # conversations read but for their last 1-3 messages


# --- settings and the server child ------------------------------------------------------


def bench_settings(spec: dict[str, Any]) -> Settings:
    """The gateway's settings: defaults, but loopback, port 0, plain SMTP (no
    trust-space certificate), no abuse limit in the way of the filling, the
    webmail on."""
    tls = spec.get("tls_cert") is not None
    return Settings(
        smtp=SmtpSettings(host=HOST, port=0, hostname=HOSTNAME, require_tls=False),
        store=StoreSettings(data_dir=Path(spec["data_dir"]), database_url=spec["database_url"]),
        trust=TrustSettings(require_client_certificate=False),
        submission=SubmissionSettings(enabled=False),
        ops=OpsSettings(port=0),  # no fixed port
        # One peer (127.0.0.1) sends everything: the per-peer limit would
        # answer 451 after 120 messages a minute.  The check still runs.
        limits=LimitsSettings(messages_per_minute=100_000_000),
        web=WebSettings(
            enabled=True,
            host=HOST,
            port=0,
            tls_cert=Path(spec["tls_cert"]) if tls else None,
            tls_key=Path(spec["tls_key"]) if tls else None,
        ),
    )


async def serve_child(spec_path: Path) -> None:
    """The gateway, until SIGTERM/SIGINT; prints its ports as one JSON line."""
    from mssante.app import Gateway
    from mssante.cli import seed_demo

    spec = json.loads(spec_path.read_text())
    logging.basicConfig(
        filename=spec["log"],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = bench_settings(spec)
    gw = Gateway(settings)
    await gw.start()
    try:
        await seed_demo(gw.store, passwords=True)
        assert gw.web is not None
        print(json.dumps({"smtp": gw.smtp.port, "web": gw.web.url}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await gw.stop()


class Child:
    """The server process: started, its ports read, SIGTERM at the end."""

    def __init__(self, spec: dict[str, Any], tmp: Path) -> None:
        self.spec_path = tmp / "spec.json"
        self.spec_path.write_text(json.dumps(spec))
        self.stderr = (tmp / "server.stderr").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-child", str(self.spec_path)],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
        )
        self.ports: dict[str, Any] = {}

    def ready(self, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        # The child prints its ports as one JSON line once it listens; wait for
        # that line (or its exit: EOF) without polling.
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as waiting:
            waiting.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not waiting.select(left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the server exited with {self.proc.wait()}")
                buf += chunk
                if b"\n" in buf:
                    self.ports = json.loads(buf.split(b"\n", 1)[0])
                    return self.ports
        raise RuntimeError("the server did not start in time")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


# --- the mailbox: who writes what ---------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


GIVEN = _words(
    "Alice Anne Antoine Bernard Camille Catherine Claire David Élodie Emmanuel François "
    "Hélène Hugo Isabelle Jacques Julien Karim Laure Léa Louis Marc Marie Mathieu Nadia "
    "Nicolas Olivier Pascale Philippe Sophie Thomas Valérie Yann"
)
FAMILY = _words(
    "Durand Lefebvre Moreau Laurent Simon Michel Garcia David Bertrand Roux Vincent "
    "Fournier Morel Girard André Mercier Dupont Lambert Bonnet François Martinez Legrand "
    "Garnier Faure Rousseau Blanc Guérin Muller Henry Roussel Nicolas Perrin Morin "
    "Mathieu Clément Gauthier Dumont Lopez Fontaine Chevalier Robin Masson Sanchez Gérard "
    "Nguyen Boyer Denis Lemaire"
)
ORGS = (
    "chu-exemple",
    "ch-valmont",
    "clinique-des-lilas",
    "cabinet-republique",
    "labo-biosante",
    "imagerie-du-parc",
    "maison-sante-belleville",
    "ch-saint-louis",
    "centre-dentaire-nation",
    "pharmacie-des-halles",
    "ssr-les-pins",
    "cabinet-kine-voltaire",
)
ROLES = ("Dr", "Dr", "Dr", "Dr", "Dr", "Dr", "Pr", "")  # "" = a name without title
SERVICES = (
    "Secrétariat de cardiologie",
    "Laboratoire BioSanté",
    "Service d'imagerie",
    "Accueil des urgences",
)
SUBJECTS = (
    "Compte rendu de consultation",
    "Résultats de votre bilan sanguin",
    "Ordonnance",
    "Rendez-vous de contrôle",
    "Compte rendu d'hospitalisation",
    "Résultats d'imagerie",
    "Courrier de sortie",
    "Rappel de vaccination",
    "Suivi de votre traitement",
    "Questionnaire préopératoire",
    "Compte rendu opératoire",
    "Prescription de kinésithérapie",
    "Certificat médical",
    "Résultats d'analyses",
    "Convocation",
    "Votre dossier",
)
SENTENCES = (
    "Je vous adresse ci-joint le compte rendu de notre dernière consultation.",
    "Les résultats de vos examens sont dans les valeurs habituelles.",
    "Je vous propose de poursuivre le traitement à la même posologie pendant trois mois.",
    "Merci de prendre rendez-vous pour un contrôle dans six semaines.",
    "Le bilan biologique montre une légère élévation de la CRP, sans signe de gravité.",
    "N'hésitez pas à me recontacter si les symptômes persistent ou s'aggravent.",
    "Pensez à apporter vos derniers résultats lors de la prochaine consultation.",
    "L'échographie ne montre pas d'anomalie particulière.",
    "Votre ordonnance est renouvelée pour une durée de trois mois.",
    "Je transmets une copie de ce courrier à votre médecin traitant.",
    "Le rendez-vous est confirmé ; merci de vous présenter quinze minutes avant l'heure.",
    "Vous trouverez en pièce jointe la prescription demandée.",
)


@dataclass(frozen=True)
class Professional:
    name: str | None  # the From display name; None: the address alone
    address: str


@dataclass(frozen=True)
class Planned:
    index: int
    professional: int
    subject: str
    paragraphs: int
    pdf_kb: int  # 0: no attachment
    reply: str  # "", "same" (their own earlier message), "colleague" (someone else's)
    fin: bool


def professionals(count: int, rng: random.Random) -> list[Professional]:
    out = []
    for i in range(count):
        org = ORGS[i % len(ORGS)]
        given, family = rng.choice(GIVEN), rng.choice(FAMILY)
        local = f"{given}.{family}.{i}".lower()
        local = local.translate(str.maketrans("éèêëïîôàâçü ", "eeeeiioaacu-"))
        address = f"{local}@{org}.mssante.fr"
        kind = rng.random()
        if kind < 0.05:
            name = None  # no display name: the webmail shows a neutral wording
        elif kind < 0.10:
            name = f"{rng.choice(SERVICES)} - {org}"
        else:
            role = rng.choice(ROLES)
            name = f"{role} {given} {family}".strip()
        out.append(Professional(name, address))
    return out


def plan(messages: int, count: int, rng: random.Random) -> list[Planned]:
    """Who sends which message, in sending order."""
    weights = [1 / math.sqrt(rank + 1) for rank in range(count)]
    scale = (messages - count) / sum(weights)  # everyone sends at least one
    shares = [1 + w * scale for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(count), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: messages - sum(counts)]:
        counts[i] += 1
    # Each professional writes during a period of the mailbox's life: the ten
    # most frequent (a GP, specialists following a chronic condition) over
    # most of it, the others over an episode of care.
    timeline: list[tuple[float, int]] = []
    for p, n in enumerate(counts):
        length = rng.uniform(0.6, 1.0) if p < 10 else rng.uniform(0.05, 0.5)
        start = rng.uniform(0.0, 1.0 - length)
        timeline += [(start + rng.random() * length, p) for _ in range(n)]
    timeline.sort()
    order = [p for _, p in timeline]
    last = {p: i for i, p in enumerate(order)}
    seen: set[int] = set()
    out = []
    for i, p in enumerate(order):
        reply = ""
        if p in seen:
            r = rng.random()
            reply = "same" if r < 0.22 else "colleague" if r < 0.25 else ""
        seen.add(p)
        out.append(
            Planned(
                index=i,
                professional=p,
                subject=rng.choice(SUBJECTS),
                paragraphs=rng.randint(1, 5),
                pdf_kb=rng.randint(15, 80) if rng.random() < 0.3 else 0,
                reply=reply,
                # Every 40th professional ends their conversation at their last message.
                fin=p % 40 == 7 and last[p] == i,
            )
        )
    return out


PDF_HEAD = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]/Contents 4 0 R>>endobj\n"
)


def pdf(size: int, rng: random.Random) -> bytes:
    stream = rng.randbytes(size)  # compressed page content looks random
    return (
        PDF_HEAD
        + b"4 0 obj<</Length %d/Filter/FlateDecode>>stream\n" % len(stream)
        + stream
        + b"\nendstream endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )


@dataclass
class Sent:
    """What the gateway has acknowledged, for the replies that follow."""

    by_professional: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    all: list[tuple[int, str, str]] = field(default_factory=list)  # (professional, id, subject)
    count: int = 0


def compose(
    item: Planned, pros: list[Professional], sent: Sent, rng: random.Random
) -> tuple[EmailMessage, str]:
    pro = pros[item.professional]
    domain = pro.address.rpartition("@")[2]
    msg = EmailMessage()
    msg["From"] = f"{pro.name} <{pro.address}>" if pro.name else pro.address
    msg["To"] = PATIENT
    subject = item.subject
    answered: tuple[str, str] | None = None
    if item.reply == "same" and sent.by_professional.get(item.professional):
        answered = rng.choice(sent.by_professional[item.professional][-5:])
    elif item.reply == "colleague":
        others = [(i, s) for p, i, s in sent.all[-300:] if p != item.professional]
        if others:
            answered = rng.choice(others)
    if answered is not None:
        msg["In-Reply-To"] = answered[0]
        msg["References"] = answered[0]
        subject = "Re: " + answered[1].removeprefix("Re: ")
    msg["Subject"] = subject
    message_id = f"<bench.{item.index}.{rng.getrandbits(48):012x}@{domain}>"
    msg["Message-ID"] = message_id
    if item.fin:
        msg["X-MSS-MES"] = "FIN"
    body = ["Madame,", ""]
    for _ in range(item.paragraphs):
        body += [" ".join(rng.sample(SENTENCES, rng.randint(2, 4))), ""]
    body += ["Bien cordialement,", pro.name or "Le secrétariat"]
    msg.set_content("\n".join(body) + "\n")
    if item.pdf_kb:
        msg.add_attachment(
            pdf(item.pdf_kb * 1000, rng),
            maintype="application",
            subtype="pdf",
            filename=f"{item.subject.split()[0].lower()}-{item.index}.pdf",
        )
    return msg, message_id


async def send_all(
    items: list[Planned],
    pros: list[Professional],
    sent: Sent,
    port: int,
    sessions: int,
    seed: int,
) -> None:
    """Send ``items`` in order over ``sessions`` SMTP connections kept open."""
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=False, timeout=120)
        await client.connect()
        try:
            while True:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                rng = random.Random(seed * 1_000_003 + item.index)
                msg, message_id = compose(item, pros, sent, rng)
                errors, _ = await client.send_message(
                    msg, sender=pros[item.professional].address, recipients=[PATIENT]
                )
                if errors:
                    raise RuntimeError(f"message {item.index} refused: {errors}")
                subject = str(msg["Subject"])
                sent.by_professional.setdefault(item.professional, []).append((message_id, subject))
                sent.all.append((item.professional, message_id, subject))
                sent.count += 1
        finally:
            with contextlib.suppress(Exception):
                await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))


# --- the webmail client -------------------------------------------------------------------


def http_client(url: str, ca: Path | None, connections: int = 1) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = False
    if ca is not None:
        verify = ssl.create_default_context(cafile=str(ca))
    return httpx.AsyncClient(
        base_url=url,
        verify=verify,
        timeout=300,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def login(client: httpx.AsyncClient) -> None:
    page = await client.get("/connexion")
    found = CSRF.search(page.text)
    assert page.status_code == 200 and found, f"login page: {page.status_code}"
    response = await client.post(
        "/connexion",
        data={"csrf": found.group(1), "identifiant": demo.ACTIVATED, "mot_de_passe": demo.PASSWORD},
    )
    assert response.status_code in (302, 303), f"login: {response.status_code}"
    assert response.headers.get("location", "").endswith("/messages"), response.headers


def check_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.url}: {response.status_code} {response.headers.get('location')}"
        )


def check_list(expected_items: int, expected_total: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        check_ok(response)
        found = CONVERSATION_LIST.search(response.text)
        total = TOTAL.search(response.text)
        items = found.group(1).count("<li") if found else 0
        shown = int(total.group(1)) if total else 0
        if items != expected_items or shown != expected_total:
            raise RuntimeError(
                f"{response.request.url}: {items} conversations listed of {shown},"
                f" expected {expected_items} of {expected_total}"
            )

    return check


def check_conversation(messages: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        check_ok(response)
        shown = response.text.count('<article class="message')
        if shown != messages:
            raise RuntimeError(f"{response.request.url}: {shown} messages shown of {messages}")

    return check


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Line:
    what: str
    samples: list[float]  # seconds
    wall: float  # seconds, the measured loop
    server_cpu: float | None = None  # seconds
    concurrency: int = 1

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self) -> str:
        n = len(self.samples)
        cpu = f"{self.server_cpu / n * 1000:.1f}" if self.server_cpu is not None else "-"
        return (
            f"| {self.what} | {self.concurrency} | {n} | {self.median * 1000:.1f} |"
            f" {self.percentile(0.95) * 1000:.1f} | {max(self.samples) * 1000:.1f} |"
            f" {n / self.wall:.0f} | {cpu} |"
        )


HEADER = (
    "| what | clients | requests | median ms | p95 ms | max ms | req/s | server CPU ms/req |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


async def measure(
    what: str,
    call: Callable[[], Awaitable[Any]],
    check: Callable[[Any], None],
    *,
    requests: int,
    seconds: float,
    concurrency: int = 1,
    child: Child | None = None,
) -> Line:
    """``WARMUP`` calls, then ``requests`` per client, ``concurrency`` clients,
    each call checked, stopped at ``seconds``."""
    for _ in range(WARMUP):
        check(await call())
    samples: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        for _ in range(requests):
            if time.perf_counter() >= deadline:
                return
            t0 = time.perf_counter()
            result = await call()
            samples.append(time.perf_counter() - t0)
            check(result)

    cpu0 = child.cpu_seconds() if child is not None else None
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    cpu = child.cpu_seconds() - cpu0 if child is not None and cpu0 is not None else None
    line = Line(what, samples, wall, cpu, concurrency)
    print(line.row(), flush=True)
    return line


# --- profiling (--profile DIR) -------------------------------------------------------------


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    return found


async def profile(
    child: Child, name: str, call: Callable[[], Awaitable[Any]], seconds: float, out: Path
) -> None:
    """Requests in a loop while py-spy samples the server; a summary printed.

    Not part of the timed lines: py-spy pauses the server at each sample."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.txt"
    spy = await asyncio.create_subprocess_exec(
        py_spy(),
        "record",
        "--pid",
        str(child.proc.pid),
        "--rate",
        "200",
        "--format",
        "raw",
        "--duration",
        str(max(1, int(seconds))),
        "--output",
        str(path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    await asyncio.sleep(1.0)  # attached
    requests = 0
    while spy.returncode is None:
        await call()
        requests += 1  # returncode is set when py-spy exits (the child watcher)
    _, err = await spy.communicate()
    if not path.exists():
        raise RuntimeError(f"py-spy: {err.decode(errors='replace')[-500:]}")
    print(f"profile of {name}: {requests} requests, raw stacks in {path}", flush=True)
    for row in summarize(path):
        print(row, flush=True)


def _idle_leaves() -> tuple[set[str], str]:
    """Leaf frames of a thread waiting for work (py-spy, without --native,
    does not always see them as idle), and the frame of aiosqlite's thread
    while it runs a sqlite3 call (C code: no Python frame below it)."""
    import inspect

    import aiosqlite.core

    lines, first = inspect.getsourcelines(aiosqlite.core._connection_worker_thread)
    get = next(first + i for i, text in enumerate(lines) if "tx.get()" in text)
    call = next(first + i for i, text in enumerate(lines) if "function()" in text)
    idle = {f"_connection_worker_thread (aiosqlite/core.py:{get})"}
    return idle, f"_connection_worker_thread (aiosqlite/core.py:{call})"


FRAME_LINE = re.compile(r":\d+\)$")


def summarize(path: Path, top: int = 20) -> list[str]:
    """Share of the server's busy samples per function: inclusive (in the
    stack) for mssante's own functions and the libraries it calls, then self.

    Left out as idle: threads waiting for work (the thread pool's queue,
    aiosqlite's queue) and the event loop waiting in epoll."""
    idle_leaves, in_sqlite = _idle_leaves()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        if (
            leaf in idle_leaves
            or leaf.startswith("_worker (concurrent/futures/thread.py:")
            or leaf.startswith("EpollSelector.select (selectors.py:")
        ):
            idle += count
            continue
        if leaf == in_sqlite:
            frames.append("sqlite3 (C, in aiosqlite's thread)")
        frames = [FRAME_LINE.sub(")", f) for f in frames]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return ["  (no samples)"]
    rows = [f"  {total} busy samples ({idle} idle left out); inclusive, mssante and below:"]
    wanted = (
        "mssante/",
        "jinja2",
        "sqlalchemy",
        "aiosqlite",
        "sqlite3",
        "asyncpg",
        "cryptography",
        "email/",
        "starlette",
        "uvicorn",
        "h11",
    )
    shown = [(f, n) for f, n in inclusive.most_common() if any(w in f for w in wanted)][:top]
    rows += [f"  {n / total:6.1%}  {f}" for f, n in shown]
    rows.append("  self (where the samples were):")
    rows += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return rows


async def statement_times(store: Any, call: Callable[[], Awaitable[Any]], calls: int) -> list[str]:
    """Each SQL statement of ``call`` with its median time (execute and
    fetch, as SQLAlchemy's cursor events see it), in this process."""
    from sqlalchemy import event

    engine = store.read_engine.sync_engine
    times: dict[str, list[float]] = {}
    parameters: dict[str, Any] = {}
    started: list[float] = []

    def before(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        parameters.setdefault(statement, params)
        started.append(time.perf_counter())

    def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        times.setdefault(statement, []).append(time.perf_counter() - started.pop())

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            await call()
        whole = (time.perf_counter() - t0) / calls
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    rows = [f"  {whole * 1000:.1f} ms per call on average, of which SQL statements (median ms):"]
    slow = []
    for statement, samples in times.items():
        text = " ".join(statement.split())
        median = statistics.median(samples)
        rows.append(f"  {median * 1000:7.2f} ms x{len(samples) // calls}  {text[:300]}")
        if median > 0.002 and text.startswith("SELECT"):
            slow.append(statement)
    sqlite = store.read_engine.dialect.name == "sqlite"
    for statement in slow:
        rows.append(f"  plan of: {' '.join(statement.split())}")
        async with store.read_engine.connect() as conn:
            prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            result = await conn.exec_driver_sql(prefix + statement, parameters[statement])
            for plan_row in result:
                rows.append(f"    {plan_row[-1]}")
    return rows


# --- main -----------------------------------------------------------------------------------


def source_fingerprint() -> str:
    """SHA-256 (12 hex) of the server's sources (.py and templates): which code a result is of."""
    import hashlib

    digest = hashlib.sha256()
    paths = [*(REPO / "mssante").rglob("*.py"), *(REPO / "mssante").rglob("*.html")]
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), Python {sys.version.split()[0]}"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def mailbox_stats(store: Any, patient_id: int) -> dict[str, Any]:
    from mssante.store.models import Conversation, Delivery, Message

    async with store.reads() as s:
        deliveries = await s.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.patient_id == patient_id)
        )
        unread = await s.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.patient_id == patient_id, Delivery.read_at.is_(None))
        )
        with_pdf = await s.scalar(
            select(func.count())
            .select_from(Delivery)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.patient_id == patient_id, Message.attachment_count > 0)
        )
        replies = await s.scalar(
            select(func.count())
            .select_from(Delivery)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.patient_id == patient_id, Message.in_reply_to.is_not(None))
        )
        per_conv = (
            await s.execute(
                select(Delivery.conversation_id, func.count())
                .where(Delivery.patient_id == patient_id)
                .group_by(Delivery.conversation_id)
                .order_by(func.count().desc(), Delivery.conversation_id)
            )
        ).all()
        unread_convs = await s.scalar(
            select(func.count(func.distinct(Delivery.conversation_id))).where(
                Delivery.patient_id == patient_id, Delivery.read_at.is_(None)
            )
        )
        ended = await s.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.patient_id == patient_id, Conversation.ended_at.is_not(None))
        )
        multi = await s.scalar(
            select(func.count(func.distinct(Delivery.conversation_id)))
            .join(Message, Message.id == Delivery.message_id)
            .join(Conversation, Conversation.id == Delivery.conversation_id)
            .where(
                Delivery.patient_id == patient_id,
                Message.from_address != Conversation.professional,
            )
        )
    sizes = [n for _, n in per_conv]
    return {
        "deliveries": int(deliveries or 0),
        "unread": int(unread or 0),
        "with_pdf": int(with_pdf or 0),
        "replies": int(replies or 0),
        "conversations": len(per_conv),
        "unread_conversations": int(unread_convs or 0),
        "ended": int(ended or 0),
        "multi_sender": int(multi or 0),
        "longest": per_conv[0] if per_conv else (0, 0),
        "median_length": statistics.median(sizes) if sizes else 0,
        "conversation_ids": [c for c, _ in per_conv],
    }


def to_read(per_conversation: dict[int, list[int]], rng: random.Random) -> list[int]:
    """The deliveries the patient has read: all of most conversations, none of
    ``NEVER_OPENED`` of them, all but the last 1-3 messages of ``NEW_MESSAGES``."""
    out: list[int] = []
    for conversation in sorted(per_conversation):
        ids = per_conversation[conversation]
        r = rng.random()
        if r < NEVER_OPENED:
            continue
        if r < NEVER_OPENED + NEW_MESSAGES:
            out += ids[: -rng.randint(1, 3)]
        else:
            out += ids
    return out


async def mark_read(store: Any, patient_id: int, deliveries: list[int], tasks: int) -> None:
    """What reading these messages in the webmail writes: each marked read at
    its first display (read_at, audit ``message.read``), by the function the
    conversation page calls (outbound/mdn.py), ``tasks`` at once so that the
    writer's group commit batches them."""
    from mssante.outbound.mdn import on_first_display

    queue = list(reversed(deliveries))

    async def work() -> None:
        while queue:
            delivery_id = queue.pop()
            await on_first_display(
                store, patient_id=patient_id, delivery_id=delivery_id, at=SystemClock().now()
            )

    await asyncio.gather(*(work() for _ in range(tasks)))


async def deliveries_by_conversation(store: Any, patient_id: int) -> dict[int, list[int]]:
    from mssante.store.models import Delivery

    out: dict[int, list[int]] = {}
    async with store.reads() as s:
        rows = await s.execute(
            select(Delivery.conversation_id, Delivery.id)
            .where(Delivery.patient_id == patient_id)
            .order_by(Delivery.delivered_at, Delivery.id)
        )
        for conversation, delivery in rows:
            out.setdefault(conversation, []).append(delivery)
    return out


async def run(args: argparse.Namespace, tmp: Path) -> int:
    from mssante.app import Store
    from mssante.store import mailbox
    from mssante.store.models import Patient

    t_run = time.perf_counter()
    sources = source_fingerprint()
    print(f"sources {sources}; {machine()}", flush=True)
    data = tmp / "data"
    spec: dict[str, Any] = {
        "data_dir": str(data),
        "database_url": None,
        "tls_cert": None,
        "tls_key": None,
        "log": str(tmp / "server.log"),
    }
    ca: Path | None = None
    cluster = None
    if args.tls:
        from mssante.smtp.tls import ensure_dev_certificate

        # A development CA and a certificate for 127.0.0.1 (cryptography), as
        # `serve` makes for SMTP; the client trusts that CA only.
        ca, cert, key = ensure_dev_certificate(tmp / "web-tls", HOST)
        spec.update(tls_cert=str(cert), tls_key=str(key))
    child: Child | None = None
    store: Store | None = None
    try:
        if args.database == "postgresql":
            from tests import pg

            cluster = pg.PgCluster()
            cluster.start()
            spec["database_url"] = await pg.create_database(cluster.url(), "bench_webmail")
        child = Child(spec, tmp)
        ports = await asyncio.to_thread(child.ready)
        url = ports["web"]
        print(
            f"server pid {child.proc.pid}: SMTP {HOST}:{ports['smtp']}, webmail {url}"
            f" ({args.database}); data in {tmp}",
            flush=True,
        )
        rng = random.Random(args.seed)
        pros = professionals(args.professionals, rng)
        items = plan(args.messages, args.professionals, rng)
        sent = Sent()

        t0, cpu0, own0 = time.perf_counter(), child.cpu_seconds(), time.process_time()
        await send_all(items, pros, sent, ports["smtp"], args.smtp_sessions, args.seed)
        t_smtp = time.perf_counter() - t0
        print(
            f"filled: {len(items)} messages over SMTP ({args.smtp_sessions} sessions)"
            f" in {t_smtp:.1f} s = {len(items) / t_smtp:.0f}/s; server CPU"
            f" {(child.cpu_seconds() - cpu0) / len(items) * 1000:.1f} ms/msg, client CPU"
            f" {(time.process_time() - own0) / len(items) * 1000:.1f} ms/msg",
            flush=True,
        )

        store = Store(bench_settings(spec))
        await store.open()
        async with store.reads() as s:
            patient_id = await s.scalar(select(Patient.id).where(Patient.ins == demo.ACTIVATED))
        assert patient_id is not None
        read = to_read(
            await deliveries_by_conversation(store, patient_id), random.Random(args.seed + 1)
        )
        t0 = time.perf_counter()
        await mark_read(store, patient_id, read, args.smtp_sessions)
        t_read = time.perf_counter() - t0
        print(
            f"read: {len(read)} messages marked read by the webmail's on_first_display"
            f" ({args.smtp_sessions} at once) in {t_read:.1f} s",
            flush=True,
        )
        stats = await mailbox_stats(store, patient_id)
        if stats["deliveries"] != args.messages:
            raise RuntimeError(f"{stats['deliveries']} messages stored, {args.messages} sent")
        t_fill = t_smtp + t_read
        longest, longest_n = stats["longest"]
        per_page = store.settings.web.page_size
        total = stats["conversations"]
        pages = max(1, -(-total // per_page))
        middle = (pages + 1) // 2
        middle_items = min(per_page, total - (middle - 1) * per_page)
        print(
            f"mailbox: {stats['deliveries']} messages ({stats['with_pdf']} with a PDF,"
            f" {stats['replies']} with In-Reply-To, {stats['unread']} unread) in {total}"
            f" conversations ({stats['unread_conversations']} with unread messages,"
            f" {stats['multi_sender']} with several senders, {stats['ended']} ended);"
            f" longest {longest_n} messages (id {longest}), median"
            f" {stats['median_length']:g}; {pages} pages of {per_page};"
            f" data dir {du(data) / 1e6:.0f} MB",
            flush=True,
        )
        print(
            f"fill: {t_fill:.1f} s in all (SMTP {t_smtp:.1f} s, read marks {t_read:.1f} s)",
            flush=True,
        )
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"load average before the timed lines: {load} ({os.cpu_count()} CPUs)", flush=True)

        print(HEADER, flush=True)
        lines: list[Line] = []
        async with http_client(url, ca) as client:
            await login(client)
            pages_to_time = [
                ("GET /messages", "/messages", check_list(min(per_page, total), total)),
                (
                    f"GET /messages?page={middle}",
                    f"/messages?page={middle}",
                    check_list(middle_items, total),
                ),
                (
                    f"GET /conversations/{longest} ({longest_n} msgs)",
                    f"/conversations/{longest}",
                    check_conversation(longest_n),
                ),
                ("GET /historique", "/historique", check_ok),
            ]
            for what, path, check in pages_to_time:

                async def get(path: str = path) -> httpx.Response:
                    return await client.get(path)

                lines.append(
                    await measure(
                        what,
                        get,
                        check,
                        requests=args.requests,
                        seconds=args.seconds,
                        child=child,
                    )
                )
        async with http_client(url, ca, connections=args.concurrency) as client:
            await login(client)

            async def get_list() -> httpx.Response:
                return await client.get("/messages")

            lines.append(
                await measure(
                    "GET /messages",
                    get_list,
                    check_list(min(per_page, total), total),
                    requests=args.requests,
                    seconds=args.seconds,
                    concurrency=args.concurrency,
                    child=child,
                )
            )

        for label, number, expected in (
            ("store: list_conversations page 1", 1, min(per_page, total)),
            (f"store: list_conversations page {middle}", middle, middle_items),
        ):

            async def query(number: int = number) -> Any:
                async with store.reads() as db:
                    return await mailbox.list_conversations(
                        db, store.keyring, patient_id, page=number, per_page=per_page
                    )

            def check_page(listing: Any, expected: int = expected) -> None:
                if len(listing.items) != expected or listing.total != total:
                    raise RuntimeError(f"store: {len(listing.items)} of {listing.total}")

            lines.append(
                await measure(
                    label, query, check_page, requests=args.requests, seconds=args.seconds
                )
            )

        if args.profile is not None:
            async with http_client(url, ca) as client:
                await login(client)
                for name, path, check in (
                    ("messages", "/messages", check_list(min(per_page, total), total)),
                    ("conversation", f"/conversations/{longest}", check_conversation(longest_n)),
                    ("historique", "/historique", check_ok),
                ):

                    async def checked(path: str = path, check: Any = check) -> None:
                        check(await client.get(path))

                    await profile(child, name, checked, args.profile_seconds, args.profile)
            for number in (1, middle):

                async def listing(number: int = number) -> Any:
                    async with store.reads() as db:
                        return await mailbox.list_conversations(
                            db, store.keyring, patient_id, page=number, per_page=per_page
                        )

                print(f"store: list_conversations page {number}, 20 calls:", flush=True)
                for row in await statement_times(store, listing, 20):
                    print(row, flush=True)

        http1, http_mid = lines[0], lines[1]
        store1, store_mid = lines[-2], lines[-1]
        print(
            f"HTTP / store, median: page 1 {http1.median / store1.median:.1f}x"
            f" ({(http1.median - store1.median) * 1000:.1f} ms of HTTP, session, template);"
            f" page {middle} {http_mid.median / store_mid.median:.1f}x"
            f" ({(http_mid.median - store_mid.median) * 1000:.1f} ms)",
            flush=True,
        )
        log = Path(spec["log"]).read_text(errors="replace") if Path(spec["log"]).exists() else ""
        levels = {lv: len(re.findall(rf"^\S+ \S+ {lv} ", log, re.M)) for lv in ("WARNING", "ERROR")}
        if source_fingerprint() != sources:
            print("mssante's sources changed during the run (the server runs the code at start)")
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"server log: {levels['WARNING']} warnings, {levels['ERROR']} errors;"
            f" load average {load}; whole run {time.perf_counter() - t_run:.0f} s",
            flush=True,
        )
        return 0
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        if child is not None:
            child.stop()
        if cluster is not None:
            cluster.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--professionals", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per line")
    parser.add_argument("--concurrency", type=int, default=4, help="clients of the second line")
    parser.add_argument("--seconds", type=float, default=60.0, help="cap of each timed line")
    parser.add_argument("--smtp-sessions", type=int, default=20)
    parser.add_argument("--tls", action="store_true", help="HTTPS (a development certificate)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the timed lines, py-spy the server on the list and the conversation pages",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--serve-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child is not None:
        asyncio.run(serve_child(args.serve_child))
        return 0
    if args.messages < args.professionals:
        parser.error("--messages must be at least --professionals")
    tmp = Path(tempfile.mkdtemp(prefix="mssante-bench-webmail-"))
    try:
        return asyncio.run(run(args, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
