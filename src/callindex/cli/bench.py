"""``callindex bench``: measure callindex against the floor and today's alternatives.

The options are declared and validated here, and only here; the measurement
is ``run()`` in ``bench/run.py`` (shipped as ``callindex/_bench``), imported
when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import click

from callindex.cli.common import database_given, own_database_option, stdout, url

if TYPE_CHECKING:
    from types import ModuleType

    from rich.console import Console

INSTALL: Final = "pip install 'callindex[bench]'"
DEFAULT_BENCH_URL: Final = "sqlite:///callindex-bench.db"
MODES: Final = ("hot", "distinct")
# The memory measurement compares a worker after 1,000 states with one after --memory-states.
MEMORY_BASELINE: Final = 1_000


class Strategy(NamedTuple):
    summary: str
    postgresql_only: bool = False
    needs: tuple[str, ...] = ()  # modules of the bench extra
    package: str = ""  # what to install for them


# Every strategy of bench/strategies.py, in the order the tables list them.
STRATEGIES: Final = {
    "bare_insert": Strategy("floor: the call row, index chosen by the client"),
    "bare_insert_update": Strategy("floor of begin+finish: that insert, then an update"),
    "raw_update": Strategy("floor of allocation: counter UPDATE ... RETURNING"),
    "raw_update_100": Strategy("floor of allocate_100: that UPDATE, 100 at a time"),
    "legacy_insert": Strategy("the floor's insert into calls: the trigger's cost"),
    "nextval": Strategy("nextval() of a native sequence", postgresql_only=True),
    "allocate": Strategy("callindex allocate_call_index()"),
    "allocate_100": Strategy("callindex allocate_call_index(count=100)"),
    "record_call": Strategy("callindex record_call(), adaptive early lock release"),
    "record_call_early": Strategy("record_call(), always early release", postgresql_only=True),
    "record_call_plain": Strategy("record_call(), never early release", postgresql_only=True),
    "begin_finish": Strategy("callindex begin_call() + finish_call()"),
    "max_plus_one": Strategy("SELECT max()+1, INSERT, retry on conflict", postgresql_only=True),
    "select_for_update": Strategy("SELECT ... FOR UPDATE, then UPDATE", postgresql_only=True),
    "django_sequences": Strategy(
        "django-sequences' get_next_value()",
        postgresql_only=True,
        needs=("django", "sequences"),
        package="django-sequences",
    ),
}


# Not subscripted: ParamType is generic in recent click only, not in 8.1, which is supported.
class CommaSeparated(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list, each item converted by ``item``; repeats are dropped."""

    name = "list"

    def __init__(self, item: click.ParamType[Any]) -> None:
        self.item = item

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if parts == [""]:
            self.fail("give at least one value", param, ctx)
        return tuple(dict.fromkeys(self.item.convert(part, param, ctx) for part in parts))


def _memory_states(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if 0 < value < MEMORY_BASELINE:
        raise click.BadParameter(f"0 (skip) or at least {MEMORY_BASELINE:,}", ctx, param)
    return value


def _in_existing_folder(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> Path | None:
    """An output file is refused before the run, not after it, if its folder is missing."""
    if value is not None and not value.absolute().parent.is_dir():
        raise click.BadParameter(f"no folder {str(value.absolute().parent)!r}", ctx, param)
    return value


def _strategies_epilog() -> str:
    width = max(map(len, STRATEGIES))
    lines = [
        f"  {name:<{width}}  {strategy.summary}"
        + (" (PostgreSQL)" if strategy.postgresql_only else "")
        for name, strategy in STRATEGIES.items()
    ]
    return (
        "Strategies; by default all that the database runs (on SQLite none marked PostgreSQL; "
        f"django_sequences only after {INSTALL}):\n\n\b\n" + "\n".join(lines)
    )


_OUTPUT_FILE: Final = click.Path(dir_okay=False, path_type=Path)


@click.command(epilog=_strategies_epilog())
@own_database_option(DEFAULT_BENCH_URL)
@click.option(
    "--workers",
    type=CommaSeparated(click.IntRange(min=1)),
    default="1,2,4,8",
    show_default=True,
    metavar="N,...",
    help="Numbers of worker processes to measure, comma-separated.",
)
@click.option(
    "--modes",
    type=CommaSeparated(click.Choice(MODES)),
    default=",".join(MODES),
    show_default=True,
    metavar="MODE,...",
    help="hot: all workers on one state; distinct: a state each.",
)
@click.option(
    "--strategies",
    type=CommaSeparated(click.Choice(list(STRATEGIES))),
    default=None,
    show_default="all",
    metavar="NAME,...",
    help="Strategies to measure, comma-separated (listed at the end of --help).",
)
@click.option(
    "--operations",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Operations per worker and run.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Runs of each combination; the median counts.",
)
@click.option(
    "--memory-states",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    callback=_memory_states,
    help=f"Distinct states for the worker memory check (0 skips it, else >= {MEMORY_BASELINE}).",
)
@click.option(
    "--http-calls",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="GETs timed for the audited HTTP client against plain httpx (0 skips them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, no progress.")
@click.option(
    "--plot",
    type=_OUTPUT_FILE,
    callback=_in_existing_folder,
    metavar="FILE.png",
    help="Draw throughput against workers (needs matplotlib).",
)
@click.option(
    "--save",
    type=_OUTPUT_FILE,
    callback=_in_existing_folder,
    metavar="FILE.json",
    help="Also write the JSON report here.",
)
@click.option(
    "--markdown",
    type=_OUTPUT_FILE,
    callback=_in_existing_folder,
    metavar="FILE.md",
    help="Also write the tables as Markdown here.",
)
@click.pass_context
def bench(
    ctx: click.Context,
    workers: tuple[int, ...],
    modes: tuple[str, ...],
    strategies: tuple[str, ...] | None,
    operations: int,
    repeats: int,
    memory_states: int,
    http_calls: int,
    as_json: bool,
    plot: Path | None,
    save: Path | None,
    markdown: Path | None,
) -> None:
    """Measure callindex against the floor and today's alternatives.

    Every strategy runs with each number of workers in each mode, --repeats
    times, alternating, and every run's indices are checked. The report ends
    with the performance targets as ratios from this run. Without --db (and
    $CALLINDEX_DATABASE_URL) it measures on sqlite:///callindex-bench.db.
    """
    from callindex.urls import parse_url

    database = parse_url(url(ctx) if database_given(ctx) else DEFAULT_BENCH_URL)
    backend = database.get_backend_name()
    if plot is not None:
        _check_plot(ctx, plot)
    chosen = _strategies(ctx, strategies, backend)
    runner = _bench_module()
    report = runner.run(
        runner.Options(
            url=database.render_as_string(hide_password=False),
            workers=workers,
            modes=modes,
            strategies=chosen,
            operations=operations,
            repeats=repeats,
            memory_states=memory_states,
            http_calls=http_calls,
            log=(lambda line: None) if as_json else (lambda line: click.echo(line, err=True)),
        )
    )
    _publish(runner, report, stdout(), as_json=as_json, plot=plot, save=save, markdown=markdown)


def _strategies(
    ctx: click.Context, requested: tuple[str, ...] | None, backend: str
) -> tuple[str, ...]:
    """The strategies to run: those requested, or by default all that can run
    here. A requested one that cannot run is refused before anything runs."""
    if requested is None:
        return _default_strategies(backend)
    if backend != "postgresql" and (
        elsewhere := [name for name in requested if STRATEGIES[name].postgresql_only]
    ):
        raise click.BadParameter(
            f"{', '.join(elsewhere)}: PostgreSQL only, and this database is SQLite",
            ctx,
            param_hint="'--strategies'",
        )
    for name in requested:
        if _missing(STRATEGIES[name].needs):
            raise click.ClickException(f"{name} needs {STRATEGIES[name].package}: {INSTALL}")
    return requested


def _default_strategies(backend: str) -> tuple[str, ...]:
    chosen = []
    for name, strategy in STRATEGIES.items():
        if strategy.postgresql_only and backend != "postgresql":
            continue
        if _missing(strategy.needs):
            click.echo(f"{name} skipped: {strategy.package} is not installed ({INSTALL})", err=True)
            continue
        chosen.append(name)
    return tuple(chosen)


def _missing(modules: tuple[str, ...]) -> bool:
    """Whether any of ``modules`` cannot be imported."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return True
    return False


def _check_plot(ctx: click.Context, path: Path) -> None:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise click.ClickException(f"--plot needs matplotlib: {INSTALL}") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise click.BadParameter(
            f"matplotlib writes .{', .'.join(sorted(formats))}, not {path.suffix or 'no suffix'}",
            ctx,
            param_hint="'--plot'",
        )


def _bench_module() -> ModuleType:
    """``bench/run.py``, imported by name from the bench folder put on
    ``sys.path``: its spawned worker processes inherit that path and import it
    the same way to find their target."""
    import importlib
    import sys

    from callindex.resources import resource_dir

    folder = str(resource_dir("bench"))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("run")


def _publish(
    runner: ModuleType,
    report: dict[str, Any],
    console: Console,
    *,
    as_json: bool,
    plot: Path | None,
    save: Path | None,
    markdown: Path | None,
) -> None:
    import json

    text = json.dumps(report, indent=2) + "\n"
    if save is not None:
        save.write_text(text, encoding="utf-8")
    if markdown is not None:
        markdown.write_text(runner.markdown(report), encoding="utf-8")
    if as_json:
        click.echo(text, nl=False)
    else:
        runner.print_report(report, console)
    if plot is not None:
        runner.plot(report, plot)
