"""What every subcommand shares: the database option (accepted before or after
the subcommand), the URL it resolves to, output that cannot be forged by
control characters or markup in stored values, and duration options.

Only click is imported here: ``callindex --help`` lists every subcommand, which
imports their modules, and must not load the database stack.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
from click.core import ParameterSource

from callindex.errors import CallIndexError, ConfigurationError
from callindex.urls import DEFAULT_URL, URL_ENVIRONMENT_VARIABLE

if TYPE_CHECKING:
    from rich.console import Console

    from callindex.database import Database
    from callindex.recorder import CallRecorder

F = TypeVar("F", bound=Callable[..., Any])

_DB_HELP: Final = "Database URL: postgresql+psycopg://USER@HOST/DB or sqlite:///FILE."
_GIVEN_AFTER: Final = "callindex.db"  # ctx.meta key: --db given after the subcommand


def root_database_option(function: F) -> F:
    """``--db`` on the ``callindex`` group itself (``callindex --db URL demo``)."""
    return click.option(
        "--db",
        metavar="URL",
        envvar=URL_ENVIRONMENT_VARIABLE,
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help=_DB_HELP,
    )(function)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[_GIVEN_AFTER] = value


def database_option(function: F) -> F:
    """``--db`` after the subcommand (``callindex verify --db URL``), as before it."""
    return _after_subcommand(f"${URL_ENVIRONMENT_VARIABLE}, else {DEFAULT_URL}")(function)


def own_database_option(default: str) -> Callable[[F], F]:
    """``--db`` after a subcommand that uses a database of its own by default."""
    return _after_subcommand(f"${URL_ENVIRONMENT_VARIABLE}, else {default}")


def _after_subcommand(default: str) -> Callable[[F], F]:
    return click.option(
        "--db",
        metavar="URL",
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_remember,
        help=f"{_DB_HELP}  [default: {default}]",
    )


def url(ctx: click.Context) -> str:
    """The database URL of this invocation, checked; a bad one from the
    environment says so."""
    from callindex.urls import parse_url

    value = ctx.meta.get(_GIVEN_AFTER)
    from_environment = False
    if value is None:
        root = ctx.find_root()
        value = root.params["db"]
        from_environment = root.get_parameter_source("db") is ParameterSource.ENVIRONMENT
    try:
        parse_url(value)
    except ConfigurationError as error:
        if from_environment:
            raise ConfigurationError(f"${URL_ENVIRONMENT_VARIABLE}: {error}") from error
        raise
    assert isinstance(value, str)
    return value


def database_given(ctx: click.Context) -> bool:
    """Whether the user chose the database (``--db`` or the environment
    variable) rather than leaving the default."""
    if ctx.meta.get(_GIVEN_AFTER) is not None:
        return True
    return ctx.find_root().get_parameter_source("db") is not ParameterSource.DEFAULT


def database(ctx: click.Context) -> Database:
    from callindex.database import Database

    return Database(url(ctx))


def recorder(ctx: click.Context) -> CallRecorder:
    from callindex.recorder import CallRecorder

    return CallRecorder(url(ctx))


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``), so a
    stored value cannot start a line of its own or move the cursor."""
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))


def shown(text: object) -> str:
    """``text`` for rich output: control characters escaped, markup quoted."""
    from rich.markup import escape

    return escape(printable(text))


def stdout() -> Console:
    from rich.console import Console

    # Piped output is not cut to 80 columns.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """A ``--...`` option given as 90s, 15m or 2h, in seconds."""
    from callindex.audit import parse_duration

    try:
        return parse_duration(value)
    except CallIndexError as error:
        raise click.BadParameter(str(error), ctx, param) from error
