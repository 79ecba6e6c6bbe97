"""``mssante patients issue-code``: a provisional activation code, sent to the patient.

Registered into the ``patients`` group by mssante/cli.py; it imports
nothing from there (that module imports this one).
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from mssante.app import Store, run_with_store
from mssante.clock import SystemClock
from mssante.french import french_datetime
from mssante.notify.postal import LetterStyle
from mssante.notify.transport import TransportError
from mssante.routing.ins import InsError, parse_ins
from mssante.settings import Settings
from mssante.store import credentials
from mssante.store import directory as dirops
from mssante.store.models import Channel, ProfileStatus
from mssante.web.activation import (
    SERVICE_NAME,
    NoChannelError,
    activation_channel,
    letter_path,
    send_activation_code,
)


def _valid_ins(value: str) -> str:
    # The same check as the other `patients` commands (mssante/cli.py).
    ins = parse_ins(value)
    if isinstance(ins, InsError):
        raise click.BadParameter(f"not a valid INS: {ins.detail}")
    return ins.value


@dataclass(frozen=True, slots=True)
class _Sent:
    channel: Channel
    issued: credentials.IssuedCode
    where: str


@click.command("issue-code")
@click.argument("ins", callback=lambda _c, _p, v: _valid_ins(v))
@click.option(
    "--show",
    is_flag=True,
    help="Also print the code (development and demonstrations only: it is a credential).",
)
@click.option(
    "--service-name",
    default=SERVICE_NAME,
    show_default=True,
    help="Who a postal letter is from (sender block).",
)
@click.option(
    "--service-address",
    multiple=True,
    help="A line of a postal letter's sender block; repeat for each line.",
)
@click.pass_context
def issue_code_command(
    ctx: click.Context, ins: str, show: bool, service_name: str, service_address: tuple[str, ...]
) -> None:
    """Issue a provisional activation code for a created profile and send it.

    By e-mail to the address the insurer gave, else by post (a PDF in
    <data_dir>/postal/activation-<day>/ with its manifest.csv).  Any earlier
    unused code of the patient stops working.  The code is valid
    web.activation_code_days days and is never printed without --show.
    """
    settings: Settings = ctx.find_root().obj
    clock = SystemClock()
    style = LetterStyle(
        service_name=service_name,
        service_address=service_address,
        webmail_url=settings.notify.webmail_url,
        activation_url=settings.notify.activation_url,
    )

    async def run(store: Store) -> _Sent:
        async with store.reads() as session:
            patient = await dirops.get_patient(session, ins)
        if patient is None:
            raise click.ClickException("patient not found")
        if patient.status is not ProfileStatus.CREATED:
            raise click.ClickException(
                f"profile is {patient.status.value}: only a created profile"
                " (not activated yet) gets an activation code"
            )
        channel = activation_channel(patient)
        if channel is None:
            raise click.ClickException(
                "no usable e-mail address and no postal address: no way to send a code"
            )
        try:
            issued = await credentials.issue_activation_code(
                store, patient.id, at=clock.now(), channel=channel
            )
        except (LookupError, ValueError) as exc:  # changed since the read
            raise click.ClickException(str(exc)) from exc
        try:
            await send_activation_code(store, settings, clock, patient, issued, style=style)
        except (NoChannelError, TransportError) as exc:
            raise click.ClickException(
                f"code issued but not sent ({exc}); run issue-code again"
            ) from exc
        where = "e-mail"
        if channel is Channel.POSTAL:
            where = f"postal letter {letter_path(settings, issued)}"
        return _Sent(channel, issued, where)

    sent = run_with_store(settings, run)
    click.echo(
        f"{ins}: activation code sent by {sent.where},"
        f" valid until {french_datetime(sent.issued.expires_at)} (Europe/Paris)"
    )
    if show:
        click.echo(f"code: {sent.issued.code}")
