"""Locate the folders that ship beside the code: ``migrations/`` and ``sql/``.

A wheel carries them inside the package as ``callindex/_migrations`` and
``callindex/_sql``; a source checkout (or an editable install) has them at the
repository root. Both layouts are looked up, packaged first.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from sqlalchemy import TextClause, text

from callindex.errors import CallIndexError

_PACKAGE_DIR = Path(__file__).resolve().parent
_BLOCK_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)


def resource_dir(name: str) -> Path:
    """The shipped folder ``name`` (``"migrations"`` or ``"sql"``)."""
    for candidate in (_PACKAGE_DIR / f"_{name}", _PACKAGE_DIR.parents[1] / name):
        if candidate.is_dir():
            return candidate
    raise CallIndexError(f"callindex is installed without its {name}/ folder")


def parse_named_blocks(source: str) -> dict[str, str]:
    """Split a file of ``-- name --`` headed blocks into ``{name: sql}``."""
    headers = list(_BLOCK_HEADER.finditer(source))
    blocks: dict[str, str] = {}
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(source)
        body = "\n".join(
            line
            for line in source[header.end() : end].strip().splitlines()
            if not line.lstrip().startswith("--")
        ).strip()
        if header.group(1) in blocks:
            raise CallIndexError(f"query {header.group(1)!r} is defined twice")
        blocks[header.group(1)] = body.rstrip(";")
    return blocks


@functools.cache
def queries(backend: str) -> dict[str, TextClause]:
    """The queries for ``backend``, parsed once per process: the shared blocks of
    ``sql/queries.sql`` and those of ``sql/queries.<backend>.sql``."""
    folder = resource_dir("sql")
    shared = parse_named_blocks((folder / "queries.sql").read_text(encoding="utf-8"))
    own = parse_named_blocks((folder / f"queries.{backend}.sql").read_text(encoding="utf-8"))
    if clash := shared.keys() & own.keys():
        raise CallIndexError(f"queries defined both shared and for {backend}: {sorted(clash)}")
    return {name: text(body) for name, body in {**shared, **own}.items()}


_NAMED_PARAMETER = re.compile(r"%\((\w+)\)s")


@functools.cache
def driver_sql(backend: str, name: str) -> str:
    """Query ``name`` as its driver takes it: psycopg's ``%(name)s`` parameters
    on PostgreSQL; on SQLite the block as written (``sqlite3`` takes ``:name``)."""
    clause = queries(backend)[name]
    if backend == "sqlite":
        return clause.text
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    return str(clause.compile(dialect=PGDialect_psycopg()))  # type: ignore[no-untyped-call]


@functools.cache
def positional_sql(name: str) -> tuple[str, tuple[str, ...]]:
    """PostgreSQL query ``name`` with positional ``%s`` parameters, and the
    parameter names in their order: a tuple of values costs psycopg less per
    execution than a mapping."""
    named = driver_sql("postgresql", name)
    order = tuple(_NAMED_PARAMETER.findall(named))
    return _NAMED_PARAMETER.sub("%s", named), order
