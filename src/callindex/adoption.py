"""Adopting an audit database whose ``calls`` table callindex did not create.

``adopt`` takes a legacy audit database (calls numbered by in-process
counters, no counter table) to callindex's schema while its writers keep
writing:

1. **check** the table (:func:`check_table`): ``call_id`` unique, a unique
   index on ``(state_id, call_index)``, a text ``state_id``, no NOT NULL
   column callindex would leave empty, no CHECK that could refuse its values;
   anything else is refused with :class:`AdoptionError` before a single
   statement is written;
2. on PostgreSQL, build the indexes of pending calls and of request hashes
   ``CONCURRENTLY`` (no lock on writers);
3. run the migrations (0001 adopts the table: only missing columns are
   added, nullable, so nothing is rewritten), under a short ``lock_timeout``
   so the brief exclusive lock never queues behind a long transaction; with
   ``legacy_writers`` the numbering trigger stays on (see
   :mod:`callindex.numbering`): from here on the counter is the source of
   truth for every writer, and any missing counter starts past its state's
   calls; without it, writers that do not use callindex must have stopped;
4. backfill ``next_index = max(call_index) + 1`` for every state, a batch of
   states per transaction. A writer waits at most for one batch, and only
   on a state of that batch; a batch that must itself wait for a writer
   gives up after ``lock_timeout_seconds`` and is retried.

Every step is idempotent: an interrupted adoption is resumed by running it
again.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Connection, String, inspect, text

from callindex import migrations
from callindex.database import Database, Statements
from callindex.errors import AdoptionError, InvalidInputError

DEFAULT_BATCH_STATES: Final = 1_000
DEFAULT_LOCK_TIMEOUT_SECONDS: Final = 2.0
# The columns callindex always fills when it records a call (a request
# without a payload still has the hash of its canonical null).
_ALWAYS_WRITTEN: Final = frozenset(
    {"call_id", "state_id", "call_index", "call_type", "status", "created_at", "request_hash"}
)
_INDEXES: Final = (
    ("ix_calls_pending_created_at", {"status", "created_at"},
     "calls (created_at) WHERE status = 'pending'"),
    ("ix_calls_request_hash", {"request_hash"}, "calls (request_hash)"),
)  # fmt: skip
_CHECKS_WHAT_CALLINDEX_WRITES: Final = re.compile(
    r"\b(status|call_type|call_index)\b", re.IGNORECASE
)
# The one CHECK on those columns callindex's own schema has.
_HARMLESS_CHECK: Final = re.compile(r"^\(?\s*call_index\s*>=\s*0\s*\)?$", re.IGNORECASE)


@dataclass(frozen=True)
class AdoptionReport:
    calls: int
    states: int
    batches: int
    index_seconds: float
    schema_seconds: float
    backfill_seconds: float


def check(db: Database) -> None:
    """Raise :class:`AdoptionError` unless ``calls`` can be adopted as it is."""
    db.read(lambda statements: check_table(statements.connection, db.display_url))


def check_before_migrating(connection: Connection, where: str) -> None:
    """Before callindex's migrations run on a database without its revision:
    a ``calls`` table callindex did not create is checked (:func:`check_table`)
    before migration 0001 adopts it, whichever way the migrations are run."""
    inspector = inspect(connection)
    if not inspector.has_table("calls"):
        return
    created_by_callindex = any(
        key["referred_table"] == "call_index_counters"
        for key in inspector.get_foreign_keys("calls")
    )
    if not created_by_callindex:
        check_table(connection, where)


def check_table(connection: Connection, where: str) -> None:
    """:func:`check` on an open connection."""
    inspector = inspect(connection)
    if not inspector.has_table("calls"):
        raise AdoptionError(
            f"{where} has no calls table to adopt: "
            "run `callindex db upgrade` to create callindex's schema"
        )
    if any(
        key["referred_table"] == "call_index_counters"
        for key in inspector.get_foreign_keys("calls")
    ):
        raise AdoptionError(
            f"the calls table of {where} was created by callindex: "
            "there is nothing to adopt (`callindex db upgrade` keeps it current)"
        )
    columns = {column["name"]: column for column in inspector.get_columns("calls")}
    missing = [name for name in ("call_id", "state_id", "call_index") if name not in columns]
    if missing:
        raise AdoptionError(f"calls has no {', '.join(missing)} column: it cannot be adopted")
    if not isinstance(columns["state_id"]["type"], String):
        raise AdoptionError(
            f"calls.state_id is {columns['state_id']['type']}, not text: callindex's "
            "state ids are text (convert the column first)"
        )
    unique_sets = [tuple(inspector.get_pk_constraint("calls")["constrained_columns"])]
    unique_sets += [
        tuple(str(name) for name in index["column_names"])
        for index in inspector.get_indexes("calls")
        if index["unique"]
    ]
    unique_sets += [
        tuple(constraint["column_names"])
        for constraint in inspector.get_unique_constraints("calls")
    ]
    if connection.dialect.name == "sqlite":  # inline UNIQUE columns: autoindexes, not reflected
        for index in connection.exec_driver_sql("PRAGMA index_list(calls)").all():
            if index[2]:
                info = connection.exec_driver_sql(f'PRAGMA index_info("{index[1]}")').all()
                unique_sets.append(tuple(column[2] for column in info))
    if ("call_id",) not in unique_sets:
        raise AdoptionError(
            "calls.call_id is not unique; make it the primary key or add "
            "CREATE UNIQUE INDEX ON calls (call_id) before adopting"
        )
    if ("state_id", "call_index") not in unique_sets:
        raise AdoptionError(
            "calls has no unique index on (state_id, call_index); add "
            "CREATE UNIQUE INDEX CONCURRENTLY ON calls (state_id, call_index) "
            "WHERE state_id IS NOT NULL (it fails, naming them, if duplicates exist)"
        )
    blocking = sorted(
        name
        for name, column in columns.items()
        if not column["nullable"]
        and column.get("default") is None
        and column.get("autoincrement") is not True
        and name not in _ALWAYS_WRITTEN
    )
    if blocking:
        raise AdoptionError(
            f"calls.{', calls.'.join(blocking)} is NOT NULL without a default, and "
            "callindex may record calls without a value for it: give it a default "
            "or drop NOT NULL before adopting"
        )
    for constraint in inspector.get_check_constraints("calls"):
        sqltext = constraint["sqltext"].strip()
        if _CHECKS_WHAT_CALLINDEX_WRITES.search(sqltext) and not _HARMLESS_CHECK.match(sqltext):
            raise AdoptionError(
                f"the CHECK constraint {constraint['name']} ({constraint['sqltext']}) may "
                "refuse what callindex records (status pending, success, error or "
                "abandoned; call_type any identifier of 1 to 32 characters; call_index from 0): "
                "widen or drop it first"
            )


def adopt(
    db: Database,
    *,
    batch_states: int = DEFAULT_BATCH_STATES,
    lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    legacy_writers: bool = False,
) -> AdoptionReport:
    """Adopt the database's ``calls`` table (see the module documentation).

    ``legacy_writers``: writers that do not use callindex keep writing calls
    (a rolling deploy); the numbering trigger numbers theirs too. It is set
    before the counters are backfilled, so their inserts during the backfill
    are numbered already. Without it the trigger is removed.
    """
    if isinstance(batch_states, bool) or not isinstance(batch_states, int) or batch_states < 1:
        raise InvalidInputError(f"batch_states must be a positive integer, not {batch_states!r}")
    if not db.backend.database_exists():
        raise AdoptionError(f"{db.display_url} does not exist: there is nothing to adopt")
    if migrations.current_revision(db) is None:
        check(db)
    started = time.monotonic()
    _build_indexes(db)
    indexed = time.monotonic()
    migrations.upgrade(db, lock_timeout_seconds=lock_timeout_seconds)
    migrations.set_legacy_writers(db, legacy_writers)
    migrated = time.monotonic()
    states, batches = backfill_counters(db, batch_states, lock_timeout_seconds)
    backfilled = time.monotonic()
    calls = db.read(
        lambda statements: int(
            statements.connection.execute(text("SELECT count(*) FROM calls")).scalar_one()
        )
    )
    return AdoptionReport(
        calls=calls,
        states=states,
        batches=batches,
        index_seconds=indexed - started,
        schema_seconds=migrated - indexed,
        backfill_seconds=backfilled - migrated,
    )


def _build_indexes(db: Database) -> None:
    """PostgreSQL: the indexes the migrations would build under their
    exclusive lock (the pending calls of 0002, the request hashes of 0006),
    built first without blocking writers; the migrations then find them. A
    build interrupted earlier leaves an invalid index behind; it is dropped and
    built again."""
    if db.name != "postgresql":
        return
    with db.translated_errors(), db.engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        columns = {column["name"] for column in inspect(auto).get_columns("calls")}
        for name, needs, definition in _INDEXES:
            if not needs <= columns:
                continue  # they come with the schema step, which builds the index then
            valid = auto.execute(
                text(
                    "SELECT index.indisvalid FROM pg_index AS index "
                    "JOIN pg_class AS class ON class.oid = index.indexrelid "
                    "WHERE class.relname = :name "
                    "AND class.relnamespace = current_schema()::regnamespace"
                ),
                {"name": name},
            ).scalar()
            if valid is False:
                auto.execute(text(f"DROP INDEX CONCURRENTLY {name}"))
            auto.execute(text(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}"))


def backfill_counters(
    db: Database,
    batch_states: int = DEFAULT_BATCH_STATES,
    lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
) -> tuple[int, int]:
    """Create the missing counters, ``batch_states`` states per transaction, in
    ``state_id`` order; returns (states seen, batches).

    A batch that must wait for a writer (one creating a counter of the batch's
    states) gives up after ``lock_timeout_seconds`` (PostgreSQL), releasing
    the counters it created, and is retried: a long writer transaction never
    holds up the writers of a whole batch for longer than that."""
    after = ""
    states = batches = 0
    while True:
        found = db.read(functools.partial(_next_batch, after=after, batch_states=batch_states))
        if found is None:
            return states, batches
        last, count = found
        db.run(
            functools.partial(
                _backfill, after=after, last=last, lock_timeout_seconds=lock_timeout_seconds
            )
        )
        states += count
        batches += 1
        after = last


def _next_batch(statements: Statements, after: str, batch_states: int) -> tuple[str, int] | None:
    row = statements.rows("next_state_batch", {"after": after, "batch": batch_states})[0]
    return (row["last_state"], int(row["states"])) if row["states"] else None


def _backfill(statements: Statements, after: str, last: str, lock_timeout_seconds: float) -> None:
    statements.db.backend.bound_lock_waits(statements.connection, lock_timeout_seconds)
    statements.rows("backfill_counters", {"after": after, "last": last})
