"""PostgreSQL: ``calls`` partitioned by ``created_at`` month, so that purging
a month is dropping its partition.

A partitioned table's unique indexes must include the partition key, which
would give up the uniqueness of ``call_id`` and of ``(state_id, call_index)``.
So :func:`partition` moves every unique index of ``calls`` (the ones callindex
creates and those of an adopted table) onto ``call_keys``, a narrow table
holding those columns of every call, filled by a trigger as calls are
inserted: the same indexes, with their names and predicates, enforce the same
uniqueness across all partitions, and violations read as before. A key stays
when its call is purged, so a purged ``call_id`` or index is never taken
again.

The conversion runs in one transaction under an exclusive lock of ``calls``
(writers wait; it copies the table, so partition a new or small trail). It
keeps the columns, defaults, checks, indexes, foreign keys, triggers and
privileges of ``calls``. A table that another table references by a foreign
key cannot be partitioned. Partitions are made for every month that has calls
and ``months_ahead`` months ahead; a default partition takes anything else.
:func:`partition` is idempotent: run it again (or ``purge``, which does) to
make the months ahead.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any, Final

from callindex import migrations
from callindex.database import Database, Statements
from callindex.errors import ConfigurationError, InvalidInputError

DEFAULT_MONTHS_AHEAD: Final = 3
DEFAULT_PARTITION: Final = "calls_p_default"
KEYS_TABLE: Final = "call_keys"
_STAGING: Final = "callindex_calls_partitioned"


def partition_name(month: date) -> str:
    return f"calls_p{month.year:04d}_{month.month:02d}"


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def is_partitioned(statements: Statements) -> bool:
    return bool(statements.rows("calls_is_partitioned")[0]["partitioned"])


def partition(db: Database, months_ahead: int = DEFAULT_MONTHS_AHEAD) -> list[str]:
    """Make ``calls`` partitioned by ``created_at`` month (once), and make the
    partitions of the months ahead; returns the partitions created."""
    if db.name != "postgresql":
        raise ConfigurationError("partitioning calls by month is PostgreSQL's (declarative)")
    if isinstance(months_ahead, bool) or not isinstance(months_ahead, int):
        raise InvalidInputError(f"months_ahead must be an integer, not {months_ahead!r}")
    if not 0 <= months_ahead <= 120:
        raise InvalidInputError(f"months_ahead must be between 0 and 120, not {months_ahead}")
    migrations.check(db)

    def convert(statements: Statements) -> list[str]:
        db.backend.lock_for_upgrade(statements.connection)
        db.backend.bound_lock_waits(statements.connection, db.retry.attempt_seconds)
        created: list[str] = []
        if not is_partitioned(statements):
            created += _convert(statements)
        created += _months_ahead(statements, months_ahead)
        return created

    return db.run(convert)


def ensure_months_ahead(db: Database, months_ahead: int = DEFAULT_MONTHS_AHEAD) -> list[str]:
    """On a partitioned ``calls``, the partitions of the months ahead (no-op otherwise)."""
    if db.name != "postgresql":
        return []

    def make(statements: Statements) -> list[str]:
        if not is_partitioned(statements):
            return []
        db.backend.bound_lock_waits(statements.connection, db.retry.attempt_seconds)
        return _months_ahead(statements, months_ahead)

    return db.run(make)


def _execute(statements: Statements, sql: str) -> None:
    # The driver reads % as a placeholder, and function bodies hold RAISE formats.
    statements.connection.exec_driver_sql(sql.replace("%", "%%"))


def _convert(statements: Statements) -> list[str]:
    referencing = statements.rows("calls_referenced_by")
    if referencing:
        names = ", ".join(f"{row['name']} on {row['table_name']}" for row in referencing)
        raise ConfigurationError(
            f"calls cannot be partitioned while foreign keys reference it ({names})"
        )
    _execute(statements, "LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
    indexes = statements.rows("indexes_of_calls")
    triggers = statements.rows("triggers_of_calls")
    foreign_keys = statements.rows("foreign_keys_of_calls")
    table_grants = statements.rows("table_grants_of_calls")
    column_grants = statements.rows("column_grants_of_calls")
    months = [row["month"] for row in statements.rows("months_of_calls")]
    key_columns = sorted(
        {column for row in indexes if row["is_unique"] for column in row["columns"]} | {"call_id"}
    )
    columns = ", ".join(f'"{column}"' for column in key_columns)

    _execute(
        statements,
        f"CREATE TABLE {_STAGING} (LIKE calls INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (created_at)",
    )
    created = [_create_partition(statements, _STAGING, _month(month)) for month in months]
    _execute(statements, f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {_STAGING} DEFAULT")
    _guard_truncate(statements, DEFAULT_PARTITION)
    _execute(statements, f"INSERT INTO {_STAGING} SELECT * FROM calls")
    _execute(statements, f"CREATE TABLE {KEYS_TABLE} AS SELECT {columns} FROM calls")
    # Functions that return a row of calls depend on its type: made again below.
    functions = statements.rows("functions_of_calls_type")
    for function in functions:
        _execute(statements, f"DROP FUNCTION {function['signature']}")
    _execute(statements, "DROP TABLE calls")
    _execute(statements, f"ALTER TABLE {_STAGING} RENAME TO calls")
    for index in indexes:
        definition = str(index["definition"])
        if index["is_unique"]:
            # Enforced on call_keys (in the schema of calls), under its name;
            # calls keeps a plain index of the same columns for lookups.
            name, table = str(index["name"]), str(index["table_reference"])
            keys = table.rpartition(".")[0] + f".{KEYS_TABLE}"
            _execute(statements, definition.replace(f" ON {table} ", f" ON {keys} ", 1))
            definition = definition.replace(
                f"CREATE UNIQUE INDEX {name} ", f"CREATE INDEX {_lookup_name(name)} ", 1
            )
        _execute(statements, definition)
    for key in foreign_keys:
        _execute(
            statements, f'ALTER TABLE calls ADD CONSTRAINT "{key["name"]}" {key["definition"]}'
        )
    _execute(statements, _KEYS_FUNCTION.format(columns=columns, values=_new_values(key_columns)))
    _execute(statements, _PIN_KEYS_FUNCTION)
    _execute(
        statements,
        "CREATE TRIGGER callindex_record_call_keys AFTER INSERT ON calls "
        "FOR EACH ROW EXECUTE FUNCTION callindex_record_call_keys()",
    )
    for trigger in triggers:
        _execute(statements, str(trigger["definition"]))
    for function in functions:
        _execute(statements, str(function["definition"]))
        if function["grants"] is not None:  # else the default: PUBLIC may execute
            _execute(statements, f"REVOKE ALL ON FUNCTION {function['signature']} FROM PUBLIC")
            for grantee in function["grants"]:
                _execute(
                    statements, f"GRANT EXECUTE ON FUNCTION {function['signature']} TO {grantee}"
                )
    for grant in table_grants:
        _execute(statements, f"GRANT {grant['privilege']} ON calls TO {grant['grantee']}")
    for grant in column_grants:
        _execute(
            statements,
            f'GRANT {grant["privilege"]} ("{grant["column_name"]}") ON calls TO {grant["grantee"]}',
        )
    return created


def _lookup_name(unique_index: str) -> str:
    return f"ix_calls_by_{unique_index}"[:63]


def _new_values(columns: list[str]) -> str:
    return ", ".join(f'NEW."{column}"' for column in columns)


_KEYS_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION callindex_record_call_keys() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO call_keys ({columns}) VALUES ({values});
    RETURN NULL;
END;
$$
"""
_PIN_KEYS_FUNCTION: Final = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_record_call_keys() SET search_path = %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION callindex_record_call_keys() FROM PUBLIC;
END;
$$
"""


def _month(value: Any) -> date:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    moment = moment.astimezone(UTC) if moment.tzinfo else moment
    return date(moment.year, moment.month, 1)


def _create_partition(statements: Statements, parent: str, month: date) -> str:
    name = partition_name(month)
    low, high = month.isoformat(), _next_month(month).isoformat()
    _execute(
        statements,
        f"CREATE TABLE {name} PARTITION OF {parent} "
        f"FOR VALUES FROM ('{low} 00:00:00+00') TO ('{high} 00:00:00+00')",
    )
    _guard_truncate(statements, name)
    return name


def _guard_truncate(statements: Statements, table: str) -> None:
    # A statement trigger of the parent does not fire for a partition truncated
    # on its own: each partition has its own.
    _execute(
        statements,
        f"CREATE TRIGGER callindex_guard_calls_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_calls()",
    )


def _months_ahead(statements: Statements, months_ahead: int) -> list[str]:
    existing = {str(row["name"]) for row in statements.rows("partitions_of_calls")}
    month = _month(datetime.now(UTC))
    created = []
    for _ in range(months_ahead + 1):
        name = partition_name(month)
        if name not in existing:
            taken = statements.rows(
                "default_partition_rows_between",
                {"low": datetime(month.year, month.month, 1, tzinfo=UTC),
                 "high": datetime(*_next_month(month).timetuple()[:3], tzinfo=UTC)},
            )  # fmt: skip
            if not taken[0]["rows"]:  # else the month stays in the default partition
                created.append(_create_partition(statements, "calls", month))
        month = _next_month(month)
    return created


def month_partitions(statements: Statements) -> list[tuple[str, datetime]]:
    """The month partitions of ``calls`` (name, end of the month), oldest first."""
    months = []
    for row in statements.rows("partitions_of_calls"):
        if match := _PARTITION.fullmatch(str(row["name"])):
            end = _next_month(date(int(match[1]), int(match[2]), 1))
            months.append((str(row["name"]), datetime(end.year, end.month, 1, tzinfo=UTC)))
    return sorted(months, key=lambda month: month[1])


_PARTITION: Final = re.compile(r"calls_p(\d{4})_(\d{2})")


_DROPPABLE: Final = """
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE state_id IS NULL) AS stateless,
       count(*) FILTER (
           WHERE call_index > coalesce((SELECT max(last_index) FROM call_seals
                                       WHERE call_seals.state_id = part.state_id),
                                      9223372036854775807)
       ) AS unsealed_in_sealed_states
FROM {partition} AS part
"""
_LOCK_COUNTERS: Final = """
SELECT state_id FROM call_index_counters
WHERE state_id IN (SELECT DISTINCT state_id FROM {partition})
ORDER BY state_id
FOR UPDATE
"""
_RUNS: Final = """
WITH doomed AS (SELECT DISTINCT state_id FROM {partition})
SELECT state_id, min(call_index) AS first_index, max(call_index) AS last_index,
       count(*) AS calls,
       EXISTS (SELECT 1 FROM call_seals WHERE call_seals.state_id = runs.state_id) AS sealed
FROM (
    SELECT state_id, call_index, purged,
           row_number() OVER (PARTITION BY state_id ORDER BY call_index)
           - row_number() OVER (PARTITION BY state_id, purged ORDER BY call_index) AS run
    FROM (
        SELECT calls.state_id, calls.call_index,
               CASE WHEN calls.tableoid = '{partition}'::regclass THEN 1 ELSE 0 END AS purged
        FROM calls JOIN doomed USING (state_id)
    ) AS marked
) AS runs
WHERE purged = 1
GROUP BY state_id, run
ORDER BY state_id, first_index
"""


def droppable_months(statements: Statements, before: datetime) -> list[str]:
    """The month partitions wholly before ``before`` (all their calls are old)."""
    if not is_partitioned(statements):
        return []
    return [name for name, end in month_partitions(statements) if end <= before]


def _rows(statements: Statements, sql: str, partition: str) -> list[dict[str, Any]]:
    assert _PARTITION.fullmatch(partition), partition  # our own names only
    result = statements.connection.exec_driver_sql(sql.format(partition=partition))
    return [dict(row._mapping) for row in result]


def month_runs(statements: Statements, partition: str) -> list[dict[str, Any]] | None:
    """The runs of indices (``state_id``, ``first_index``, ``last_index``,
    ``calls``, ``sealed``) that dropping month partition ``partition`` would
    purge, with the counters of their states locked; ``None`` when a call in
    it must stay (pending, of no state, or unsealed in a sealed state).

    Locks calls whole first (dropping the partition would), then the
    counters, in the order every writer takes them: no call lands, finishes
    or is sealed meanwhile."""
    _execute(statements, "LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
    _rows(statements, _LOCK_COUNTERS, partition)
    (blockers,) = _rows(statements, _DROPPABLE, partition)
    if any(blockers.values()):
        return None
    return _rows(statements, _RUNS, partition)


def drop_month(statements: Statements, partition: str) -> None:
    assert _PARTITION.fullmatch(partition), partition
    _execute(statements, f"DROP TABLE {partition}")
