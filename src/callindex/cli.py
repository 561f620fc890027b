"""The ``callindex`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from callindex import adoption, audit, migrations, numbering
from callindex.database import Database
from callindex.errors import CallIndexError
from callindex.recorder import CallRecorder
from callindex.resources import resource_dir
from callindex.urls import DEFAULT_URL, URL_ENVIRONMENT_VARIABLE

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class _Group(click.Group):
    """Turns every :class:`CallIndexError` into a one-line error and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CallIndexError as error:
            raise click.ClickException(str(error)) from error


def _stdout() -> Console:
    # Piped output is not cut to 80 columns.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _url(ctx: click.Context) -> str:
    url: str = ctx.find_root().params["db"]
    return url


def _database(ctx: click.Context) -> Database:
    return Database(_url(ctx))


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return audit.parse_duration(value)
    except CallIndexError as error:
        raise click.BadParameter(str(error), ctx, param) from error


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
@click.option(
    "--force",
    is_flag=True,
    help="Also when calls holds recorded calls (a downgrade removes guards, or the tables).",
)
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str, force: bool) -> None:
    """Downgrade the schema to REVISION (`base` removes callindex's tables)."""
    database = _database(ctx)
    migrations.downgrade(database, revision, force=force)
    current = migrations.current_revision(database) or "base"
    _stderr.print(f"{database.display_url} is at revision {current}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database (`none` without callindex) and,
    when it has callindex's tables, whether legacy-writers mode is on."""
    database = _database(ctx)
    revision = migrations.current_revision(database)
    click.echo(revision or "none")
    if revision is not None:
        mode = "on" if numbering.legacy_writers(database) else "off"
        click.echo(f"legacy writers: {mode}")


@db.command("definitions")
@click.pass_context
def db_definitions(ctx: click.Context) -> None:
    """Print the current definition of every callindex function and trigger
    (PostgreSQL), as `sql/definitions.postgresql.sql` holds them."""
    click.echo(migrations.current_definitions(_database(ctx)), nl=False)


@db.command("legacy-writers")
@click.argument("mode", type=click.Choice(["on", "off"]))
@click.pass_context
def db_legacy_writers(ctx: click.Context, mode: str) -> None:
    """Switch legacy-writers mode: `on` installs the numbering trigger, which
    numbers the calls of writers that do not use callindex (a rolling deploy);
    `off` removes it once they are gone (every insert is then faster)."""
    database = _database(ctx)
    migrations.set_legacy_writers(database, mode == "on")
    _stderr.print(f"{database.display_url}: legacy writers {mode}")


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit non-zero unless the schema matches the installed library."""
    status = migrations.check(_database(ctx))
    click.echo(f"up to date at revision {status.current}")


@db.command("adopt")
@click.option(
    "--batch-states",
    default=adoption.DEFAULT_BATCH_STATES,
    show_default=True,
    help="States whose counters are backfilled per transaction.",
)
@click.option(
    "--lock-timeout",
    metavar="DURATION",
    callback=_duration,
    default=f"{adoption.DEFAULT_LOCK_TIMEOUT_SECONDS:g}s",
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
    report = adoption.adopt(
        _database(ctx),
        batch_states=batch_states,
        lock_timeout_seconds=lock_timeout,
        legacy_writers=legacy_writers,
    )
    click.echo(
        f"adopted {report.calls:,} calls of {report.states:,} states: "
        f"index {report.index_seconds:.2f}s, schema {report.schema_seconds:.2f}s, "
        f"counters {report.backfill_seconds:.2f}s in {report.batches:,} batches"
    )


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


@cli.command("calls")
@click.argument("state_id", metavar="STATE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def calls_command(ctx: click.Context, state_id: str, as_json: bool) -> None:
    """List the calls of STATE in index order."""
    with CallRecorder(_url(ctx)) as recorder:
        recorded = recorder.calls(state_id)
    if as_json:
        click.echo(json.dumps([call.as_json() for call in recorded], indent=2))
        return
    table = Table("index", "type", "status", "latency ms", "created", "call id")
    for call in recorded:
        latency = "" if call.latency_ms is None else f"{call.latency_ms:.1f}"
        table.add_row(
            str(call.call_index),
            call.call_type,
            call.status,
            latency,
            call.created_at.isoformat(timespec="milliseconds"),
            call.call_id,
        )
    _stdout().print(table)


@cli.command()
@click.option(
    "--pending-older-than",
    metavar="DURATION",
    callback=_duration,
    default="15m",
    show_default=True,
    help="Report pending calls at least this old (90s, 15m, 2h).",
)
@click.option(
    "--hashes",
    is_flag=True,
    help="Also recompute every payload hash from the stored payload (reads every call).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, pending_older_than: float, hashes: bool, as_json: bool) -> None:
    """Check the audit trail's invariants; exit 1 on a violation."""
    with CallRecorder(_url(ctx)) as recorder:
        report = recorder.verify(pending_older_than, hashes=hashes)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        ctx.exit(1)


def _print_report(report: audit.Report) -> None:
    console = _stdout()
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(report.calls_by_status.items()))
    console.print(f"{report.states} states; calls: {statuses or 'none'}")
    checks = [
        ("duplicate (state, index) pairs", report.duplicates, True),
        ("counters behind their calls (run `callindex repair`)", report.counters_behind, True),
        ("gaps between recorded calls", report.gaps, False),
        ("reserved indices above the last call", report.unused_reservations, False),
        (
            f"pending calls older than {report.pending_threshold_seconds:g}s "
            "(run `callindex sweep`)",
            report.stale_pending,
            False,
        ),
    ]
    if report.hashes_checked is not None:
        schemes = ", ".join(f"{n} {s}" for s, n in sorted(report.hashes_checked.items()))
        checks[2:2] = [
            (
                f"payload hashes that differ ({schemes or 'none'} checked)",
                report.hash_mismatches,
                True,
            ),
            (
                "hashes of rows recorded before 0.2 that differ "
                "(jsonb may have rewritten their numbers)",
                report.legacy_hash_mismatches,
                False,
            ),
        ]
    for label, found, violation in checks:
        mark = (
            "[red]FAIL[/]"
            if found and violation
            else "[yellow]note[/]"
            if found
            else "[green]ok[/]"
        )
        console.print(f"{mark}  {len(found)} {label}")
        for item in found[:10]:
            console.print("      " + ", ".join(f"{k}={v}" for k, v in item.items()))
        if len(found) > 10:
            console.print(f"      ... and {len(found) - 10} more (use --json for all)")
    if report.gaps or report.unused_reservations:
        console.print(f"gaps: {audit.GAP_CAUSE}")
    console.print("[green]verify: ok[/]" if report.ok else "[red]verify: FAILED[/]")


@cli.command()
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=_duration,
    required=True,
    help="Age of pending calls to abandon (90s, 15m, 2h).",
)
@click.option(
    "--state-prefix",
    default="",
    metavar="PREFIX",
    help="Only calls of states whose id starts with PREFIX.",
)
@click.pass_context
def sweep(ctx: click.Context, older_than: float, state_prefix: str) -> None:
    """Mark pending calls at least DURATION old as abandoned (their worker died)."""
    with CallRecorder(_url(ctx)) as recorder:
        swept = recorder.sweep(older_than, state_prefix=state_prefix)
    for call in swept:
        click.echo(f"abandoned {call['state_id']}#{call['call_index']} ({call['call_id']})")
    _stderr.print(f"{len(swept)} pending calls marked abandoned")


@cli.command()
@click.pass_context
def repair(ctx: click.Context) -> None:
    """Move counters that are behind their calls past the highest recorded index."""
    with CallRecorder(_url(ctx)) as recorder:
        moved = recorder.repair()
    for state in moved:
        click.echo(f"{state['state_id']}: next_index is now {state['next_index']}")
    _stderr.print(f"{len(moved)} counters repaired")


@cli.command()
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes.  [default: the number of CPUs]",
)
@click.option(
    "--states", type=click.IntRange(1, 10_000), default=40, show_default=True, help="Node states."
)
@click.option(
    "--calls-per-state",
    type=click.IntRange(1, 1_000),
    default=10,
    show_default=True,
    help="Logical calls per state (even: HTTP, odd: LLM).",
)
@click.option(
    "--fault-rate-429",
    type=click.FloatRange(0, 1),
    default=0.08,
    show_default=True,
    help="Share of requests answered 429 with retry-after-ms.",
)
@click.option(
    "--fault-rate-503",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of requests answered 503.",
)
@click.option(
    "--fault-rate-slow",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of requests answered after 0.3 s.",
)
@click.option(
    "--fault-rate-drop",
    type=click.FloatRange(0, 1),
    default=0.03,
    show_default=True,
    help="Share of requests whose connection is dropped unanswered.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fault draws.")
@click.option("--kill-one", is_flag=True, help="SIGKILL one worker mid-call after a third.")
@click.option("--legacy", is_flag=True, help="Replay the work with in-process counters too.")
@click.pass_context
def demo(
    ctx: click.Context,
    workers: int | None,
    states: int,
    calls_per_state: int,
    fault_rate_429: float,
    fault_rate_503: float,
    fault_rate_slow: float,
    fault_rate_drop: float,
    seed: int,
    kill_one: bool,
    legacy: bool,
) -> None:
    """Show callindex at work: worker processes, a flaky loopback API, retries, a verdict.

    Without --db (and $CALLINDEX_DATABASE_URL) it uses a fresh SQLite file
    callindex-demo.db in the current folder; with one, states of its own.
    Exits 1 when an invariant of the audit trail fails.
    """
    from click.core import ParameterSource

    from callindex.demo import DemoConfig, run_demo
    from callindex.loopback import Faults

    rates = (fault_rate_429, fault_rate_503, fault_rate_slow, fault_rate_drop)
    if sum(rates) > 1 + 1e-9:
        raise click.UsageError(f"the fault rates add up to {sum(rates):g}; at most 1 is possible")
    if kill_one and workers == 1:
        raise click.UsageError("--kill-one needs --workers 2 or more: the others finish the work")
    if workers is None:
        workers = max(os.cpu_count() or 1, 2 if kill_one else 1)
    given = (
        ctx.find_root().get_parameter_source("db") is not ParameterSource.DEFAULT
        or URL_ENVIRONMENT_VARIABLE in os.environ
    )
    faults = Faults(
        rate_429=fault_rate_429,
        rate_503=fault_rate_503,
        rate_slow=fault_rate_slow,
        rate_drop=fault_rate_drop,
        seed=seed,
    )
    config = DemoConfig(
        workers=workers,
        states=states,
        calls_per_state=calls_per_state,
        faults=faults,
        kill_one=kill_one,
        legacy=legacy,
        url=_url(ctx) if given else None,
    )
    # Progress and notes go to stderr, the verdict to stdout; neither is cut to 80 columns.
    progress = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
    ctx.exit(run_demo(config, console=_stdout(), progress_console=progress))


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, arguments: tuple[str, ...]) -> None:
    """Measure callindex against the floor and today's alternatives (bench/run.py;
    `callindex bench --help` lists its options)."""
    from click.core import ParameterSource

    script = resource_dir("bench") / "run.py"
    given = ctx.find_root().get_parameter_source("db") is not ParameterSource.DEFAULT
    database = ["--db", _url(ctx)] if given or URL_ENVIRONMENT_VARIABLE in os.environ else []
    ctx.exit(subprocess.call([sys.executable, str(script), *database, *arguments]))


def main() -> None:
    cli(prog_name="callindex")
