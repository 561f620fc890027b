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
(writers wait; it copies the table, so partition a new or small trail). Only
the owner of ``calls`` and the members of its role may run it, and the owner
owns every table and function it makes. It keeps the columns, defaults,
checks, indexes, foreign keys, triggers, privileges, comment, row level
security and its policies, replica identity and publications of ``calls``
(publications then publish it as itself, ``publish_via_partition_root``), and
gives each partition its storage parameters. It refuses a ``calls`` that
another table references by a foreign key, a replica identity it cannot keep
(a unique index, which moves to ``call_keys``) and a publication that
publishes partitions as themselves. Partitions are made for every month that
has calls and ``months_ahead`` months ahead, like the default partition (its
owner, storage parameters and replica identity); the default partition takes
anything else. :func:`partition` is idempotent: run it again (or ``purge``,
which does) to make the months ahead.

The database dates a call inserted by a role other than the owner
(``callindex_vouch_index``), and PostgreSQL cannot move a row to another
partition in a BEFORE trigger: such an insert dated in another month is
refused by ``callindex_guard_calls_month`` (``CallRefusedError``).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, date, datetime
from typing import Any, Final

from sqlalchemy import text

from callindex import migrations
from callindex.database import Database, Statements
from callindex.errors import ConfigurationError, InvalidInputError, PermissionDeniedError

DEFAULT_MONTHS_AHEAD: Final = 3
DEFAULT_PARTITION: Final = "calls_p_default"
KEYS_TABLE: Final = "call_keys"
MONTH_GUARD: Final = "callindex_guard_calls_month"
_STAGING: Final = "callindex_calls_partitioned"
_VOUCH: Final = "callindex_vouch_index"


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
        _owner(statements)
        created: list[str] = []
        if not is_partitioned(statements):
            created += _convert(statements)
        _guard_months(statements)
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


def _query(
    statements: Statements, sql: str, parameters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    result = statements.connection.execute(text(sql), parameters or {})
    return [dict(row._mapping) for row in result]


_OWNER: Final = """
SELECT quote_ident(pg_get_userbyid(relowner)) AS owner,
       pg_has_role(current_user, relowner, 'USAGE') AS member,
       quote_ident(current_user) AS runner
FROM pg_class
WHERE oid = CAST('calls' AS regclass)
"""


def _owner(statements: Statements) -> str:
    """The owner of ``calls`` (quoted), who owns what partitioning makes; only
    it and the members of its role may partition."""
    (row,) = _query(statements, _OWNER)
    if not row["member"]:
        raise PermissionDeniedError(
            f"only the owner of calls ({row['owner']}) and the members of its role may "
            f"partition it, and {row['runner']} is neither"
        )
    return str(row["owner"])


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What a partition takes from the table it stands for: its owner, its
    storage parameters (a partitioned table holds none) and its replica
    identity (``pg_class.relreplident``: d, n or f)."""

    owner: str
    options: str
    identity: str

    def give(self, statements: Statements, table: str) -> None:
        changes = [f"OWNER TO {self.owner}"]
        if self.options:
            changes.append(f"SET ({self.options})")
        if self.identity in _IDENTITIES:
            changes.append(f"REPLICA IDENTITY {_IDENTITIES[self.identity]}")
        _execute(statements, f"ALTER TABLE {table} {', '.join(changes)}")


_IDENTITIES: Final = {"f": "FULL", "n": "NOTHING"}
_SHAPE: Final = """
SELECT template.relreplident AS identity,
       coalesce((SELECT string_agg(option, ', ')
                 FROM (SELECT quote_ident(option_name) || ' = ' || quote_literal(option_value)
                       FROM pg_options_to_table(template.reloptions)
                       UNION ALL
                       SELECT 'toast.' || quote_ident(option_name) || ' = '
                              || quote_literal(option_value)
                       FROM pg_options_to_table(toast.reloptions)) AS options (option)),
                '') AS options
FROM pg_class AS template
LEFT JOIN pg_class AS toast ON toast.oid = template.reltoastrelid
WHERE template.oid = CAST(CAST(:template AS text) AS regclass)
"""


def _shape(statements: Statements, template: str) -> _Shape:
    (row,) = _query(statements, _SHAPE, {"template": template})
    return _Shape(_owner(statements), str(row["options"]), str(row["identity"]))


_TABLE_OF_CALLS: Final = """
SELECT calls.relrowsecurity AS row_security, calls.relforcerowsecurity AS forced,
       calls.relreplident AS identity,
       (SELECT index.relname FROM pg_index JOIN pg_class AS index ON index.oid = indexrelid
        WHERE indrelid = calls.oid AND indisreplident) AS identity_index,
       (SELECT index.relname FROM pg_index JOIN pg_class AS index ON index.oid = indexrelid
        WHERE indrelid = calls.oid AND indisprimary) AS primary_key,
       'COMMENT ON TABLE calls IS ' || quote_literal(obj_description(calls.oid, 'pg_class'))
           AS comment
FROM pg_class AS calls
WHERE calls.oid = CAST('calls' AS regclass)
"""
_POLICIES_OF_CALLS: Final = """
SELECT 'CREATE POLICY ' || quote_ident(polname) || ' ON calls AS '
       || CASE WHEN polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END
       || ' FOR ' || CASE polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                                 WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END
       || ' TO ' || (SELECT string_agg(CASE WHEN role = 0 THEN 'PUBLIC'
                                            ELSE quote_ident(pg_get_userbyid(role)) END, ', ')
                     FROM unnest(polroles) AS role)
       || coalesce(' USING (' || pg_get_expr(polqual, polrelid) || ')', '')
       || coalesce(' WITH CHECK (' || pg_get_expr(polwithcheck, polrelid) || ')', '')
           AS definition
FROM pg_policy
WHERE polrelid = CAST('calls' AS regclass)
ORDER BY polname
"""
# Each publication that publishes calls: listed, with its column list and
# row filter, or as one of all tables or of its schema's.
_PUBLICATIONS_OF_CALLS: Final = """
SELECT quote_ident(publication.pubname) AS name, publication.pubviaroot AS via_root,
       publication.pubupdate OR publication.pubdelete AS changes,
       member.prrelid IS NOT NULL AS listed,
       coalesce(' (' || (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
                         FROM pg_attribute
                         WHERE attrelid = member.prrelid
                           AND attnum = ANY (CAST(member.prattrs AS int2[]))) || ')', '')
       || coalesce(' WHERE (' || pg_get_expr(member.prqual, member.prrelid) || ')', '')
           AS published,
       EXISTS (SELECT 1
               FROM pg_get_publication_tables(CAST(publication.pubname AS text)) AS published
               JOIN pg_class ON pg_class.oid = published.relid
               WHERE pg_class.relispartition) AS partitions
FROM pg_publication AS publication
LEFT JOIN pg_publication_rel AS member
  ON member.prpubid = publication.oid AND member.prrelid = CAST('calls' AS regclass)
WHERE EXISTS (SELECT 1
              FROM pg_get_publication_tables(CAST(publication.pubname AS text)) AS published
              WHERE published.relid = CAST('calls' AS regclass))
ORDER BY publication.pubname
"""
_OWNER_OF_FUNCTION: Final = """
SELECT quote_ident(pg_get_userbyid(proowner)) AS owner
FROM pg_proc
WHERE oid = CAST(CAST(:signature AS text) AS regprocedure)
"""


def _refuse_what_cannot_be_kept(table: dict[str, Any], publications: list[dict[str, Any]]) -> None:
    if table["identity"] == "i":
        raise ConfigurationError(
            f"the replica identity of calls is its index {table['identity_index']}, which "
            f"partitioning moves to {KEYS_TABLE} (a unique index of a partitioned table must "
            "include created_at): set REPLICA IDENTITY FULL, DEFAULT or NOTHING on calls first"
        )
    changes = ", ".join(str(row["name"]) for row in publications if row["changes"])
    if table["identity"] == "d" and table["primary_key"] is not None and changes:
        raise ConfigurationError(
            f"the replica identity of calls is its primary key {table['primary_key']}, which "
            f"partitioning moves to {KEYS_TABLE}, and calls is published with its updates or "
            f"deletes ({changes}), which need one: set REPLICA IDENTITY FULL on calls first "
            "(every partition keeps it), or publish its inserts only"
        )
    for row in publications:
        if not row["via_root"] and row["partitions"]:
            raise ConfigurationError(
                f"publication {row['name']} publishes partitions as themselves "
                "(publish_via_partition_root is off), so it would publish the months of calls "
                "instead of calls: set publish_via_partition_root = true on it first, or "
                "publish calls in a publication of its own"
            )


def _convert(statements: Statements) -> list[str]:
    referencing = statements.rows("calls_referenced_by")
    if referencing:
        names = ", ".join(f"{row['name']} on {row['table_name']}" for row in referencing)
        raise ConfigurationError(
            f"calls cannot be partitioned while foreign keys reference it ({names})"
        )
    _execute(statements, "LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
    (table,) = _query(statements, _TABLE_OF_CALLS)
    publications = _query(statements, _PUBLICATIONS_OF_CALLS)
    _refuse_what_cannot_be_kept(table, publications)
    # Forced policies bind the owner too: the copy must see every row (and
    # with row_security off, fails rather than see fewer).
    if table["forced"]:
        _execute(statements, "ALTER TABLE calls NO FORCE ROW LEVEL SECURITY")
    _execute(statements, "SET LOCAL row_security = off")
    policies = [str(row["definition"]) for row in _query(statements, _POLICIES_OF_CALLS)]
    shape = _shape(statements, "calls")
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
    created = [_create_partition(statements, _STAGING, _month(month), shape) for month in months]
    _execute(statements, f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {_STAGING} DEFAULT")
    shape.give(statements, DEFAULT_PARTITION)
    _guard_truncate(statements, DEFAULT_PARTITION)
    _execute(statements, f"INSERT INTO {_STAGING} SELECT * FROM calls")
    _execute(statements, f"CREATE TABLE {KEYS_TABLE} AS SELECT {columns} FROM calls")
    _execute(statements, f"ALTER TABLE {KEYS_TABLE} OWNER TO {shape.owner}")
    # Functions that return a row of calls depend on its type: made again below.
    functions = statements.rows("functions_of_calls_type")
    owners: dict[str, str] = {}
    for function in functions:
        signature = str(function["signature"])
        (owner,) = _query(statements, _OWNER_OF_FUNCTION, {"signature": signature})
        owners[signature] = str(owner["owner"])
        _execute(statements, f"DROP FUNCTION {signature}")
    _execute(statements, "DROP TABLE calls")
    _execute(statements, f"ALTER TABLE {_STAGING} RENAME TO calls")
    dataclasses.replace(shape, options="").give(statements, "calls")
    for index in indexes:
        definition = str(index["definition"])
        if index["is_unique"]:
            # Enforced on call_keys (in the schema of calls), under its name;
            # calls keeps a plain index of the same columns for lookups.
            name, table_reference = str(index["name"]), str(index["table_reference"])
            keys = table_reference.rpartition(".")[0] + f".{KEYS_TABLE}"
            _execute(statements, definition.replace(f" ON {table_reference} ", f" ON {keys} ", 1))
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
    _execute(statements, f"ALTER FUNCTION callindex_record_call_keys() OWNER TO {shape.owner}")
    _execute(
        statements,
        "CREATE TRIGGER callindex_record_call_keys AFTER INSERT ON calls "
        "FOR EACH ROW EXECUTE FUNCTION callindex_record_call_keys()",
    )
    for trigger in triggers:
        _execute(statements, str(trigger["definition"]))
    for function in functions:
        _execute(statements, str(function["definition"]))
        signature = str(function["signature"])
        _execute(statements, f"ALTER FUNCTION {signature} OWNER TO {owners[signature]}")
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
    if table["comment"] is not None:
        _execute(statements, str(table["comment"]))
    for policy in policies:
        _execute(statements, policy)
    if table["row_security"]:
        _execute(statements, "ALTER TABLE calls ENABLE ROW LEVEL SECURITY")
    if table["forced"]:
        _execute(statements, "ALTER TABLE calls FORCE ROW LEVEL SECURITY")
    for publication in publications:
        alter = f"ALTER PUBLICATION {publication['name']}"
        if not publication["via_root"]:
            _execute(statements, f"{alter} SET (publish_via_partition_root = true)")
        if publication["listed"]:
            _execute(statements, f"{alter} ADD TABLE calls{publication['published']}")
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

# callindex_vouch_index dates the call it lets in with now(), after the row
# was routed to the partition of the date it was given.
_MONTH_GUARD_FUNCTION: Final = f"""
CREATE OR REPLACE FUNCTION {MONTH_GUARD}() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: call % is dated % (created_at), another month than now (%): '
        'the database dates the calls of this role, and cannot move one to another month''s '
        'partition of calls; leave created_at out', NEW.call_id, NEW.created_at, now()
        USING ERRCODE = 'check_violation';
END;
$$
"""
_DATING_TRIGGERS: Final = f"""
SELECT tgname AS name, pg_get_triggerdef(oid) AS definition
FROM pg_trigger
WHERE tgrelid = CAST('calls' AS regclass) AND tgname IN ('{_VOUCH}', '{MONTH_GUARD}')
"""
_WHEN: Final = re.compile(r" WHEN \((.*)\) EXECUTE (?:FUNCTION|PROCEDURE) ", re.DOTALL)


def _guard_months(statements: Statements) -> None:
    """Refuse, before the vouch trigger dates it, an insert that it would move
    to another month (only where the vouch trigger applies)."""
    triggers = {
        str(row["name"]): str(row["definition"]) for row in _query(statements, _DATING_TRIGGERS)
    }
    if MONTH_GUARD in triggers or _VOUCH not in triggers:
        return
    vouched = _WHEN.search(triggers[_VOUCH])
    _execute(statements, _MONTH_GUARD_FUNCTION)
    _execute(statements, f"ALTER FUNCTION {MONTH_GUARD}() OWNER TO {_owner(statements)}")
    _execute(
        statements,
        f"CREATE TRIGGER {MONTH_GUARD} BEFORE INSERT ON calls FOR EACH ROW "
        f"WHEN ({vouched[1] if vouched else 'true'} "
        "AND date_trunc('month', NEW.created_at AT TIME ZONE 'UTC') "
        "IS DISTINCT FROM date_trunc('month', now() AT TIME ZONE 'UTC')) "
        f"EXECUTE FUNCTION {MONTH_GUARD}()",
    )


def _month(value: Any) -> date:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    moment = moment.astimezone(UTC) if moment.tzinfo else moment
    return date(moment.year, moment.month, 1)


def _create_partition(statements: Statements, parent: str, month: date, shape: _Shape) -> str:
    name = partition_name(month)
    low, high = month.isoformat(), _next_month(month).isoformat()
    _execute(
        statements,
        f"CREATE TABLE {name} PARTITION OF {parent} "
        f"FOR VALUES FROM ('{low} 00:00:00+00') TO ('{high} 00:00:00+00')",
    )
    shape.give(statements, name)
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
    shape: _Shape | None = None
    for _ in range(months_ahead + 1):
        name = partition_name(month)
        if name not in existing:
            taken = statements.rows(
                "default_partition_rows_between",
                {"low": datetime(month.year, month.month, 1, tzinfo=UTC),
                 "high": datetime(*_next_month(month).timetuple()[:3], tzinfo=UTC)},
            )  # fmt: skip
            if not taken[0]["rows"]:  # else the month stays in the default partition
                shape = shape or _shape(statements, DEFAULT_PARTITION)
                created.append(_create_partition(statements, "calls", month, shape))
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
# Counters a transaction holds (one that allocated with connection= and has
# yet to insert its call) are skipped, not waited for: that transaction waits
# for calls, which the drop holds.
_LOCK_COUNTERS: Final = """
SELECT count(*) FILTER (WHERE locked.state_id IS NULL) AS busy
FROM (SELECT DISTINCT state_id FROM {partition} WHERE state_id IS NOT NULL) AS doomed
LEFT JOIN (
    SELECT state_id FROM call_index_counters
    WHERE state_id IN (SELECT state_id FROM {partition})
    ORDER BY state_id
    FOR UPDATE SKIP LOCKED
) AS locked USING (state_id)
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
    it must stay (pending, of no state, or unsealed in a sealed state), or a
    transaction holds the counter of one of its states.

    Locks calls whole first (dropping the partition would), then the
    counters, in the order every statement that writes calls takes them: no
    call lands, finishes or is sealed meanwhile. A transaction that holds a
    counter and has yet to write calls would wait for the drop while the drop
    waited for it: such a counter is not waited for."""
    _execute(statements, "LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
    (counters,) = _rows(statements, _LOCK_COUNTERS, partition)
    if counters["busy"]:
        return None
    (blockers,) = _rows(statements, _DROPPABLE, partition)
    if any(blockers.values()):
        return None
    return _rows(statements, _RUNS, partition)


def drop_month(statements: Statements, partition: str) -> None:
    assert _PARTITION.fullmatch(partition), partition
    _execute(statements, f"DROP TABLE {partition}")
