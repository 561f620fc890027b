"""Legacy-writers mode: the numbering trigger on ``calls``, on only while needed.

callindex numbers its own calls in the statement that records them. A writer
that does not use callindex (the legacy worker of a rolling deploy, a script)
inserts with its own ``call_index``; while such writers exist, the numbering
trigger (migration 0004) makes the state's counter number theirs too:

* an insert without a ``call_index`` gets the counter's next index;
* an insert that brings its own moves the counter past it (at most
  1,000,000 ahead);
* an insert whose ``call_index`` is recorded already gets the next free one
  instead of failing.

It costs every insert, callindex's own included, so it is installed only in
legacy-writers mode: ``callindex db adopt --legacy-writers`` or
``callindex db legacy-writers on``; ``callindex db legacy-writers off``
removes it once the last legacy writer is gone; ``callindex db current``
shows the mode. Without it, an insert that takes an index ahead of the
counter makes the state's next callindex write fail with
:class:`~callindex.errors.CounterBehindError` (``callindex repair`` mends it).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection, text

from callindex.database import Database, Statements

PG_TRIGGER: Final = "callindex_number_call"
SQLITE_TRIGGERS: Final = (
    "callindex_number_call_missing",
    "callindex_number_call_taken",
    "callindex_number_call_given",
)
# Without the numbering triggers, SQLite refuses an insert on a taken index
# (INSERT OR REPLACE would otherwise delete the recorded call silently).
SQLITE_TAKEN_GUARD: Final = "callindex_guard_calls_replace_index"
MAX_AHEAD: Final = 1_000_000

_SQLITE_TAKEN_GUARD_SQL: Final = f"""
CREATE TRIGGER {SQLITE_TAKEN_GUARD} BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX005] call_index taken: the counter is behind its calls');
END
"""

_SQLITE_OPEN_COUNTER: Final = """
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT NEW.state_id,
           (SELECT coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = NEW.state_id)
    WHERE NOT EXISTS (SELECT 1 FROM call_index_counters WHERE state_id = NEW.state_id);"""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sqlite_triggers(columns: tuple[str, ...]) -> list[str]:
    """The SQLite numbering triggers for a ``calls`` table with ``columns``.

    SQLite cannot change NEW, so a call to renumber is inserted again by the
    trigger, with its index, and the original insert is dropped (RAISE(IGNORE)).
    """
    others = [_quoted(c) for c in columns if c != "call_index"]
    listed = ", ".join([*others, "call_index"])
    values = ", ".join(
        [f"NEW.{c}" for c in others]
        + ["(SELECT next_index - 1 FROM call_index_counters WHERE state_id = NEW.state_id)"]
    )
    renumber = f"""BEGIN{_SQLITE_OPEN_COUNTER}
    UPDATE call_index_counters SET next_index = next_index + 1 WHERE state_id = NEW.state_id;
    INSERT INTO calls ({listed}) VALUES ({values});
    SELECT RAISE(IGNORE);
END"""
    return [
        f"""
CREATE TRIGGER callindex_number_call_missing BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NULL
{renumber}
""",
        f"""
CREATE TRIGGER callindex_number_call_taken BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NOT NULL AND EXISTS (
    SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
{renumber}
""",
        f"""
CREATE TRIGGER callindex_number_call_given BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NOT NULL
BEGIN{_SQLITE_OPEN_COUNTER}
    SELECT RAISE(ABORT,
        'callindex: [CX003] call_index is more than {MAX_AHEAD} ahead of its counter')
    WHERE NEW.call_index > {MAX_AHEAD} + (
        SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id);
    UPDATE call_index_counters SET next_index = NEW.call_index + 1
    WHERE state_id = NEW.state_id AND next_index <= NEW.call_index;
END
""",
    ]


def sqlite_renumbered_columns(connection: Connection) -> tuple[str, ...]:
    """The columns a renumbered call is inserted again with: all but generated
    ones and a rowid alias (an adopted table's INTEGER PRIMARY KEY), which
    SQLite fills itself."""
    columns = connection.exec_driver_sql("PRAGMA table_xinfo(calls)").all()
    keys = [column for column in columns if column[5]]
    rowid_alias = keys[0][1] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
    return tuple(column[1] for column in columns if column[6] == 0 and column[1] != rowid_alias)


def _sqlite_triggers_present(connection: Connection) -> set[str]:
    return set(
        connection.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'calls'")
        ).scalars()
    )


def legacy_writers_on(statements: Statements) -> bool:
    """Whether the numbering trigger is installed."""
    connection = statements.connection
    if statements.db.name == "postgresql":
        found = connection.execute(
            text(
                "SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass('calls')"
            ),
            {"name": PG_TRIGGER},
        ).first()
        return found is not None
    return SQLITE_TRIGGERS[2] in _sqlite_triggers_present(connection)


def set_legacy_writers(statements: Statements, on: bool) -> None:
    """Install (``on``) or remove the numbering trigger; idempotent. Run it
    inside the upgrade lock (:func:`callindex.migrations.set_legacy_writers`)."""
    connection = statements.connection
    if on == legacy_writers_on(statements):
        return
    if statements.db.name == "postgresql":
        connection.execute(
            text(
                f"CREATE TRIGGER {PG_TRIGGER} BEFORE INSERT ON calls "
                f"FOR EACH ROW EXECUTE FUNCTION callindex_number_call()"
            )
            if on
            else text(f"DROP TRIGGER {PG_TRIGGER} ON calls")
        )
        return
    present = _sqlite_triggers_present(connection)
    if on:
        if SQLITE_TAKEN_GUARD in present:
            connection.exec_driver_sql(f"DROP TRIGGER {SQLITE_TAKEN_GUARD}")
        for statement in sqlite_triggers(sqlite_renumbered_columns(connection)):
            connection.exec_driver_sql(statement)
        return
    for name in SQLITE_TRIGGERS:
        if name in present:
            connection.exec_driver_sql(f"DROP TRIGGER {name}")
    connection.exec_driver_sql(_SQLITE_TAKEN_GUARD_SQL)


def legacy_writers(db: Database) -> bool:
    """Whether ``db`` is in legacy-writers mode (the numbering trigger is installed)."""
    return db.read(legacy_writers_on)
