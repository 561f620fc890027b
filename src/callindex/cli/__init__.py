"""The ``callindex`` command line.

Each subcommand lives in a module of this package, imported when it is run
or listed, and those modules import the library inside their commands, so
``callindex --help`` and ``--version`` load neither SQLAlchemy, psycopg nor
alembic. ``--db`` is accepted before or after the subcommand.

Exit codes: 0 done; 1 a callindex error (one line on stderr: an unknown
state, a refused write, an unreachable database, a failed ``verify``); 2 bad
usage; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Final

import click

from callindex.cli.common import printable, root_database_option
from callindex.errors import CallIndexError

# Subcommand name: "module:attribute", in the order --help lists them.
SUBCOMMANDS: Final = {
    "db": "callindex.cli.schema:db",
    "state": "callindex.cli.trail:state",
    "allocate": "callindex.cli.trail:allocate",
    "calls": "callindex.cli.trail:calls_command",
    "verify": "callindex.cli.trail:verify",
    "sweep": "callindex.cli.trail:sweep",
    "purge": "callindex.cli.trail:purge",
    "repair": "callindex.cli.trail:repair",
    "seal": "callindex.cli.trail:seal",
    "doctor": "callindex.cli.doctor:doctor",
    "diff": "callindex.cli.diff:diff",
    "demo": "callindex.cli.demo:demo",
    "bench": "callindex.cli.bench:bench",
}
INTERRUPTED: Final = 130


class CallIndexGroup(click.Group):
    """Loads subcommands on first use, and turns every :class:`CallIndexError`
    into one line on stderr and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CallIndexError as error:
            raise click.ClickException(printable(error)) from error


@click.group(cls=CallIndexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callindex", prog_name="callindex")
@root_database_option
def cli(db: str) -> None:
    """Database-allocated call indices for audit trails.

    --db (or $CALLINDEX_DATABASE_URL) may come before or after the subcommand.
    """


def main() -> None:
    """The ``callindex`` console script."""
    try:
        code = cli.main(prog_name="callindex", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("callindex: interrupted", err=True)
        sys.exit(INTERRUPTED)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
