"""``mssante notify``: run the worker, list notifications, retry failed ones."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select, update

from mssante.app import Store, run_with_store
from mssante.clock import SystemClock
from mssante.notify.postal_cli import postal_batch
from mssante.notify.service import Notifier
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings
from mssante.store import audit
from mssante.store.models import Notification, NotificationStatus, Patient

T = TypeVar("T")


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.find_root().obj
    return settings


def _notifier(settings: Settings, store: Store) -> Notifier:
    return Notifier(
        settings,
        store,
        clock=SystemClock(),
        pseudonym=Pseudonymizer.from_key_file(settings.store.data_dir / "pseudonym.key"),
    )


@click.group()
def notify() -> None:
    """Notifications of new messages (e-mail worker)."""


@notify.command("run")
@click.option("--once", is_flag=True, help="Send what is due now, then exit.")
@click.pass_context
def run(ctx: click.Context, once: bool) -> None:
    """Run the e-mail notification worker (several may share a PostgreSQL database)."""
    settings = _settings(ctx)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def work(store: Store) -> int:
        notifier = _notifier(settings, store)
        try:
            if once:
                return await notifier.worker.run_until_idle()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await notifier.start()
            await stop.wait()
            return notifier.worker.sent
        finally:
            await notifier.stop()

    sent = run_with_store(settings, work)
    click.echo(f"{sent} notification e-mails attempted" if once else f"stopped after {sent} sent")


@notify.command("list")
@click.option("--failed", is_flag=True, help="Only failed notifications.")
@click.option("--pending", is_flag=True, help="Only pending notifications.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.pass_context
def list_(ctx: click.Context, failed: bool, pending: bool, limit: int) -> None:
    """List notifications, newest first."""
    statuses = [
        s
        for s, on in ((NotificationStatus.FAILED, failed), (NotificationStatus.PENDING, pending))
        if on
    ]

    async def show(store: Store) -> None:
        query = (
            select(Notification, Patient.ins)
            .join(Patient, Patient.id == Notification.recipient_id)
            .order_by(Notification.id.desc())
            .limit(limit)
        )
        if statuses:
            query = query.where(Notification.status.in_(statuses))
        async with store.reads() as session:
            rows = (await session.execute(query)).all()
        table = Table(title="Notifications")
        for col in ("id", "to (INS)", "channel", "e-mail", "status", "attempts", "next", "error"):
            table.add_column(col)
        for n, ins in rows:
            table.add_row(
                str(n.id),
                ins,
                n.channel.value,
                n.email or "",
                n.status.value,
                str(n.attempts),
                f"{n.next_attempt_at:%Y-%m-%d %H:%M:%S}" if n.next_attempt_at else "",
                (n.last_error or "")[:80],
            )
        Console().print(table)

    run_with_store(_settings(ctx), show)


@notify.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-failed", is_flag=True, help="Retry every failed notification.")
@click.pass_context
def retry(ctx: click.Context, ids: tuple[int, ...], all_failed: bool) -> None:
    """Send failed notifications again (attempts start over)."""
    if bool(ids) == all_failed:
        raise click.UsageError("give notification ids or --all-failed")
    clock = SystemClock()

    async def requeue(store: Store) -> int:
        async def job(session: Any) -> int:
            query = select(Notification.id, Notification.recipient_id).where(
                Notification.status == NotificationStatus.FAILED
            )
            if ids:
                query = query.where(Notification.id.in_(ids))
            found = (await session.execute(query)).all()
            if not found:
                return 0
            now = clock.now()
            await session.execute(
                update(Notification)
                .where(Notification.id.in_([i for i, _ in found]))
                .values(
                    status=NotificationStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    claimed_by=None,
                    claimed_until=None,
                )
                .execution_options(synchronize_session=False)
            )
            by_recipient: dict[int, list[int]] = {}
            for nid, rid in found:
                by_recipient.setdefault(rid, []).append(nid)
            for rid, nids in by_recipient.items():
                await audit.append(
                    session,
                    at=now,
                    kind="notification.retried",
                    actor="cli",
                    patient_id=rid,
                    details={"notifications": nids},
                )
            return len(found)

        return await store.writer.run(job)

    count = run_with_store(_settings(ctx), requeue)
    if ids and count < len(set(ids)):
        click.echo(
            f"{len(set(ids)) - count} of the given ids are not failed notifications", err=True
        )
    click.echo(f"{count} notifications queued again")


notify.add_command(postal_batch)
