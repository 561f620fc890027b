"""Run callindex's alembic migrations, which ship with the package.

callindex keeps its revision in its own version table, ``callindex_alembic_version``,
so it can share a database (and a schema) with an application that runs its
own alembic history. No ``alembic.ini`` is needed anywhere.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any, Final, Literal

from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect, select, text

from callindex import numbering
from callindex.backends import UPGRADE_LOCK_KEY
from callindex.database import Database, Statements
from callindex.errors import ConfigurationError, SchemaMissingError, SchemaVersionError
from callindex.resources import resource_dir
from callindex.schema import metadata, schema_interfaces
from callindex.urls import parse_url

VERSION_TABLE: Final = "callindex_alembic_version"


def alembic_config(
    *,
    connection: Connection | None = None,
    url: str | None = None,
    output: io.StringIO | None = None,
) -> Config:
    """An alembic :class:`Config` for callindex's migrations.

    Pass ``connection`` to run online, or ``url`` (only its dialect is used) and
    ``output`` to render SQL offline.
    """
    config = Config(output_buffer=output)
    config.set_main_option("script_location", str(resource_dir("migrations")))
    config.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision the library ships (read once per process)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "callindex ships at least one migration"
    return head


def current_revision(db: Database) -> str | None:
    """The revision the database is at, or ``None`` for a database without callindex."""

    def read(statements: Statements) -> str | None:
        context = MigrationContext.configure(
            statements.connection, opts={"version_table": VERSION_TABLE}
        )
        return context.get_current_revision()

    if not db.backend.database_exists():
        return None
    return db.read(read)


def upgrade(
    db: Database, revision: str = "head", *, lock_timeout_seconds: float | None = None
) -> None:
    """Bring the schema to ``revision`` (default: the newest).

    ``lock_timeout_seconds`` (PostgreSQL) bounds each wait for a table lock: a
    migration that cannot get one fails (and is retried by the retry policy)
    instead of queueing every writer behind a long transaction.
    """
    db.prepare_file()
    _run(db, "upgrade", revision, lock_timeout_seconds)


def downgrade(db: Database, revision: str, *, force: bool = False) -> None:
    """Take the schema back to ``revision`` (``base`` removes everything).

    Every downgrade removes something the trail relies on (a guard, a trigger,
    a recorded column, the numbering, or the tables), so while ``calls``
    holds rows it is refused unless ``force``.
    """
    if not force:
        recorded = _recorded_calls(db)
        if recorded:
            raise ConfigurationError(
                f"refusing to downgrade to {revision!r}: calls holds {recorded:,} recorded "
                "calls, and a downgrade removes guards, triggers or recorded columns "
                "(to base: the tables). Use --force to downgrade anyway"
            )
    _run(db, "downgrade", revision)


def _recorded_calls(db: Database) -> int:
    def count(statements: Statements) -> int:
        conn = statements.connection
        if not inspect(conn).has_table("calls"):
            return 0
        return int(conn.execute(text("SELECT count(*) FROM calls")).scalar_one())

    return db.read(count)


def _run(
    db: Database,
    direction: Literal["upgrade", "downgrade"],
    revision: str,
    lock_timeout_seconds: float | None = None,
) -> None:
    def migrate(statements: Statements) -> None:
        conn = statements.connection
        db.backend.lock_for_upgrade(conn)
        if lock_timeout_seconds is not None:
            db.backend.bound_lock_waits(conn, lock_timeout_seconds)
        if direction == "upgrade":
            _check_adoptable(conn, db.display_url)
        config = alembic_config(connection=conn)
        try:
            getattr(command, direction)(config, revision)
        except CommandError as error:
            raise ConfigurationError(f"cannot {direction} to {revision!r}: {error}") from error

    db.run(migrate)


def upgrade_with(connection: Connection, revision: str = "head") -> None:
    """Bring callindex's schema to ``revision`` on an application's connection.

    For an application's own alembic ``env.py``: call it after the
    application's ``context.run_migrations()`` transaction, on the same
    connection, and ``alembic upgrade heads`` brings callindex up too.
    callindex keeps its revision in its own version table, so the two
    histories never mix. ``connection`` must not be inside a transaction.
    """
    if connection.in_transaction():
        raise ConfigurationError(
            "upgrade_with needs a connection outside a transaction: call it after "
            "the application's `with context.begin_transaction():` block"
        )
    scripts = ScriptDirectory.from_config(alembic_config())

    def steps(current: Any, _context: MigrationContext) -> Any:
        return scripts._upgrade_revs(revision, current)

    # Not through alembic's command API: that would start an environment
    # inside the application's running one, and both share alembic's
    # module-level `context` proxy.
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "fn": steps}
    )
    try:
        with connection.begin(), Operations.context(context):
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY}
                )
            _check_adoptable(connection, "this database")
            context.run_migrations()
    except CommandError as error:
        raise ConfigurationError(f"cannot upgrade to {revision!r}: {error}") from error


def _check_adoptable(connection: Connection, where: str) -> None:
    """On a database without callindex's revision, a ``calls`` table callindex
    did not create is checked before migration 0001 adopts it, and refused as a
    whole with :class:`~callindex.errors.AdoptionError` before anything is
    written (SQLite's DDL may not be transactional). The check is the
    library's, not frozen in a migration: what can be adopted depends on what
    the installed library writes."""
    from callindex import adoption  # adoption itself runs the migrations

    version = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    if version.get_current_revision() is None:
        adoption.check_before_migrating(connection, where)


_DEFINITIONS: Final = """
SELECT 'function' AS kind, p.oid::regprocedure::text AS name,
       pg_get_functiondef(p.oid) AS definition
FROM pg_proc AS p
WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'callindex%'
UNION ALL
SELECT 'trigger', t.tgname || ' ON ' || c.relname, pg_get_triggerdef(t.oid, true)
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace
  AND t.tgname LIKE 'callindex%'
ORDER BY 1, 2
"""


def current_definitions(db: Database) -> str:
    """PostgreSQL: the current definition of every callindex function and
    trigger, as the database holds them (``sql/definitions.postgresql.sql``
    is this text for a database at head, with legacy-writers mode off). The
    migrations hold frozen copies; a test checks that the two agree."""
    if db.name != "postgresql":
        raise ConfigurationError("function and trigger definitions are PostgreSQL's")

    def read(statements: Statements) -> str:
        rows = statements.connection.execute(text(_DEFINITIONS)).all()
        owner = statements.connection.execute(
            text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'calls'::regclass")
        ).scalar_one()
        # The owner's name is written into the triggers that skip its inserts.
        blocks = [
            f"-- {kind} {name}\n"
            + definition.strip().replace(f"'{owner}'::name", "'<owner>'::name")
            + ";\n"
            for kind, name, definition in rows
        ]
        header = (
            "-- The current definition of every callindex function and trigger on\n"
            "-- PostgreSQL, at schema head (legacy-writers mode off). Rendered from a\n"
            "-- migrated database by `callindex db definitions`; the migrations hold\n"
            "-- frozen copies, and tests/test_migrations.py checks the two agree.\n"
        )
        return header + "\n" + "\n".join(blocks)

    return db.read(read)


def include_object(
    object_: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """An ``include_object`` hook for an application's alembic autogenerate:
    leaves callindex's tables (and its version table) to callindex."""
    if type_ == "table":
        return name not in (*metadata.tables, VERSION_TABLE)
    table = getattr(object_, "table", None)
    return getattr(table, "name", None) not in metadata.tables


def offline_sql(url: str, revision_range: str = "base:head") -> str:
    """The SQL that upgrades across ``revision_range`` on the dialect of ``url``.

    Nothing connects to a database: only the URL's backend is used.
    """
    dialect_url = parse_url(url).set(
        username=None, password=None, host=None, port=None, database=None, query={}
    )
    if ":" not in revision_range:
        revision_range = f"base:{revision_range}"
    output = io.StringIO()
    config = alembic_config(url=dialect_url.render_as_string(), output=output)
    try:
        command.upgrade(config, revision_range, sql=True)
    except CommandError as error:
        raise ConfigurationError(f"cannot render {revision_range!r}: {error}") from error
    return output.getvalue()


INTERFACE: Final = 2
"""The version of the entry points (``callindex_*_v2``) this library calls."""
OLDEST_REVISION: Final = "0009"
"""The oldest revision that serves :data:`INTERFACE`: a library writes on it and
on every later one that still serves it (a rolling upgrade's expand step)."""


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def check(db: Database) -> SchemaStatus:
    """The database's revision when this library may write on it: from
    :data:`OLDEST_REVISION` to the head it ships, or a newer revision the
    database says still serves :data:`INTERFACE`. Otherwise a
    :class:`SchemaError` whose message names the command that fixes it."""
    status = SchemaStatus(current=current_revision(db), head=head_revision())
    if status.current is None:
        raise SchemaMissingError(
            f"{db.display_url} has no callindex schema: run `callindex db upgrade`"
        )
    known = _known_revisions()
    if status.current in known:
        if status.current in known[known.index(OLDEST_REVISION) :]:
            return status
        raise SchemaVersionError(
            f"{db.display_url} is behind, at {status.current}: run `callindex db upgrade` "
            f"(this callindex writes on revisions {OLDEST_REVISION} to {status.head})"
        )
    if _serves_interface(db, status.current):
        return status
    raise SchemaVersionError(
        f"{db.display_url} is ahead, at {status.current}: a revision this callindex "
        f"(head {status.head}) does not know, which no longer serves its interface "
        f"{INTERFACE}; upgrade the library (`pip install --upgrade callindex`), or run "
        f"`callindex db downgrade {status.head}` with the newer library installed"
    )


def _serves_interface(db: Database, revision: str) -> bool:
    def read(statements: Statements) -> bool:
        found = statements.connection.execute(
            select(schema_interfaces.c.interface).where(
                schema_interfaces.c.revision == revision,
                schema_interfaces.c.interface == INTERFACE,
            )
        ).first()
        return found is not None

    try:
        return db.read(read)
    except SchemaMissingError:  # a revision from before the table existed
        return False


@functools.cache
def _known_revisions() -> tuple[str, ...]:
    """Every revision the library ships, oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return tuple(reversed([script.revision for script in scripts.walk_revisions()]))


def set_legacy_writers(db: Database, on: bool) -> None:
    """Install or remove the numbering trigger (see :mod:`callindex.numbering`),
    under the same lock as upgrades."""

    def switch(statements: Statements) -> None:
        db.backend.lock_for_upgrade(statements.connection)
        # Inserts queue behind a waiting CREATE or DROP TRIGGER: wait briefly.
        db.backend.bound_lock_waits(statements.connection, db.retry.attempt_seconds)
        numbering.set_legacy_writers(statements, on)

    db.run(switch)
