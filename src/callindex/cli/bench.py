"""``callindex bench``: measure callindex against the floor and today's alternatives."""

from __future__ import annotations

import subprocess
import sys

import click

from callindex.cli.common import database_given, database_option, url


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@database_option
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, arguments: tuple[str, ...]) -> None:
    """Measure callindex against the floor and today's alternatives (bench/run.py;
    `callindex bench --help` lists its options)."""
    from callindex.resources import resource_dir

    script = resource_dir("bench") / "run.py"
    database = ["--db", url(ctx)] if database_given(ctx) else []
    ctx.exit(subprocess.call([sys.executable, str(script), *database, *arguments]))
