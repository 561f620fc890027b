"""The counter numbers every writer's calls, and the write path runs as its owner.

A trigger on ``calls`` makes the state's counter the single source of truth
for any writer, callindex or not (a legacy worker in a rolling deploy, a
script, another language):

* an insert without a ``call_index`` gets the counter's next index;
* an insert that brings its own ``call_index`` moves the counter past it;
* an insert whose ``call_index`` is recorded already (a legacy writer's
  stale ``MAX + 1``) gets the counter's next index instead of failing;
* a state no counter knows yet gets one, starting past its recorded calls.

On PostgreSQL the trigger holds the state's counter row until the insert
commits, so two writers of one state are serialised there and the checks
above see every call committed before. SQLite has one writer at a time.

PostgreSQL: allocation, opening a state, recording and finishing become
``SECURITY DEFINER`` functions with a fixed ``search_path``, and EXECUTE on
them is revoked from PUBLIC, so a least-privilege role (``sql/postgresql-roles.sql``)
can use the library without any right to UPDATE a call or a counter.
``calls.recorded_by`` (PostgreSQL: the login role, ``session_user``, by
default) lets ``callindex_finish_call`` finish a pending call only for the
role that recorded it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from alembic.script import ScriptDirectory

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# An insert may bring an index at most this far ahead of its state's counter
# (a legacy writer's counter never jumps): a larger one would move the counter
# out of reach for good, since counters never move back.
MAX_AHEAD = 1_000_000

NUMBER_CALL = """
CREATE FUNCTION callindex_number_call() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    NEW.recorded_by := session_user;  -- whatever the insert said
    IF NEW.state_id IS NULL THEN
        RETURN NEW;  -- an adopted table may hold calls of no state; not numbered here
    END IF;
    IF NEW.call_index IS NULL THEN
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = NEW.state_id
        RETURNING next_index - 1 INTO NEW.call_index;
        IF FOUND THEN
            RETURN NEW;
        END IF;
    END IF;
    -- Take the counter until this insert commits: every writer of the state
    -- queues here, so the checks below see every call committed before. It is
    -- written, not only locked, so that a REPEATABLE READ or SERIALIZABLE
    -- writer whose snapshot misses the state's last insert gets a
    -- serialization failure (to retry) instead of a unique violation.
    UPDATE call_index_counters SET next_index = next_index
    WHERE state_id = NEW.state_id
    RETURNING next_index INTO next;
    IF NOT FOUND THEN
        INSERT INTO call_index_counters (state_id, next_index)
        SELECT NEW.state_id, coalesce(max(call_index) + 1, 0)
        FROM calls WHERE state_id = NEW.state_id
        ON CONFLICT (state_id) DO NOTHING;
        UPDATE call_index_counters SET next_index = next_index
        WHERE state_id = NEW.state_id
        RETURNING next_index INTO next;
    END IF;
    IF NEW.call_index > next + {max_ahead} THEN
        RAISE EXCEPTION 'callindex: call_index % is more than {max_ahead} ahead of the '
            'counter of state % (%)', NEW.call_index, NEW.state_id, next
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    IF NEW.call_index IS NULL
       OR (NEW.call_index < next AND EXISTS (
               SELECT 1 FROM calls
               WHERE state_id = NEW.state_id AND call_index = NEW.call_index)) THEN
        NEW.call_index := next;
    END IF;
    IF NEW.call_index >= next THEN
        UPDATE call_index_counters SET next_index = NEW.call_index + 1
        WHERE state_id = NEW.state_id;
    END IF;
    RETURN NEW;
END;
$$
""".replace("{max_ahead}", str(MAX_AHEAD))

RESERVE = """
CREATE FUNCTION callindex_reserve(p_state_id text, p_count integer)
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    -- No row: the state is unknown, or p_count is not in 1..{max_ahead} (the
    -- library's limit too: a counter must never be pushed out of reach).
    RETURN QUERY
    UPDATE call_index_counters
    SET next_index = next_index + p_count
    WHERE state_id = p_state_id AND p_count BETWEEN 1 AND {max_ahead}
    RETURNING next_index - p_count;
END;
$$
""".replace("{max_ahead}", str(MAX_AHEAD))

ALLOCATE = """
CREATE FUNCTION callindex_allocate(state_id text, count integer DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL
       OR callindex_allocate.count NOT BETWEEN 1 AND {max_ahead} THEN
        RAISE EXCEPTION 'callindex_allocate: count must be 1 to {max_ahead}, not %',
            callindex_allocate.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT reserved INTO first_index
    FROM callindex_reserve(callindex_allocate.state_id, callindex_allocate.count) AS reserved;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate: unknown state %', callindex_allocate.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$$
""".replace("{max_ahead}", str(MAX_AHEAD))

OPEN_STATE = """
CREATE FUNCTION callindex_open_state(p_state_id text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    -- A state with calls but no counter yet (an adopted table) starts past them.
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT p_state_id, coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = p_state_id
    ON CONFLICT (state_id) DO NOTHING;
END;
$$
"""

RECORD_CALL = """
CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    recorded calls;
BEGIN
    -- A call_id recorded already comes back as it is: no second row, no index used.
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    PERFORM FROM call_index_counters WHERE state_id = p_state_id;
    IF NOT FOUND THEN
        RETURN;  -- unknown state: no row
    END IF;
    -- callindex_number_call gives the call its index. A concurrent insert of
    -- the same call_id fails this one on its primary key, and the counter
    -- bump rolls back with it.
    INSERT INTO calls (
        call_id, state_id, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    ) VALUES (
        p_call_id, p_state_id, p_call_type, p_status,
        p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
        p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    )
    RETURNING * INTO recorded;
    RETURN NEXT recorded;
END;
$$
"""

FINISH_CALL = """
CREATE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response, response_hash = p_response_hash,
        error = p_error, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$
"""

RECORD_CALL_SIGNATURE = (
    "callindex_record_call(text, text, text, text, jsonb, text, jsonb, text, jsonb, text, "
    "double precision)"
)
# The functions a least-privilege role may EXECUTE (see sql/postgresql-roles.sql).
WRITE_PATH = (
    "callindex_reserve(text, integer)",
    "callindex_allocate(text, integer)",
    "callindex_open_state(text)",
    RECORD_CALL_SIGNATURE,
    "callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision)",
)
DEFINERS = ("callindex_number_call()", *WRITE_PATH)

# A SECURITY DEFINER function must not resolve names through the caller's
# search_path: each is pinned to the schema the tables were created in.
PIN_SEARCH_PATH = """
DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['{functions}'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
END;
$$
""".replace("{functions}", "', '".join(DEFINERS))

# Columns of calls as 0004 knows them; an adopted table may have more, and
# online they are read from the table itself.
CALL_COLUMNS = (
    "call_id", "state_id", "call_index", "call_type", "status", "request", "request_hash",
    "response", "response_hash", "error", "error_hash", "latency_ms", "created_at",
    "completed_at", "recorded_by",
)  # fmt: skip

_SQLITE_OPEN_COUNTER = """
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT NEW.state_id,
           (SELECT coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = NEW.state_id)
    WHERE NOT EXISTS (SELECT 1 FROM call_index_counters WHERE state_id = NEW.state_id);"""


def _quoted(name: str) -> str:
    """An SQLite identifier, quoted (adopted tables may name columns ``order``,
    ``Group`` or ``user agent``)."""
    return '"' + name.replace('"', '""') + '"'


def sqlite_triggers(columns: tuple[str, ...]) -> list[str]:
    """SQLite cannot change NEW, so a call to renumber is inserted again by the
    trigger, with its index, and the original insert is dropped (RAISE(IGNORE))."""
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
    SELECT RAISE(ABORT, 'callindex: call_index is more than {MAX_AHEAD} ahead of its counter')
    WHERE NEW.call_index > {MAX_AHEAD} + (
        SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id);
    UPDATE call_index_counters SET next_index = NEW.call_index + 1
    WHERE state_id = NEW.state_id AND next_index <= NEW.call_index;
END
""",
    ]


# 0002's guard against a taken index, which the numbering triggers replace
# (for the downgrade).
SQLITE_TAKEN_GUARD = """
CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END
"""

SQLITE_DOWN = [
    "DROP TRIGGER callindex_number_call_given",
    "DROP TRIGGER callindex_number_call_taken",
    "DROP TRIGGER callindex_number_call_missing",
]


def _earlier(revision_id: str) -> object:
    scripts = ScriptDirectory(str(Path(__file__).resolve().parents[1]))
    return scripts.get_revision(revision_id).module  # type: ignore[union-attr]


def _sqlite_columns() -> tuple[str, ...]:
    """The columns a renumbered call is inserted again with: all but generated
    ones and a rowid alias (an adopted table's INTEGER PRIMARY KEY), which
    SQLite fills itself. A later migration that adds a column to calls must
    create these triggers again."""
    if op.get_context().as_sql:
        return CALL_COLUMNS
    columns = op.get_bind().exec_driver_sql("PRAGMA table_xinfo(calls)").all()
    keys = [column for column in columns if column[5]]
    rowid_alias = keys[0][1] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
    return tuple(column[1] for column in columns if column[6] == 0 and column[1] != rowid_alias)


def upgrade() -> None:
    op.add_column("calls", sa.Column("recorded_by", sa.Text(), nullable=True))
    if op.get_context().dialect.name != "postgresql":
        op.execute("DROP TRIGGER callindex_guard_calls_replace_index")
        for statement in sqlite_triggers(_sqlite_columns()):
            op.execute(statement)
        return
    # Set apart from ADD COLUMN: rows recorded before keep NULL (no recorder known).
    op.alter_column("calls", "recorded_by", server_default=sa.text("session_user"))
    op.execute(f"DROP FUNCTION {RECORD_CALL_SIGNATURE}")
    op.execute("DROP FUNCTION callindex_allocate(text, integer)")
    for statement in (NUMBER_CALL, RESERVE, ALLOCATE, OPEN_STATE, RECORD_CALL, FINISH_CALL):
        op.execute(statement)
    op.execute(
        "CREATE TRIGGER callindex_number_call BEFORE INSERT ON calls "
        "FOR EACH ROW EXECUTE FUNCTION callindex_number_call()"
    )
    op.execute(PIN_SEARCH_PATH)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        for statement in SQLITE_DOWN:
            op.execute(statement)
        # 0002's guard: a taken index was refused, not renumbered.
        op.execute(SQLITE_TAKEN_GUARD)
        op.drop_column("calls", "recorded_by")
        return
    op.execute("DROP TRIGGER callindex_number_call ON calls")
    for signature in reversed(DEFINERS):
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(_earlier("0001").ALLOCATE_FUNCTION)  # type: ignore[attr-defined]
    op.execute(_earlier("0003").RECORD_CALL)  # type: ignore[attr-defined]
    op.drop_column("calls", "recorded_by")
