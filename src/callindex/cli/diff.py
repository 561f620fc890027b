"""``callindex diff``: the calls of two states whose request or response differ."""

from __future__ import annotations

import json

import click

from callindex.cli.common import database_option, printable, recorder


@click.command()
@database_option
@click.argument("state_a", metavar="STATE_A")
@click.argument("state_b", metavar="STATE_B")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@click.pass_context
def diff(ctx: click.Context, state_a: str, state_b: str, as_json: bool) -> None:
    """List the calls of STATE_A and STATE_B that differ; exit 1 if any do.

    Calls are paired by position in index order and compared by their replay
    fingerprints: request method, redacted URL and body; response status code
    and body (attempt numbers, operation ids, headers and secret values aside).
    """
    from callindex.replay import diff_states

    with recorder(ctx) as opened:
        calls_a, calls_b, differences = diff_states(opened, state_a, state_b)
    if as_json:
        report = {
            "state_a": state_a,
            "state_b": state_b,
            "calls_a": len(calls_a),
            "calls_b": len(calls_b),
            "differences": [difference.as_json() for difference in differences],
        }
        click.echo(json.dumps(report, indent=2))
    else:
        for difference in differences:
            click.echo(
                f"position {difference.position}: {_index(difference.index_a)} in "
                f"{printable(state_a)}, {_index(difference.index_b)} in {printable(state_b)}: "
                f"{', '.join(difference.differing)} differ(s)"
            )
        click.echo(
            f"{len(differences)} difference(s) between {printable(state_a)} "
            f"({len(calls_a)} calls) and {printable(state_b)} ({len(calls_b)} calls)"
        )
    if differences:
        ctx.exit(1)


def _index(call_index: int | None) -> str:
    return "no call" if call_index is None else f"call_index {call_index}"
