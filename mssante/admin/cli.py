"""``mssante admin``: bearer tokens of the admin API."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click

from mssante.admin.auth import token_hash
from mssante.settings import Settings


@click.group()
def admin() -> None:
    """The admin API for the insurer's account system."""


@admin.command("new-token")
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File of accepted token hashes (default: admin.tokens_file).",
)
@click.pass_context
def new_token(ctx: click.Context, tokens_file: Path | None) -> None:
    """Make a bearer token: print it once, add its SHA-256 to the tokens file.

    Only the hash is kept: a lost token cannot be shown again; make another
    and delete the old line to revoke it.  A running server sees the change
    at its next request.
    """
    settings: Settings = ctx.find_root().obj
    path = tokens_file or settings.admin.tokens_file
    if path is None:
        raise click.ClickException(
            "no tokens file: give --tokens-file or set admin.tokens_file in the configuration"
        )
    token = secrets.token_urlsafe(32)  # 256 bits
    path.parent.mkdir(parents=True, exist_ok=True)
    # Appended, never rewritten: the server may be reading it; 0600 like the other keys.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="ascii") as fh:
        fh.write(token_hash(token) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    click.echo(token)
    click.echo(f"(its SHA-256 was added to {path}; the token is not stored)", err=True)
