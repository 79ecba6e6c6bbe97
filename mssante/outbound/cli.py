"""``mssante queue``: run the outbound worker and operate the queue.

Rows are recipients (one message to three addresses is three rows): every
command takes recipient ids as ``queue list`` shows them.  Nothing here
shows or logs message content.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import delete, func, select, update

from mssante.app import Store, TrustConfig, run_with_store
from mssante.clock import SystemClock
from mssante.outbound.replies import non_delivery_recorder
from mssante.outbound.worker import build_worker
from mssante.settings import Settings
from mssante.store import audit
from mssante.store.models import OutboundMessage, OutboundRecipient, OutboundStatus

T = TypeVar("T")
R = OutboundRecipient
ACTOR = "cli"


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.find_root().obj
    return settings


@click.group()
def queue() -> None:
    """The outbound queue: replies, read receipts and DSNs leaving for operators."""


@queue.command("run")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.pass_context
def run(ctx: click.Context, once: bool) -> None:
    """Run the outbound delivery worker (several may share a PostgreSQL database)."""
    settings = _settings(ctx)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def work(store: Store) -> str:
        trust = TrustConfig(settings)
        worker = build_worker(
            settings,
            store,
            trust,
            clock=SystemClock(),
            on_failure=[non_delivery_recorder(store)],
        )
        if once:
            handled = await worker.run_until_idle()
            return f"{handled} recipients handled: {worker.sent} sent, {worker.failed} failed"

        async def watch_trust() -> None:
            # As the gateway does: a whitelist change applies without a restart.
            while True:
                await asyncio.sleep(settings.trust.reload_interval)
                trust.reload_if_changed()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, trust.reload)
        watch = asyncio.create_task(watch_trust())
        worker.start()
        await stop.wait()
        watch.cancel()
        await worker.stop()  # the pass under way finishes and is recorded
        await asyncio.gather(watch, return_exceptions=True)
        return f"stopped: {worker.sent} sent, {worker.failed} failed"

    click.echo(run_with_store(settings, work))


@queue.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in OutboundStatus]),
    help="Only these statuses (repeatable); default: all.",
)
@click.option("--limit", type=int, default=100, show_default=True)
@click.pass_context
def list_(ctx: click.Context, statuses: tuple[str, ...], limit: int) -> None:
    """List queued recipients, newest first (no content)."""

    async def show(store: Store) -> None:
        query = (
            select(R, OutboundMessage.kind, OutboundMessage.ref)
            .join(OutboundMessage, OutboundMessage.id == R.outbound_id)
            .order_by(R.id.desc())
            .limit(limit)
        )
        if statuses:
            query = query.where(R.status.in_([OutboundStatus(s) for s in statuses]))
        async with store.reads() as session:
            rows = (await session.execute(query)).all()
        table = Table(title="Outbound queue")
        for col in (
            "id",
            "message",
            "kind",
            "domain",
            "recipient",
            "status",
            "attempts",
            "next attempt (UTC)",
            "last error",
        ):
            table.add_column(col)
        for r, kind, ref in rows:
            table.add_row(
                str(r.id),
                ref,
                str(kind),
                r.domain,
                r.address,
                str(r.status),
                str(r.attempts),
                f"{r.next_attempt_at:%Y-%m-%d %H:%M:%S}" if r.next_attempt_at else "",
                (r.last_error or "")[:80],
            )
        Console(width=250).print(table)

    run_with_store(_settings(ctx), show)


def _change(
    ctx: click.Context,
    ids: tuple[int, ...],
    *,
    from_statuses: tuple[OutboundStatus, ...],
    values: Callable[[Any], dict[str, Any]],
    event: str,
) -> int:
    """Move recipients ``ids`` (or all in ``from_statuses`` when ids is empty) and audit it."""
    settings = _settings(ctx)
    clock = SystemClock()

    async def apply(store: Store) -> int:
        async def job(session: Any) -> int:
            query = select(R.id, R.outbound_id).where(R.status.in_(from_statuses))
            if ids:
                query = query.where(R.id.in_(ids))
            found = (await session.execute(query)).all()
            if not found:
                return 0
            now = clock.now()
            await session.execute(
                update(R)
                .where(R.id.in_([i for i, _ in found]))
                .values(**values(now))
                .execution_options(synchronize_session=False)
            )
            await _audit(session, event, found, now)
            return len(found)

        return await store.writer.run(job)

    count = run_with_store(settings, apply)
    wanted = len(set(ids))
    if ids and count < wanted:
        names = "/".join(s.value for s in from_statuses)
        click.echo(f"{wanted - count} of the given ids are not {names} recipients", err=True)
    return count


async def _audit(session: Any, event: str, found: list[Any], now: Any) -> None:
    by_message: dict[int, list[int]] = {}
    for rid, outbound_id in found:
        by_message.setdefault(outbound_id, []).append(rid)
    for outbound_id, rids in by_message.items():
        patient_id = await session.scalar(
            select(OutboundMessage.patient_id).where(OutboundMessage.id == outbound_id)
        )
        await audit.append(
            session,
            at=now,
            kind=event,
            actor=ACTOR,
            patient_id=patient_id,
            details={"outbound": outbound_id, "recipients": sorted(rids)},
        )


@queue.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-failed", is_flag=True, help="Retry every failed recipient.")
@click.pass_context
def retry(ctx: click.Context, ids: tuple[int, ...], all_failed: bool) -> None:
    """Deliver failed recipients again, now (attempts and maximum age start over)."""
    if bool(ids) == all_failed:
        raise click.UsageError("give recipient ids or --all-failed")
    max_age = timedelta(seconds=_settings(ctx).outbound.max_age)
    count = _change(
        ctx,
        ids,
        from_statuses=(OutboundStatus.FAILED,),
        values=lambda now: {
            "status": OutboundStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "expires_at": now + max_age,
            "failed_at": None,
            "claimed_by": None,
            "claimed_until": None,
        },
        event="outbound.retried",
    )
    click.echo(f"{count} recipients queued again")


@queue.command("hold")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_context
def hold(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Set pending recipients aside: no delivery until `queue release`."""
    count = _change(
        ctx,
        ids,
        from_statuses=(OutboundStatus.PENDING,),
        values=lambda now: {"status": OutboundStatus.HELD},
        event="outbound.held",
    )
    click.echo(f"{count} recipients held")


@queue.command("release")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_context
def release(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Put held recipients back in the queue, due now."""
    count = _change(
        ctx,
        ids,
        from_statuses=(OutboundStatus.HELD,),
        values=lambda now: {
            "status": OutboundStatus.PENDING,
            "next_attempt_at": now,
            "claimed_by": None,
            "claimed_until": None,
        },
        event="outbound.released",
    )
    click.echo(f"{count} recipients released")


@queue.command("delete")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_context
def delete_(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Remove recipients that are not sent; a message left without recipients goes too."""
    settings = _settings(ctx)
    clock = SystemClock()

    async def apply(store: Store) -> tuple[int, list[str]]:
        async def job(session: Any) -> tuple[int, list[str]]:
            found = (
                await session.execute(
                    select(R.id, R.outbound_id).where(
                        R.id.in_(ids), R.status != OutboundStatus.SENT
                    )
                )
            ).all()
            if not found:
                return 0, []
            now = clock.now()
            await _audit(session, "outbound.deleted", found, now)
            await session.execute(
                delete(R)
                .where(R.id.in_([i for i, _ in found]))
                .execution_options(synchronize_session=False)
            )
            emptied = []
            for outbound_id in {o for _, o in found}:
                left = await session.scalar(
                    select(func.count()).select_from(R).where(R.outbound_id == outbound_id)
                )
                if not left:
                    message = await session.get(OutboundMessage, outbound_id)
                    emptied.append(message.blob_key)
                    await session.delete(message)
            return len(found), emptied

        count, blobs = await store.writer.run(job)
        # After the commit: a crash before this leaves an orphan blob, never a
        # row without its bytes.
        for key in blobs:
            await asyncio.to_thread(store.blobs.delete, key)
        return count, blobs

    count, blobs = run_with_store(settings, apply)
    if count < len(set(ids)):
        click.echo(f"{len(set(ids)) - count} of the given ids are unknown or sent", err=True)
    click.echo(f"{count} recipients deleted, {len(blobs)} messages removed")
