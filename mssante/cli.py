"""The ``mssante`` command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from mssante import demo
from mssante.admin.cli import admin
from mssante.app import ALL_ROLES, Gateway, Role, Store, run_with_store
from mssante.clock import SystemClock
from mssante.logs import configure_logging
from mssante.notify.cli import notify
from mssante.outbound.cli import queue
from mssante.routing.ins import InsError, parse_ins
from mssante.settings import (
    Settings,
    SettingsError,
    example_toml,
    load_settings,
    reference_markdown,
)
from mssante.store import audit, credentials, patient_changes
from mssante.store import directory as dirops
from mssante.store.keys import KeyDestroyedError
from mssante.store.migrations import SchemaError
from mssante.store.models import (
    Conversation,
    Delivery,
    Message,
    Notification,
    Patient,
    PatientLink,
    ProfileStatus,
)
from mssante.store.reading import conversation_names, message_key, view
from mssante.web.cli import issue_code_command
from mssante.workers import Supervisor, die_with_parent, install_signals, notify_ready

T = TypeVar("T")
console = Console(stderr=True)


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def _valid_ins(value: str) -> str:
    ins = parse_ins(value)
    if isinstance(ins, InsError):
        raise click.BadParameter(f"not a valid INS: {ins.detail}")
    return ins.value


ins_argument = click.argument("ins", callback=lambda _c, _p, v: _valid_ins(v))


async def _patient(session: Any, ins: str) -> Patient:
    patient = await dirops.get_patient(session, ins)
    if patient is None:
        raise click.ClickException("patient not found")
    return patient


class _Cli(click.Group):
    """Errors every command may meet, as one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SchemaError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyError as exc:
            if "master key" in str(exc):
                raise click.ClickException(str(exc).strip("'\"")) from exc
            raise


@click.group(cls=_Cli)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="MSSANTE_CONFIG",
    help="TOML configuration file (default: embedded defaults).",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """mssante: the patient side of MSSanté secure health messaging."""
    ctx.meta["config_path"] = config_path
    try:
        ctx.obj = load_settings(config_path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


# --- config ---------------------------------------------------------------------------


@main.group()
def config() -> None:
    """The configuration schema."""


@config.command("example")
def config_example() -> None:
    """Print an example configuration with every key and its default."""
    click.echo(example_toml(), nl=False)


@config.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown table) that README.md holds."""
    click.echo(reference_markdown(), nl=False)


@config.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Validate a configuration file (with the environment overrides)."""
    try:
        load_settings(file)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{file}: ok")


# --- store and audit checks ---------------------------------------------------------------


@main.group()
def store() -> None:
    """The message store."""


@store.command("check")
@click.option(
    "--remove-orphans",
    is_flag=True,
    help="Delete blobs no message refers to (left by crashes before a commit; "
    "only with every gateway stopped).",
)
@click.pass_context
def store_check(ctx: click.Context, remove_orphans: bool) -> None:
    """Check blobs, encryption and the audit chain; exit 1 on any problem."""
    from mssante.store.check import check_store

    async def run(st: Store) -> Any:
        with Progress(
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("messages checked", total=None)
            return await check_store(
                st.reads, st.blobs, st.keyring, progress=lambda n: progress.advance(task, n)
            )

    report = run_with_store(_settings(ctx), run)
    if remove_orphans and report.orphans:
        st = Store(_settings(ctx))
        for key in report.orphans:
            st.blobs.delete(key)
        click.echo(f"removed {len(report.orphans)} orphan blobs")
        report.problems = [p for p in report.problems if not p.startswith("orphan blob")]
        report.blobs -= len(report.orphans)  # the summary counts what is left
    for problem in report.problems:
        click.echo(f"PROBLEM {problem}")
    click.echo(
        f"{report.messages} messages, {report.blobs} blobs, {report.erased} erased, "
        f"{report.audit_events} audit events: "
        + ("ok" if report.ok else f"{len(report.problems)} problems")
    )
    if not report.ok:
        sys.exit(1)


@main.command()
@click.pass_context
def purge(ctx: click.Context) -> None:
    """Apply retention: old trash, finished outbound mail, old audit events, ended sessions."""
    from mssante.store.retention import purge as run_purge
    from mssante.store.retention import purge_sessions

    settings = _settings(ctx)

    async def run(st: Store) -> Any:
        now = SystemClock().now()
        report = await run_purge(
            st.writer,
            st.blobs,
            now=now,
            trash_days=settings.retention.trash_days,
            audit_days=settings.retention.audit_days,
            outbound_days=settings.retention.outbound_days,
            actor="cli",
        )
        sessions = await purge_sessions(
            st.writer,
            now=now,
            idle_seconds=settings.web.idle_timeout,
            lockout_seconds=settings.web.lockout_seconds,
        )
        return report, sessions

    r, sessions = run_with_store(settings, run)
    click.echo(
        f"purged {r.deliveries} trashed deliveries, {r.messages} messages, "
        f"{r.conversations} conversations, {r.outbound} finished outbound messages, "
        f"{r.audit_events} audit events, {sessions} ended webmail sessions"
    )


@main.group("audit")
def audit_group() -> None:
    """The audit trail."""


@audit_group.command("verify")
@click.option(
    "--expect-head",
    default=None,
    help="A head hash kept elsewhere (see `audit head`): detects removed newest events.",
)
@click.pass_context
def audit_verify(ctx: click.Context, expect_head: str | None) -> None:
    """Verify the hash chain of the audit trail; exit 1 if it was altered."""

    async def run(st: Store) -> tuple[int, list[str]]:
        async with st.reads() as session:
            return await audit.verify_stored_chain(session, expect_head=expect_head)

    count, problems = run_with_store(_settings(ctx), run)
    for problem in problems:
        click.echo(f"PROBLEM {problem}")
    click.echo(f"{count} events: " + ("chain intact" if not problems else "chain BROKEN"))
    if problems:
        sys.exit(1)


@audit_group.command("head")
@click.pass_context
def audit_head(ctx: click.Context) -> None:
    """Print the hash of the newest event (keep it outside this server)."""

    async def run(st: Store) -> str:
        async with st.reads() as session:
            return await audit.head(session)

    click.echo(run_with_store(_settings(ctx), run))


# --- accounts ---------------------------------------------------------------------------


@main.group()
def accounts() -> None:
    """Professional accounts of the submission listener."""


@accounts.command("add")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option(
    "--cert",
    "cert_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Bind this PEM client certificate (SASL EXTERNAL, applicative mailboxes).",
)
@click.option("--alias", "aliases", multiple=True, help="Another address it may send as.")
@click.option("--name", "display_name", default=None)
@click.pass_context
def accounts_add(
    ctx: click.Context,
    address: str,
    password_stdin: bool,
    cert_path: Path | None,
    aliases: tuple[str, ...],
    display_name: str | None,
) -> None:
    """Create an account (password hashed with argon2id)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from mssante.store.accounts import add_account, certificate_fingerprint, hash_password

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if password_stdin and not password:
        raise click.ClickException("empty password")
    fingerprint = None
    if cert_path is not None:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        fingerprint = certificate_fingerprint(cert.public_bytes(Encoding.DER))
    if password is None and fingerprint is None:
        raise click.ClickException("give --password-stdin or --cert")
    clock = SystemClock()

    async def run(st: Store) -> str:
        hashed = await hash_password(password) if password else None

        async def job(session: Any) -> str:
            account = await add_account(
                session,
                address=address,
                at=clock.now(),
                actor="cli",
                password_hash=hashed,
                certificate_sha256=fingerprint,
                aliases=list(aliases),
                display_name=display_name,
            )
            return account.address

        try:
            return await st.writer.run(job)
        except IntegrityError as exc:
            raise click.ClickException(
                "an account with this address or certificate exists"
            ) from exc

    click.echo(f"account {run_with_store(_settings(ctx), run)} created")


@accounts.command("list")
@click.pass_context
def accounts_list(ctx: click.Context) -> None:
    """List the accounts."""
    from mssante.store.models import Account

    async def run(st: Store) -> list[Account]:
        async with st.reads() as session:
            return list(await session.scalars(select(Account).order_by(Account.address)))

    table = Table("address", "aliases", "password", "certificate", "state")
    for a in run_with_store(_settings(ctx), run):
        table.add_row(
            a.address,
            ", ".join(a.aliases),
            "yes" if a.password_hash else "",
            (a.certificate_sha256 or "")[:16],
            "disabled" if a.disabled_at else "active",
        )
    Console().print(table)


@accounts.command("disable")
@click.argument("address")
@click.pass_context
def accounts_disable(ctx: click.Context, address: str) -> None:
    """Disable an account (audited); it can no longer authenticate."""
    from mssante.store.accounts import disable_account

    clock = SystemClock()

    async def run(st: Store) -> None:
        async def job(session: Any) -> None:
            try:
                await disable_account(session, address, at=clock.now(), actor="cli")
            except LookupError as exc:
                raise click.ClickException(str(exc)) from exc

        await st.writer.run(job)

    run_with_store(_settings(ctx), run)
    click.echo(f"account {address} disabled")


# --- keys -------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Master keys (encryption at rest)."""


@keys.command("rotate")
@click.option("--batch", default=1000, show_default=True, help="Data keys re-wrapped per commit.")
@click.pass_context
def keys_rotate(ctx: click.Context, batch: int) -> None:
    """Make a new master key current and re-wrap every data key under it.

    Message bodies are not re-encrypted.  If interrupted, run it again: it
    finishes the rotation in progress before starting a new one.
    """
    from mssante.store.crypto import new_key_file, set_current

    settings = _settings(ctx)
    directory = settings.store.keys_path()
    clock = SystemClock()

    async def rotate(store: Store) -> tuple[str, int]:
        pending = await store.writer.run(store.keyring.pending_rotation)
        if pending == 0:
            if settings.store.keys_dir is None and "MSSANTE_MASTER_KEY" in os.environ:
                raise click.ClickException(
                    "the current key comes from MSSANTE_MASTER_KEY: set a new value there instead"
                )
            mk = new_key_file(directory)
            set_current(directory, mk.id)
            store.keys.reload()
        total = 0
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            remaining = await store.writer.run(store.keyring.pending_rotation)
            task = progress.add_task("re-wrapping data keys", total=remaining)
            while True:
                n = await store.writer.run(
                    lambda s: store.keyring.rewrap_batch(s, at=clock.now(), limit=batch)
                )
                if n == 0:
                    break
                total += n
                progress.advance(task, n)
            current = store.keyring.provider.current().id

            async def audit_job(session: Any) -> None:
                await audit.append(
                    session,
                    at=clock.now(),
                    kind="keys.rotated",
                    actor="cli",
                    details={"master_key": current, "rewrapped": total},
                )

            await store.writer.run(audit_job)
        return current, total

    current, total = run_with_store(settings, rotate)
    click.echo(f"current master key {current}; {total} data keys re-wrapped")


# --- db -------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The database schema (migrations shipped with mssante)."""


def _schema_engine(settings: Settings) -> Any:
    from mssante.store.db import make_engine

    sync = settings.store.sqlite_synchronous
    return make_engine(settings.store.url(), synchronous=sync, writer=True)


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Show the database's schema revision and the one this mssante needs."""
    from sqlalchemy.engine import make_url

    from mssante.store import migrations
    from mssante.store.db import is_sqlite

    settings = _settings(ctx)
    url = settings.store.url()

    async def run() -> str | None:
        engine = _schema_engine(settings)
        try:
            return await migrations.current(engine)
        finally:
            await engine.dispose()

    path = make_url(url).database
    # No SQLite file yet: say so rather than create one.
    found = None if is_sqlite(url) and path and not Path(path).exists() else _run(run())
    expected = migrations.head()
    state = "up to date" if found == expected else f"run `{migrations.UPGRADE_COMMAND}`"
    click.echo(f"database schema: {found or 'none'}; this mssante needs: {expected} ({state})")


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Migrate the database schema to the revision this mssante needs.

    One transaction: on failure nothing changes.  Stop the gateways of the
    previous version first, start those of this version after.
    """
    from mssante.store import migrations

    settings = _settings(ctx)
    settings.store.data_dir.mkdir(parents=True, exist_ok=True)  # where SQLite lives

    async def run() -> tuple[str | None, str | None]:
        engine = _schema_engine(settings)
        try:
            before = await migrations.current(engine)
            await migrations.upgrade(engine)
            return before, await migrations.current(engine)
        finally:
            await engine.dispose()

    try:
        before, after = _run(run())
    except migrations.SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    if before == after:
        click.echo(f"database schema already at {after}")
    else:
        click.echo(f"database schema upgraded from {before or 'none'} to {after}")


# --- serve ---------------------------------------------------------------------------


async def seed_demo(store: Store, *, passwords: bool = False) -> int:
    """Create the demo patients that do not exist yet; return how many were made.

    With ``passwords``, the activated demo patients get the webmail password
    ``demo.PASSWORD`` if they have none (``serve --demo``).
    """
    clock = SystemClock()

    async def job(session: Any) -> int:
        made = 0
        for record in demo.DEMO_PATIENTS:
            if await dirops.get_patient(session, record.ins) is None:
                await dirops.upsert_patient(session, record, at=clock.now(), actor="demo")
                made += 1
        for record in demo.DEMO_PATIENTS:
            if record.representatives or record.helpers:
                patient = await dirops.get_patient(session, record.ins)
                assert patient is not None
                await dirops.set_links(session, patient, record, at=clock.now())
        return made

    made = await store.writer.run(job)
    if passwords:
        for record in demo.DEMO_PATIENTS:
            if record.status is ProfileStatus.ACTIVATED:
                async with store.reads() as session:
                    patient = await dirops.get_patient(session, record.ins)
                assert patient is not None
                await credentials.seed_password(store, patient.id, demo.PASSWORD, at=clock.now())
    return made


def _demo_banner(
    settings: Settings, port: int, submission_port: int | None, web_url: str | None
) -> str:
    d = settings.smtp.patient_domain
    where = f"{settings.smtp.host}:{port}"
    submission = f"{settings.submission.host}:{submission_port}" if submission_port else "off"
    webmail = ""
    if web_url:
        webmail = f"""or in the webmail, {web_url}/ :
  log in as {demo.ACTIVATED} with the password {demo.PASSWORD}
  (activation of {demo.CREATED_EMAIL}: .venv/bin/mssante patients issue-code --show INS)
"""
    return f"""
mssante is running, data in {settings.store.data_dir}
  MX on {where}: STARTTLS and a trust-space operator certificate required
  (development operator: {settings.store.data_dir}/tls/dev-operator.pem)
  submission on {submission}: STARTTLS + AUTH (mssante accounts add)

Demo patients:
  {demo.ACTIVATED}@{d}   activated
  {demo.CREATED_EMAIL}@{d}   created, insurer e-mail known
  {demo.CREATED_POSTAL}@{d}   created, postal statement
  {demo.MINOR}@{d}   minor, two legal representatives
  {demo.OPPOSED}@{d}   opposed  -> refused 550 5.2.1
  {demo.CLOSED}@{d}   closed   -> refused 550 5.2.1

Send a first message (in another terminal):
  .venv/bin/mssante send-test --port {port}
Then look at the mailbox:
  .venv/bin/mssante mailbox {demo.ACTIVATED}
{webmail}"""


ROLE_CHOICES = ["all", *(role.value for role in Role)]


def _roles(role: str) -> frozenset[Role]:
    return ALL_ROLES if role == "all" else frozenset({Role(role)})


@main.command()
@click.option(
    "--demo/--no-demo",
    "with_demo",
    default=False,
    help="Seed the demo patients and print how to send a first message.",
)
@click.option(
    "--role",
    type=click.Choice(ROLE_CHOICES),
    default="all",
    show_default=True,
    help="What this process runs: gateway (SMTP listeners), worker (notifications, bounces,"
    " outbound queue), web (webmail, admin API) or all of them. Every role serves the"
    " metrics and health probes.",
)
@click.option("--worker", is_flag=True, hidden=True, help="Run as a worker of serve (workers.py).")
@click.option("--worker-index", type=int, default=0, hidden=True)
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.option("--parent", type=int, default=None, hidden=True)
@click.pass_context
def serve(
    ctx: click.Context,
    with_demo: bool,
    role: str,
    worker: bool,
    worker_index: int,
    ready_fd: int | None,
    parent: int | None,
) -> None:
    """Run the service (or one role of it) until SIGTERM."""
    settings = _settings(ctx)
    roles = _roles(role)
    # smtp.workers: processes sharing the SMTP ports, for the gateway role only.
    workers = settings.smtp.workers if Role.GATEWAY in roles else 1
    configure_logging(settings.log, process_id=workers > 1)  # text or JSON lines (logs.py)
    if worker and parent is not None:
        die_with_parent(parent)
    if workers > 1 and not worker:
        _supervise(ctx, settings, role, with_demo)
        return
    if worker_index > 0:
        # The other roles run once, in the first worker process.
        roles = frozenset({Role.GATEWAY})

    async def run() -> None:
        # Handlers first: a SIGTERM during start-up still stops cleanly.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        install_signals(loop, stop.set)
        gateway = Gateway(settings, worker=worker_index, roles=roles)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload)
        await gateway.start()
        if with_demo:
            await seed_demo(gateway.store, passwords=True)
        if with_demo and Role.GATEWAY in roles:
            sub = gateway.submission[0].port if gateway.submission else None
            web = gateway.web.url if gateway.web is not None else None
            click.echo(_demo_banner(settings, gateway.smtp.port, sub, web))
        notify_ready(ready_fd)
        await stop.wait()
        await gateway.stop(grace=settings.smtp.shutdown_grace)

    asyncio.run(run())


def _supervise(ctx: click.Context, settings: Settings, role: str, with_demo: bool) -> None:
    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        install_signals(loop, stop.set)
        # Schema, keys, development certificates and demo patients, once.
        gateway = Gateway(settings)
        await gateway.store.open()
        try:
            if with_demo:
                await seed_demo(gateway.store, passwords=True)
        finally:
            await gateway.store.close()
        supervisor = Supervisor(settings, config_path=ctx.meta.get("config_path"), role=role)
        loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
        ports = await supervisor.start(settings.smtp.workers)
        click.echo(f"{settings.smtp.workers} workers listening on {settings.smtp.host}")
        if with_demo:
            web = None
            if settings.web.enabled and Role.WEB in _roles(role):
                scheme = "https" if settings.web.tls_cert else "http"
                web = f"{scheme}://{settings.web.host}:{settings.web.port}"
            click.echo(_demo_banner(settings, ports.smtp, ports.submission, web))
        watch = asyncio.create_task(supervisor.watch())
        await stop.wait()
        await supervisor.stop()
        watch.cancel()

    asyncio.run(run())


# --- send-test -------------------------------------------------------------------------

_DEMO_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def demo_message(to: str, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Dr Alice Durand <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Compte rendu de consultation"
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg["X-MSS-NIL"] = "mssante-send-test/0.1"
    msg.set_content(
        "Bonjour,\n\nVous trouverez ci-joint le compte rendu de votre consultation.\n\n"
        "Bien cordialement,\nDr Alice Durand\n"
    )
    msg.add_attachment(
        _DEMO_PDF, maintype="application", subtype="pdf", filename="compte-rendu.pdf"
    )
    return msg


@main.command("send-test")
@click.option(
    "--to",
    "to_ins",
    default=demo.ACTIVATED,
    show_default=True,
    help="INS of the patient to write to.",
)
@click.option("--sender", default="dr.durand@chu-exemple.mssante.fr", show_default=True)
@click.option("--host", default=None, help="Server address (default: from configuration).")
@click.option("--port", type=int, default=None, help="Server port (default: from configuration).")
@click.option(
    "--client-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Operator certificate (default: the development operator).",
)
@click.option(
    "--client-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None
)
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA of the server certificate (default: the development CA).",
)
@click.pass_context
def send_test(
    ctx: click.Context,
    to_ins: str,
    sender: str,
    host: str | None,
    port: int | None,
    client_cert: Path | None,
    client_key: Path | None,
    ca: Path | None,
) -> None:
    """Send a demo professional message (with a PDF) over STARTTLS, as a trust-space operator."""
    import aiosmtplib

    from mssante.smtp.tls import client_context

    settings = _settings(ctx)
    dev = settings.store.data_dir / "tls"
    ca = ca or (dev / "dev-ca.pem" if (dev / "dev-ca.pem").exists() else None)
    if client_cert is None and (dev / "dev-operator.pem").exists():
        client_cert, client_key = dev / "dev-operator.pem", dev / "dev-operator.key"
    tls = client_context(ca, client_cert, client_key or client_cert)
    to = f"{to_ins}@{settings.smtp.patient_domain}"
    msg = demo_message(to, sender)

    async def send() -> None:
        async with aiosmtplib.SMTP(
            hostname=host or settings.smtp.host,
            port=port or settings.smtp.port,
            start_tls=True,
            tls_context=tls,
        ) as client:
            _, reply = await client.send_message(msg)
            click.echo(f"250 {reply}")

    try:
        _run(send())
    except aiosmtplib.SMTPRecipientsRefused as exc:
        for err in exc.recipients:
            click.echo(f"refused: {err.code} {err.message}", err=True)
        sys.exit(1)
    except aiosmtplib.SMTPException as exc:
        raise click.ClickException(str(exc)) from exc


# --- mailbox ---------------------------------------------------------------------------


@main.command()
@ins_argument
@click.pass_context
def mailbox(ctx: click.Context, ins: str) -> None:
    """List the conversations and messages delivered to a patient."""

    async def show(store: Store) -> None:
        async with store.reads() as session:
            patient = await _patient(session, ins)
            rows = (
                await session.execute(
                    select(Conversation, Delivery, Message)
                    .join(Delivery, Delivery.conversation_id == Conversation.id)
                    .join(Message, Message.id == Delivery.message_id)
                    .where(Delivery.patient_id == patient.id)
                    .order_by(Conversation.id, Delivery.id)
                )
            ).all()
            table = Table(title=f"Mailbox {ins} ({patient.status.value})")
            for col in ("conv", "from", "subject", "received", "size", "attachments", "state"):
                table.add_column(col)
            for conv, delivery, message in rows:
                key = await message_key(session, store.keyring, message, patient.id)
                meta = view(message, key)
                names = await conversation_names(session, store.keyring, conv)
                state = "ended" if conv.ended_at else "open"
                table.add_row(
                    str(conv.id),
                    names["name"] or conv.professional,
                    meta.subject or "",
                    f"{delivery.delivered_at:%Y-%m-%d %H:%M}",
                    str(message.size),
                    ", ".join(a.name or a.type for a in meta.attachments),
                    state,
                )
            Console().print(table)

    try:
        run_with_store(_settings(ctx), show)
    except KeyDestroyedError as exc:
        raise click.ClickException(f"erased profile, nothing readable ({exc})") from exc


# --- patients --------------------------------------------------------------------------


@main.group()
def patients() -> None:
    """The patient directory."""


patients.add_command(issue_code_command)  # web/cli.py: provisional activation codes


@patients.command("show")
@ins_argument
@click.pass_context
def patients_show(ctx: click.Context, ins: str) -> None:
    """Show one patient's profile and links."""

    async def show(store: Store) -> None:
        async with store.reads() as session:
            patient = await _patient(session, ins)
            links = (
                await session.execute(
                    select(PatientLink.role, Patient.ins)
                    .join(Patient, Patient.id == PatientLink.adult_id)
                    .where(PatientLink.patient_id == patient.id)
                )
            ).all()
            attached_to = (
                await session.execute(
                    select(PatientLink.role, Patient.ins)
                    .join(Patient, Patient.id == PatientLink.patient_id)
                    .where(PatientLink.adult_id == patient.id)
                )
            ).all()
            pending = await session.scalar(
                select(func.count())
                .select_from(Notification)
                .where(Notification.patient_id == patient.id)
            )
        table = Table(show_header=False)
        for key in (
            "ins",
            "status",
            "given_name",
            "family_name",
            "birth_date",
            "activation_email",
            "insurer_email",
            "email_invalid",
            "postal_address",
            "created_at",
            "updated_at",
            "activated_at",
        ):
            value = getattr(patient, key)
            table.add_row(key, "" if value is None else str(value))
        for role, other in links:
            table.add_row(f"{role.value} (adult)", other)
        for role, other in attached_to:
            table.add_row(f"{role.value} of", other)
        table.add_row("notifications", str(pending))
        Console().print(table)

    run_with_store(_settings(ctx), show)


@patients.command("set-status")
@ins_argument
@click.argument("status", type=click.Choice([s.value for s in ProfileStatus]))
@click.pass_context
def patients_set_status(ctx: click.Context, ins: str, status: str) -> None:
    """Change a profile status (audited)."""
    clock = SystemClock()

    async def change(store: Store) -> str:
        async def job(session: Any) -> str:
            # The same change as the admin API's: sessions end on opposition
            # or closure, unused activation codes are revoked (patient_changes).
            result = await patient_changes.apply(
                session,
                patient_changes.PatientChange(ins, {"status": ProfileStatus(status)}),
                at=clock.now(),
                actor="cli",
                details={},
            )
            if isinstance(result, patient_changes.Refused):
                raise click.ClickException(result.detail)
            return status

        return await store.writer.run(job)

    click.echo(f"{ins}: {run_with_store(_settings(ctx), change)}")


@patients.command("erase")
@ins_argument
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def patients_erase(ctx: click.Context, ins: str, yes: bool) -> None:
    """Crypto-shred a closed profile: destroy its data key (audited, irreversible)."""
    if not yes:
        click.confirm(f"Destroy the data key of {ins}? Its messages become unreadable", abort=True)
    clock = SystemClock()

    async def erase(store: Store) -> bool:
        async def job(session: Any) -> bool:
            try:
                return await dirops.erase_patient(session, ins, at=clock.now(), actor="cli")
            except (LookupError, ValueError) as exc:
                raise click.ClickException(str(exc)) from exc

        return await store.writer.run(job)

    had_key = run_with_store(_settings(ctx), erase)
    click.echo(f"{ins}: data key destroyed" if had_key else f"{ins}: had no data key; marked")


@patients.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="File format (default: from the extension).",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Import the valid rows and report the invalid ones (default: import nothing "
    "when a row is invalid).",
)
@click.pass_context
def patients_import(ctx: click.Context, file: Path, fmt: str | None, skip_invalid: bool) -> None:
    """Import patients from CSV or JSON Lines (idempotent upsert by INS)."""
    from mssante.store.patient_import import import_patients

    settings = _settings(ctx)

    async def run(store: Store) -> Any:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(f"import {file.name}", total=None)
            return await import_patients(
                store.writer_sessions,
                file,
                clock=SystemClock(),
                actor="cli",
                fmt=fmt,
                skip_invalid=skip_invalid,
                progress=lambda n: progress.advance(task, n),
            )

    try:
        report = run_with_store(settings, run)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    for err in report.errors:
        click.echo(f"{file}:{err.line}: {err.reason}", err=True)
    click.echo(
        f"{report.rows} rows: {report.created} created, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} invalid"
        + ("" if report.imported else " - nothing imported")
    )
    if report.errors and not (skip_invalid and report.imported):
        sys.exit(1)


main.add_command(notify)
main.add_command(queue)
main.add_command(admin)
