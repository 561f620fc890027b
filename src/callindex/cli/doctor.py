"""``callindex doctor``: check a deployment and say what to fix."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

import click

from callindex.cli.common import database_option, duration, shown, stdout, url

if TYPE_CHECKING:
    from callindex.doctor import Diagnosis, Finding

_COLOURS: Final = {"critical": "red", "warning": "yellow", "ok": "green"}


@click.command()
@database_option
@click.option(
    "--pending-older-than",
    metavar="DURATION",
    callback=duration,
    default="15m",
    show_default=True,
    help="Warn about pending calls at least this old (90s, 15m, 2h).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the findings as JSON (for monitoring)."
)
@click.pass_context
def doctor(ctx: click.Context, pending_older_than: float, as_json: bool) -> None:
    """Check a deployment: durability settings, synchronous standbys, the role,
    the schema and the trail. Prints each finding with its fix; exit 1 when one
    is critical."""
    from callindex.doctor import diagnose

    diagnosis = diagnose(url(ctx), pending_older_than)
    if as_json:
        click.echo(json.dumps(diagnosis.as_json(), indent=2))
    else:
        _print_diagnosis(diagnosis)
    if not diagnosis.ok:
        ctx.exit(1)


def _print_diagnosis(diagnosis: Diagnosis) -> None:
    console = stdout()
    for finding in diagnosis.findings:
        console.print(_line(finding))
    critical, warnings = diagnosis.count("critical"), diagnosis.count("warning")
    summary = f"{critical} critical, {warnings} warning(s)"
    console.print(f"[red]doctor: {summary}[/]" if critical else f"[green]doctor: ok[/] ({summary})")


def _line(finding: Finding) -> str:
    """One line: the coloured severity, the check, what was found and its fix."""
    colour = _COLOURS[finding.severity]
    line = f"[{colour}]{finding.severity:<8}[/]  {shown(finding.check)}: {shown(finding.found)}"
    if finding.fix:
        line += f"  [bold]fix:[/] {shown(finding.fix)}"
    return line
