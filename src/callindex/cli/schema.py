"""``callindex db``: create, migrate and inspect the schema."""

from __future__ import annotations

import click

from callindex.cli.common import database, database_option, duration, stderr, url

# The library is imported inside each command: listing this module for
# `callindex --help` must not load the database stack. (The defaults shown for
# `db adopt` are callindex.adoption's; tests/test_cli.py checks they agree.)


@click.group()
@database_option
def db() -> None:
    """Create, migrate and inspect the callindex schema."""


@db.command("upgrade")
@database_option
@click.argument("revision", default="head")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (no connection).")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str, sql: bool) -> None:
    """Upgrade the schema to REVISION (default: head); FROM:TO with --sql."""
    from callindex import migrations

    if sql:
        click.echo(migrations.offline_sql(url(ctx), revision), nl=False)
        return
    chosen = database(ctx)
    migrations.upgrade(chosen, revision)
    stderr().print(f"{chosen.display_url} is at revision {migrations.current_revision(chosen)}")


@db.command("downgrade")
@database_option
@click.argument("revision")
@click.option(
    "--force",
    is_flag=True,
    help="Also when calls holds recorded calls (a downgrade removes guards, or the tables).",
)
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str, force: bool) -> None:
    """Downgrade the schema to REVISION (`base` removes callindex's tables)."""
    from callindex import migrations

    chosen = database(ctx)
    migrations.downgrade(chosen, revision, force=force)
    current = migrations.current_revision(chosen) or "base"
    stderr().print(f"{chosen.display_url} is at revision {current}")


@db.command("current")
@database_option
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database (`none` without callindex) and,
    when it has callindex's tables, whether legacy-writers mode is on."""
    from callindex import migrations, numbering

    chosen = database(ctx)
    revision = migrations.current_revision(chosen)
    click.echo(revision or "none")
    if revision is not None:
        mode = "on" if numbering.legacy_writers(chosen) else "off"
        click.echo(f"legacy writers: {mode}")


@db.command("definitions")
@database_option
@click.pass_context
def db_definitions(ctx: click.Context) -> None:
    """Print the current definition of every callindex function and trigger
    (PostgreSQL), as `sql/definitions.postgresql.sql` holds them."""
    from callindex import migrations

    click.echo(migrations.current_definitions(database(ctx)), nl=False)


@db.command("legacy-writers")
@database_option
@click.argument("mode", type=click.Choice(["on", "off"]))
@click.pass_context
def db_legacy_writers(ctx: click.Context, mode: str) -> None:
    """Switch legacy-writers mode: `on` installs the numbering trigger, which
    numbers the calls of writers that do not use callindex (a rolling deploy);
    `off` removes it once they are gone (every insert is then faster)."""
    from callindex import migrations

    chosen = database(ctx)
    migrations.set_legacy_writers(chosen, mode == "on")
    stderr().print(f"{chosen.display_url}: legacy writers {mode}")


@db.command("partition")
@database_option
@click.option(
    "--months-ahead",
    type=int,
    default=3,
    show_default=True,
    help="Also make the partitions of this many months ahead.",
)
@click.pass_context
def db_partition(ctx: click.Context, months_ahead: int) -> None:
    """PostgreSQL: keep calls partitioned by created_at month, so that `purge`
    drops a month's partition instead of deleting its rows. Converts the table
    once (under an exclusive lock: writers wait while it is copied); run it
    again to make the months ahead."""
    from callindex import partitions

    chosen = database(ctx)
    created = partitions.partition(chosen, months_ahead)
    for name in created:
        click.echo(f"created {name}")
    stderr().print(f"{chosen.display_url}: calls partitioned by month")


@db.command("check")
@database_option
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit non-zero unless the schema matches the installed library."""
    from callindex import migrations

    status = migrations.check(database(ctx))
    click.echo(f"up to date at revision {status.current}")


@db.command("adopt")
@database_option
@click.option(
    "--batch-states",
    type=click.IntRange(1, 1_000_000),
    default=1_000,
    show_default=True,
    help="States whose counters are backfilled per transaction.",
)
@click.option(
    "--lock-timeout",
    metavar="DURATION",
    callback=duration,
    default="2s",
    show_default=True,
    help="PostgreSQL: longest wait for a lock in the schema step or a backfill batch (then retry).",
)
@click.option(
    "--legacy-writers",
    is_flag=True,
    help="Writers that do not use callindex still write calls: number theirs too "
    "(until `callindex db legacy-writers off`).",
)
@click.pass_context
def db_adopt(
    ctx: click.Context, batch_states: int, lock_timeout: float, legacy_writers: bool
) -> None:
    """Adopt an existing calls table: keep its rows and columns, add callindex's
    schema, backfill a counter per state. Safe while writers run; resumable."""
    from callindex import adoption

    report = adoption.adopt(
        database(ctx),
        batch_states=batch_states,
        lock_timeout_seconds=lock_timeout,
        legacy_writers=legacy_writers,
    )
    click.echo(
        f"adopted {report.calls:,} calls of {report.states:,} states: "
        f"index {report.index_seconds:.2f}s, schema {report.schema_seconds:.2f}s, "
        f"counters {report.backfill_seconds:.2f}s in {report.batches:,} batches"
    )
