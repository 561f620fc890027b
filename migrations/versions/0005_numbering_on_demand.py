"""callindex numbers its own calls; the numbering trigger serves only legacy writers.

callindex's write path now bumps the counter and inserts the call in one
statement, so 0004's numbering trigger on ``calls`` only serves writers that
do not use callindex. It costs every insert, so it becomes a mode
(``callindex db legacy-writers on|off``): this revision removes it from a
database without calls (nothing but callindex can have written there yet)
and keeps it on one that holds calls (it may be adopted, with legacy writers
still running). Offline SQL for SQLite removes it.

``callindex_record_released`` is the early-lock-release form of that
statement: a procedure that commits the call asynchronously (releasing the
state's counter row at once), then commits one WAL record synchronously, so
it returns only once the log is on disk past the call. One round trip.

With callindex's write path inserting and updating counters directly, a
least-privilege role writes counters; the counter guard now also refuses a
move of more than 1,000,000 at once (a counter pushed out of reach is lost for
good, since counters never move back). An insert by any role but the owner
must carry an index its state's counter has handed out
(``callindex_vouch_index``), so such a role cannot plant a call ahead of the
counter; the owner's inserts (and SECURITY DEFINER functions) skip the check.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from pathlib import Path

from alembic import op
from alembic.script import ScriptDirectory

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MAX_STEP = 1_000_000

PG_GUARD_COUNTERS = f"""
CREATE OR REPLACE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward, by at most {MAX_STEP} at '
        'a time, and is never deleted (% on call_index_counters)', TG_OP
        USING ERRCODE = 'CX001';
END;
$$
"""
PG_GUARD_COUNTERS_2 = """
CREATE OR REPLACE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward and is never deleted '
        '(% on call_index_counters)', TG_OP USING ERRCODE = 'CX001';
END;
$$
"""
PG_MOVES = (
    "CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters "
    "FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index "
    f"+ {MAX_STEP} OR NEW.state_id <> OLD.state_id) EXECUTE FUNCTION callindex_guard_counters()"
)
PG_MOVES_2 = (
    "CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters "
    "FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.state_id <> OLD.state_id) "
    "EXECUTE FUNCTION callindex_guard_counters()"
)
PG_NUMBERING_OFF_WITHOUT_CALLS = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM calls) THEN
        DROP TRIGGER IF EXISTS callindex_number_call ON calls;
    END IF;
END;
$$
"""
PG_NUMBERING_ON = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'callindex_number_call'
                   AND tgrelid = to_regclass('calls')) THEN
        CREATE TRIGGER callindex_number_call BEFORE INSERT ON calls
        FOR EACH ROW EXECUTE FUNCTION callindex_number_call();
    END IF;
END;
$$
"""

PG_RECORD_RELEASED = """
CREATE PROCEDURE callindex_record_released(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision,
    INOUT call_index bigint DEFAULT NULL,
    INOUT created_at timestamptz DEFAULT NULL,
    INOUT completed_at timestamptz DEFAULT NULL,
    INOUT waited_ms double precision DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    FROM counter
    RETURNING calls.call_index, calls.created_at, calls.completed_at,
              1000 * extract(epoch FROM clock_timestamp() - statement_timestamp())
    INTO call_index, created_at, completed_at, waited_ms;
    IF call_index IS NULL THEN
        RETURN;  -- unknown state: nothing written
    END IF;
    -- The call's commit is asynchronous: the counter row is free from here.
    COMMIT;
    -- Acknowledge only once the log is on disk past that commit.
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_logical_emit_message(true, 'callindex', '');
END;
$$
"""

# Workers of an earlier callindex call callindex_record_call during a rolling
# upgrade; it inserted without a call_index for the numbering trigger to fill,
# so now it numbers the call itself, as the library's statement does.
PG_RECORD_CALL = """
CREATE OR REPLACE FUNCTION callindex_record_call(
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
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    FROM counter
    RETURNING * INTO recorded;
    IF FOUND THEN
        RETURN NEXT recorded;  -- no row at all: the state is unknown
    END IF;
END;
$$
"""
# 0004's definition, for the downgrade.
PG_RECORD_CALL_4 = """
CREATE OR REPLACE FUNCTION callindex_record_call(
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
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    PERFORM FROM call_index_counters WHERE state_id = p_state_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
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
PG_PIN_RECORD_CALL = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_record_call(text, text, text, text, jsonb, text, '
                   'jsonb, text, jsonb, text, double precision) SET search_path = %I, pg_temp',
                   current_schema());
END;
$$
"""

# The guard on calls runs only for an update it refuses: the test moves into
# the trigger's WHEN, which costs no function call on a valid finish.
PG_GUARD_CALLS_UPDATE = (
    "CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls FOR EACH ROW "
    "WHEN (OLD.status <> 'pending' OR NEW.status = 'pending' OR NEW.completed_at IS NULL "
    "OR NEW.call_id IS DISTINCT FROM OLD.call_id OR NEW.state_id IS DISTINCT FROM OLD.state_id "
    "OR NEW.call_index IS DISTINCT FROM OLD.call_index "
    "OR NEW.call_type IS DISTINCT FROM OLD.call_type "
    "OR NEW.request IS DISTINCT FROM OLD.request "
    "OR NEW.request_hash IS DISTINCT FROM OLD.request_hash "
    "OR NEW.created_at IS DISTINCT FROM OLD.created_at) "
    "EXECUTE FUNCTION callindex_guard_calls()"
)
PG_GUARD_CALLS_DELETE = (
    "CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls()"
)
PG_GUARD_CALLS_2 = (
    "CREATE TRIGGER callindex_guard_calls BEFORE UPDATE OR DELETE ON calls "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls()"
)

PG_VOUCH_INDEX = """
CREATE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$
"""
# After the numbering trigger (BEFORE triggers fire in name order), and only
# for roles other than the owner who runs this migration.
PG_VOUCH_INDEX_TRIGGER = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION callindex_vouch_index() FROM PUBLIC;
    EXECUTE format('CREATE TRIGGER callindex_vouch_index BEFORE INSERT ON calls FOR EACH ROW '
                   'WHEN (current_user <> %L) EXECUTE FUNCTION callindex_vouch_index()',
                   current_user);
END;
$$
"""

SQLITE_MOVES = f"""
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + {MAX_STEP}
     OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT,
        'callindex: a counter may only move forward, by at most {MAX_STEP} at a time');
END
"""
SQLITE_MOVES_2 = """
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter may only move forward');
END
"""
SQLITE_NUMBERING = (
    "callindex_number_call_missing",
    "callindex_number_call_taken",
    "callindex_number_call_given",
)
SQLITE_TAKEN_GUARD = """
CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END
"""


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def _sqlite_has_calls() -> bool:
    if op.get_context().as_sql:
        return False
    return op.get_bind().exec_driver_sql("SELECT 1 FROM calls LIMIT 1").first() is not None


def _sqlite_numbering_installed() -> bool:
    if op.get_context().as_sql:
        return False
    found = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM sqlite_master "
        "WHERE type = 'trigger' AND name = 'callindex_number_call_given'"
    )
    return found.first() is not None


def upgrade() -> None:
    if _postgresql():
        op.execute(PG_GUARD_COUNTERS)
        op.execute("DROP TRIGGER callindex_guard_counters ON call_index_counters")
        op.execute(PG_MOVES)
        op.execute(PG_NUMBERING_OFF_WITHOUT_CALLS)
        op.execute(PG_RECORD_RELEASED)
        op.execute(PG_RECORD_CALL)
        op.execute(PG_PIN_RECORD_CALL)
        op.execute("DROP TRIGGER callindex_guard_calls ON calls")
        op.execute(PG_GUARD_CALLS_DELETE)
        op.execute(PG_GUARD_CALLS_UPDATE)
        op.execute(PG_VOUCH_INDEX)
        op.execute(PG_VOUCH_INDEX_TRIGGER)
        return
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(SQLITE_MOVES)
    if not _sqlite_has_calls():
        for name in SQLITE_NUMBERING:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute(SQLITE_TAKEN_GUARD)


def downgrade() -> None:
    # 0004 always numbers every insert: the trigger comes back.
    if _postgresql():
        op.execute("DROP TRIGGER IF EXISTS callindex_vouch_index ON calls")
        op.execute("DROP FUNCTION IF EXISTS callindex_vouch_index()")
        op.execute(
            "DROP PROCEDURE IF EXISTS callindex_record_released(text, text, text, text, jsonb, "
            "text, jsonb, text, jsonb, text, double precision, bigint, timestamptz, timestamptz, "
            "double precision)"
        )
        op.execute(PG_NUMBERING_ON)
        op.execute(PG_RECORD_CALL_4)
        op.execute(PG_PIN_RECORD_CALL)
        op.execute("DROP TRIGGER callindex_guard_calls_update ON calls")
        op.execute("DROP TRIGGER callindex_guard_calls ON calls")
        op.execute(PG_GUARD_CALLS_2)
        op.execute("DROP TRIGGER callindex_guard_counters ON call_index_counters")
        op.execute(PG_MOVES_2)
        op.execute(PG_GUARD_COUNTERS_2)
        return
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(SQLITE_MOVES_2)
    if not _sqlite_numbering_installed():
        op.execute("DROP TRIGGER IF EXISTS callindex_guard_calls_replace_index")
        scripts = ScriptDirectory(str(Path(__file__).resolve().parents[1]))
        earlier = scripts.get_revision("0004").module  # type: ignore[union-attr]
        for statement in earlier.sqlite_triggers(earlier._sqlite_columns()):
            op.execute(statement)
