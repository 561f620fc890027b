"""``callindex demo``: worker processes, a flaky loopback API, retries, a verdict."""

from __future__ import annotations

import os
import sys

import click

from callindex.cli.common import database_given, own_database_option, stdout, url


@click.command()
@own_database_option("a fresh callindex-demo.db of its own")
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
@click.option(
    "--yes",
    is_flag=True,
    help="Write to the database given by --db or $CALLINDEX_DATABASE_URL: "
    "its demo rows can never be deleted.",
)
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
    yes: bool,
) -> None:
    """Show callindex at work: worker processes, a flaky loopback API, retries, a verdict.

    Without --db (and $CALLINDEX_DATABASE_URL) it uses a fresh SQLite file
    callindex-demo.db in the current folder. Given a database, it needs --yes:
    the audit trail is append-only, so the demo's rows stay there for good (in
    states of its own). Exits 1 when an invariant of the audit trail fails,
    130 on Ctrl-C.
    """
    given = database_given(ctx)
    if given and not yes:
        raise click.UsageError(
            "the demo's rows would be permanent in the database given by --db or "
            "$CALLINDEX_DATABASE_URL: the audit trail is append-only, so they can never be "
            "deleted. Pass --yes to write them there anyway, or give no database for a fresh "
            "callindex-demo.db in the current folder."
        )
    from rich.console import Console

    from callindex.demo import DemoConfig, run_demo
    from callindex.loopback import Faults

    rates = (fault_rate_429, fault_rate_503, fault_rate_slow, fault_rate_drop)
    if sum(rates) > 1 + 1e-9:
        raise click.UsageError(f"the fault rates add up to {sum(rates):g}; at most 1 is possible")
    if kill_one and workers == 1:
        raise click.UsageError("--kill-one needs --workers 2 or more: the others finish the work")
    if workers is None:
        workers = max(os.cpu_count() or 1, 2 if kill_one else 1)
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
        url=url(ctx) if given else None,
    )
    # The header and the verdict go to stdout, progress and notes to stderr; neither is
    # cut to 80 columns.
    progress = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
    ctx.exit(run_demo(config, console=stdout(), progress_console=progress))
