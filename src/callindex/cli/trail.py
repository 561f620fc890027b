"""The trail's subcommands: open states, allocate, list calls, verify, sweep, purge,
repair, seal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from callindex.cli.common import (
    database_option,
    duration,
    printable,
    recorder,
    shown,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from callindex.audit import Report
    from callindex.seals import Seal


@click.group()
@database_option
def state() -> None:
    """Manage node states."""


@state.command("open")
@database_option
@click.argument("state_id", metavar="STATE")
@click.pass_context
def state_open(ctx: click.Context, state_id: str) -> None:
    """Register STATE so indices can be allocated for it (idempotent)."""
    with recorder(ctx) as opened:
        opened.open_state(state_id)


@click.command()
@database_option
@click.argument("state_id", metavar="STATE")
@click.option("--count", default=1, show_default=True, help="How many consecutive indices.")
@click.pass_context
def allocate(ctx: click.Context, state_id: str, count: int) -> None:
    """Reserve indices of STATE and print the first, as a bare integer."""
    with recorder(ctx) as opened:
        click.echo(opened.allocate_call_index(state_id, count))


@click.command("calls")
@database_option
@click.argument("state_id", metavar="STATE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def calls_command(ctx: click.Context, state_id: str, as_json: bool) -> None:
    """List the calls of STATE in index order."""
    with recorder(ctx) as opened:
        recorded = opened.calls(state_id)
        if not recorded and not opened.is_open(state_id):
            from callindex.errors import UnknownStateError

            raise UnknownStateError(state_id)
    if as_json:
        click.echo(json.dumps([call.as_json() for call in recorded], indent=2))
        return
    from rich.table import Table

    table = Table("index", "type", "status", "latency ms", "created", "call id")
    for call in recorded:
        latency = "" if call.latency_ms is None else f"{call.latency_ms:.1f}"
        table.add_row(
            str(call.call_index),
            shown(call.call_type),
            shown(call.status),
            latency,
            call.created_at.isoformat(timespec="milliseconds"),
            shown(call.call_id),
        )
    stdout().print(table)


@click.command()
@database_option
@click.option(
    "--pending-older-than",
    metavar="DURATION",
    callback=duration,
    default="15m",
    show_default=True,
    help="Report pending calls at least this old (90s, 15m, 2h).",
)
@click.option(
    "--hashes",
    is_flag=True,
    help="Also recompute every payload hash from the stored payload (reads every call).",
)
@click.option(
    "--seals",
    is_flag=True,
    help="Also recompute every sealed chain (`callindex seal`) and compare its head.",
)
@click.option(
    "--heads",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --seals: also compare with the heads exported by `callindex seal --json`.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(
    ctx: click.Context,
    pending_older_than: float,
    hashes: bool,
    seals: bool,
    heads: Path | None,
    as_json: bool,
) -> None:
    """Check the audit trail's invariants; exit 1 on a violation."""
    from callindex.seals import read_heads

    if heads is not None and not seals:
        raise click.UsageError("--heads needs --seals")
    exported = read_heads(heads) if heads is not None else []
    with recorder(ctx) as opened:
        report = opened.verify(pending_older_than, hashes=hashes, seals=seals, heads=exported)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        ctx.exit(1)


def _print_report(report: Report) -> None:
    from callindex.audit import GAP_CAUSE

    console = stdout()
    statuses = ", ".join(f"{n} {shown(s)}" for s, n in sorted(report.calls_by_status.items()))
    console.print(f"{report.states} states; calls: {statuses or 'none'}")
    checks = [
        ("duplicate (state, index) pairs", report.duplicates, True),
        ("counters behind their calls (run `callindex repair`)", report.counters_behind, True),
        ("gaps between recorded calls", report.gaps, False),
        ("reserved indices above the last call", report.unused_reservations, False),
        ("runs of indices whose calls were purged (not gaps)", report.purged, False),
        (
            f"pending calls older than {report.pending_threshold_seconds:g}s "
            "(run `callindex sweep`)",
            report.stale_pending,
            False,
        ),
    ]
    if report.seals_checked is not None:
        checks.insert(
            2,
            (
                f"sealed chains that differ ({report.seals_checked} seals checked)",
                report.seal_mismatches,
                True,
            ),
        )
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
            console.print("      " + ", ".join(f"{k}={shown(v)}" for k, v in item.items()))
        if len(found) > 10:
            console.print(f"      ... and {len(found) - 10} more (use --json for all)")
    if report.gaps or report.unused_reservations:
        console.print(f"gaps: {GAP_CAUSE}")
    console.print("[green]verify: ok[/]" if report.ok else "[red]verify: FAILED[/]")


@click.command()
@database_option
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=duration,
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
    with recorder(ctx) as opened:
        swept = opened.sweep(older_than, state_prefix=state_prefix)
    for call in swept:
        click.echo(
            f"abandoned {printable(call['state_id'])}#{call['call_index']} "
            f"({printable(call['call_id'])})"
        )
    stderr().print(f"{len(swept)} pending calls marked abandoned")


@click.command()
@database_option
@click.option(
    "--before",
    "older_than",
    metavar="DURATION",
    callback=duration,
    required=True,
    help="Purge finished calls created at least DURATION ago (90d, 12h, 1d12h).",
)
@click.option(
    "--state-prefix",
    default="",
    metavar="PREFIX",
    help="Only calls of states whose id starts with PREFIX.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each purged run as a line of JSON.")
@click.pass_context
def purge(ctx: click.Context, older_than: float, state_prefix: str, as_json: bool) -> None:
    """Delete finished calls created at least DURATION ago, keeping every counter
    (no index is handed out again) and recording each purged run of indices in
    call_purges. A sealed state gives up only the calls it has sealed; pending
    calls stay. Owner role only."""
    with recorder(ctx) as opened:
        purged = opened.purge(older_than, state_prefix=state_prefix)
    for run in purged:
        if as_json:
            click.echo(json.dumps(run.as_json()))
        else:
            sealed = " (sealed)" if run.head else ""
            click.echo(
                f"purged {printable(run.state_id)}#{run.first_index}..{run.last_index}: "
                f"{run.calls} calls{sealed}"
            )
    states = len({run.state_id for run in purged})
    total = sum(run.calls for run in purged)
    stderr().print(f"{total} calls purged from {states} states")


@click.command()
@database_option
@click.pass_context
def repair(ctx: click.Context) -> None:
    """Move counters that are behind their calls past the highest recorded index."""
    with recorder(ctx) as opened:
        moved = opened.repair()
    for state in moved:
        click.echo(f"{printable(state['state_id'])}: next_index is now {state['next_index']}")
    stderr().print(f"{len(moved)} counters repaired")


@click.command()
@database_option
@click.option("--state", "state_id", metavar="STATE", help="Only this state.")
@click.option(
    "--finished-before",
    metavar="DURATION",
    callback=lambda ctx, param, value: None if value is None else duration(ctx, param, value),
    help="Only states whose last call finished at least this long ago (90s, 15m, 2h).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each new seal as a line of JSON, to append to a file kept where the "
    "database's owner cannot write (then `verify --seals --heads FILE`).",
)
@click.pass_context
def seal(
    ctx: click.Context, state_id: str | None, finished_before: float | None, as_json: bool
) -> None:
    """Seal every state whose calls are all finished: store the head of a hash
    chain over its calls, so that any later change to them is detected."""

    def show(new: Seal) -> None:
        if as_json:
            click.echo(json.dumps(new.as_json(), separators=(",", ":")))
        else:
            click.echo(f"{printable(new.state_id)}#{new.last_index} {new.head}")

    with recorder(ctx) as opened:
        made = opened.seal(state_id, finished_before_seconds=finished_before, on_sealed=show)
    stderr().print(f"{len(made)} states sealed")
