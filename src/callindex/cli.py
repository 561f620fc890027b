"""The ``callindex`` command line."""

from __future__ import annotations

import os
from typing import Any

import click
from rich.console import Console

from callindex import migrations
from callindex.database import DEFAULT_URL, URL_ENVIRONMENT_VARIABLE, Database
from callindex.errors import CallIndexError
from callindex.recorder import CallRecorder

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class _Group(click.Group):
    """Turns every :class:`CallIndexError` into a one-line error and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CallIndexError as error:
            raise click.ClickException(str(error)) from error


def _url(ctx: click.Context) -> str:
    url: str = ctx.find_root().params["db"]
    return url


def _database(ctx: click.Context) -> Database:
    return Database(_url(ctx))


@click.group(cls=_Group)
@click.option(
    "--db",
    metavar="URL",
    default=lambda: os.environ.get(URL_ENVIRONMENT_VARIABLE, DEFAULT_URL),
    show_default=f"${URL_ENVIRONMENT_VARIABLE}, else {DEFAULT_URL}",
    help="Database URL: postgresql+psycopg://USER@HOST/DB or sqlite:///FILE.",
)
def cli(db: str) -> None:
    """Database-allocated call indices for audit trails."""


@cli.group()
def db() -> None:
    """Create, migrate and inspect the callindex schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (no connection).")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str, sql: bool) -> None:
    """Upgrade the schema to REVISION (default: head); FROM:TO with --sql."""
    if sql:
        click.echo(migrations.offline_sql(_url(ctx), revision), nl=False)
        return
    database = _database(ctx)
    migrations.upgrade(database, revision)
    _stderr.print(f"{database.display_url} is at revision {migrations.current_revision(database)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Downgrade the schema to REVISION (`base` removes callindex's tables)."""
    database = _database(ctx)
    migrations.downgrade(database, revision)
    current = migrations.current_revision(database) or "base"
    _stderr.print(f"{database.display_url} is at revision {current}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database (`none` without callindex)."""
    click.echo(migrations.current_revision(_database(ctx)) or "none")


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit non-zero unless the schema matches the installed library."""
    status = migrations.check(_database(ctx))
    click.echo(f"up to date at revision {status.current}")


@cli.group()
def state() -> None:
    """Manage node states."""


@state.command("open")
@click.argument("state_id", metavar="STATE")
@click.pass_context
def state_open(ctx: click.Context, state_id: str) -> None:
    """Register STATE so indices can be allocated for it (idempotent)."""
    with CallRecorder(_url(ctx)) as recorder:
        recorder.open_state(state_id)


@cli.command()
@click.argument("state_id", metavar="STATE")
@click.option("--count", default=1, show_default=True, help="How many consecutive indices.")
@click.pass_context
def allocate(ctx: click.Context, state_id: str, count: int) -> None:
    """Reserve indices of STATE and print the first, as a bare integer."""
    with CallRecorder(_url(ctx)) as recorder:
        click.echo(recorder.allocate_call_index(state_id, count))


def main() -> None:
    cli(prog_name="callindex")
