"""``mssante notify postal-batch``: the postal activity statements of a period."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mssante.app import Store
from mssante.clock import SystemClock
from mssante.french import PARIS
from mssante.notify.postal import (
    BatchError,
    LetterStyle,
    Period,
    PostalReport,
    check_batch_name,
    default_batch_name,
    parse_period,
    run_batch,
)
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings

console = Console(stderr=True)

DEFAULT_SERVICE_NAME = "Mon espace santé"
_DAY = click.DateTime(formats=["%Y-%m-%d"])


def _period(month: str | None, since: datetime | None, until: datetime | None) -> Period:
    try:
        return parse_period(
            month,
            since.date() if since is not None else None,
            until.date() if until is not None else None,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def summary(report: PostalReport) -> list[str]:
    p = report.period
    lines = [f"batch {report.batch}, period {p.start} to {p.end} (Europe/Paris)"]
    if report.letters:
        lines.append(f"{report.letters} letters ({report.events} events) in {report.out_dir}")
    else:
        lines.append("nothing pending for this period: no letter made")
    if report.manifest is not None:
        lines.append(f"manifest {report.manifest} ({report.manifest_letters} letters)")
    if report.skipped:
        lines.append(
            f"{len(report.skipped)} recipients skipped, no postal address "
            f"(notifications left pending): {', '.join(report.skipped)}"
        )
    if report.changed:
        lines.append(
            f"{report.changed} recipients whose notifications changed during the run were "
            "left pending: run the batch again"
        )
    if report.orphans:
        lines.append(
            f"{len(report.orphans)} PDF files in {report.out_dir} have no letter record "
            f"(interrupted run), do not print them: {', '.join(report.orphans)}"
        )
    return lines


@click.command("postal-batch")
@click.option("--period", "month", metavar="YYYY-MM", help="A calendar month (Europe/Paris).")
@click.option("--since", type=_DAY, default=None, help="First day (YYYY-MM-DD), with --until.")
@click.option("--until", type=_DAY, default=None, help="Last day, included (YYYY-MM-DD).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default: <data_dir>/postal/<batch>).",
)
@click.option(
    "--batch",
    "batch_name",
    default=None,
    help="Batch name (default: <period>-<UTC time>); give an interrupted batch's name "
    "to complete it and rewrite its manifest.",
)
@click.option(
    "--service-name",
    default=DEFAULT_SERVICE_NAME,
    show_default=True,
    help="Who the letters are from (sender block and text).",
)
@click.option(
    "--service-address",
    multiple=True,
    help="A line of the sender block (return address); repeat for each line.",
)
@click.pass_context
def postal_batch(
    ctx: click.Context,
    month: str | None,
    since: datetime | None,
    until: datetime | None,
    out_dir: Path | None,
    batch_name: str | None,
    service_name: str,
    service_address: tuple[str, ...],
) -> None:
    """Make the postal activity statements of a period: one PDF per person and a manifest.

    Takes the pending postal notifications created in the period, writes one
    letter per person told (a patient, or a minor's legal representative)
    and manifest.csv for the print provider.  Running it again for the same
    period makes no letter twice.  People without a postal address are
    skipped and reported (pseudonymised); their notifications stay pending.
    """
    settings: Settings = ctx.obj
    period = _period(month, since, until)
    clock = SystemClock()
    batch = batch_name or default_batch_name(period, clock.now())
    try:
        check_batch_name(batch)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--batch") from exc
    out = out_dir or settings.store.data_dir / "postal" / batch
    style = LetterStyle(
        service_name=service_name,
        service_address=service_address,
        webmail_url=settings.notify.webmail_url,
        activation_url=settings.notify.activation_url,
    )
    pseudonym = Pseudonymizer.from_key_file(settings.store.data_dir / "pseudonym.key")

    async def run() -> PostalReport:
        store = Store(settings)
        await store.open()
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task(f"letters {period.label}", total=None)
                return await run_batch(
                    store.reads,
                    store.writer_sessions,
                    store.keyring,
                    period=period,
                    out_dir=out,
                    batch=batch,
                    clock=clock,
                    style=style,
                    pseudonym=pseudonym,
                    actor="cli",
                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except BatchError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in summary(report):
        click.echo(line)
    if period.end >= clock.now().astimezone(PARIS).date():
        click.echo(
            "note: the period is not over; messages received later in it will be in "
            "another letter when the batch runs again"
        )
