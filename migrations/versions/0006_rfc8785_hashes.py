"""Payload hashes anyone can recompute: RFC 8785, over what is stored.

Hashes become SHA-256 over the RFC 8785 (JCS) form of each payload, and what
is stored must hash to what is recorded. PostgreSQL's ``jsonb`` rewrites
numbers (``1e300`` comes back as a 301-digit integer, ``-0.0`` as ``0``), so
on PostgreSQL the payload columns become ``json``, which keeps the text as it
was written. Changing their type rewrites ``calls`` once, under an exclusive
lock: on a large table holding payloads, run this upgrade in a quiet window.
Columns that hold none (a legacy table adopted in the same upgrade) are
replaced instead, which rewrites nothing.

``hash_scheme`` says how a row's hashes were made: ``sorted-json`` (rows
recorded before this revision, and by workers of an earlier callindex during
a rolling deploy, which do not name it) or ``rfc8785``. It cannot change once
written. ``callindex_record_call`` and ``callindex_finish_call`` gain
overloads that take payloads as JSON text and record ``rfc8785`` (a call with
untyped literals picks them); the ``jsonb`` ones stay for earlier workers.
``callindex_record_released`` takes text too. Replay looks calls up by
request hash: ``ix_calls_request_hash``.

``CallRecorder(auto_open=True)`` opens a state in the statement that records
its first call, so a least-privilege role may insert a counter; one by any
role but the owner starts at most 1,000,000 ahead (a new state has no calls),
as an update may move it at most that far, so no state can be pushed out of
reach before its first call.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from pathlib import Path

from alembic import op
from alembic.script import ScriptDirectory

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PAYLOADS = ("request", "response", "error")

ADD_HASH_SCHEME = (
    "ALTER TABLE calls ADD COLUMN hash_scheme TEXT NOT NULL DEFAULT 'sorted-json' "
    "CONSTRAINT ck_calls_hash_scheme_known CHECK (hash_scheme IN ('sorted-json', 'rfc8785'))"
)

PG_GUARD_CALLS = """
CREATE OR REPLACE FUNCTION callindex_guard_calls() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'callindex: % cannot be truncated: the audit trail is append-only',
            TG_TABLE_NAME USING ERRCODE = 'CX001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'callindex: call % cannot be deleted: the audit trail is append-only',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'callindex: call % is %, and a finished call cannot be changed',
            OLD.call_id, OLD.status USING ERRCODE = 'CX001';
    END IF;
    IF NEW.status = 'pending'
       OR NEW.completed_at IS NULL
       OR NEW.call_id IS DISTINCT FROM OLD.call_id
       OR NEW.state_id IS DISTINCT FROM OLD.state_id
       OR NEW.call_index IS DISTINCT FROM OLD.call_index
       OR NEW.call_type IS DISTINCT FROM OLD.call_type
       OR NEW.request::text IS DISTINCT FROM OLD.request::text
       OR NEW.request_hash IS DISTINCT FROM OLD.request_hash
       OR NEW.hash_scheme IS DISTINCT FROM OLD.hash_scheme
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'callindex: pending call % may only be finished or abandoned, '
            'with its completed_at', OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$
"""

# 0002's guard function, for the downgrade.
PG_GUARD_CALLS_2 = """
CREATE OR REPLACE FUNCTION callindex_guard_calls() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'callindex: % cannot be truncated: the audit trail is append-only',
            TG_TABLE_NAME USING ERRCODE = 'CX001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'callindex: call % cannot be deleted: the audit trail is append-only',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'callindex: call % is %, and a finished call cannot be changed',
            OLD.call_id, OLD.status USING ERRCODE = 'CX001';
    END IF;
    IF NEW.status = 'pending'
       OR NEW.completed_at IS NULL
       OR NEW.call_id IS DISTINCT FROM OLD.call_id
       OR NEW.state_id IS DISTINCT FROM OLD.state_id
       OR NEW.call_index IS DISTINCT FROM OLD.call_index
       OR NEW.call_type IS DISTINCT FROM OLD.call_type
       OR NEW.request IS DISTINCT FROM OLD.request
       OR NEW.request_hash IS DISTINCT FROM OLD.request_hash
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'callindex: pending call % may only be finished or abandoned, '
            'with its completed_at', OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$
"""

PG_GUARD_CALLS_UPDATE = (
    "CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls FOR EACH ROW "
    "WHEN (OLD.status <> 'pending' OR NEW.status = 'pending' OR NEW.completed_at IS NULL "
    "OR NEW.call_id IS DISTINCT FROM OLD.call_id OR NEW.state_id IS DISTINCT FROM OLD.state_id "
    "OR NEW.call_index IS DISTINCT FROM OLD.call_index "
    "OR NEW.call_type IS DISTINCT FROM OLD.call_type "
    "OR NEW.request::text IS DISTINCT FROM OLD.request::text "
    "OR NEW.request_hash IS DISTINCT FROM OLD.request_hash "
    "OR NEW.hash_scheme IS DISTINCT FROM OLD.hash_scheme "
    "OR NEW.created_at IS DISTINCT FROM OLD.created_at) "
    "EXECUTE FUNCTION callindex_guard_calls()"
)

MAX_STEP = 1_000_000

PG_GUARD_NEW_COUNTER = f"""
CREATE FUNCTION callindex_guard_new_counter() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a new counter starts at most {MAX_STEP} (state %, next %)',
        NEW.state_id, NEW.next_index USING ERRCODE = 'CX001';
END;
$$
"""
# Only for roles other than the owner who runs this migration (as
# callindex_vouch_index): adoption and open_state may start the counter of a
# state with many calls far ahead, as the owner.
PG_GUARD_NEW_COUNTER_TRIGGER = f"""
DO $$
BEGIN
    EXECUTE format('CREATE TRIGGER callindex_guard_new_counter BEFORE INSERT '
                   'ON call_index_counters FOR EACH ROW '
                   'WHEN (NEW.next_index > {MAX_STEP} AND current_user <> %L) '
                   'EXECUTE FUNCTION callindex_guard_new_counter()', current_user);
END;
$$
"""

SQLITE_GUARD_CALLS_UPDATE = """
CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
     OR NEW.completed_at IS NULL
     OR NEW.call_id IS NOT OLD.call_id
     OR NEW.state_id IS NOT OLD.state_id
     OR NEW.call_index IS NOT OLD.call_index
     OR NEW.call_type IS NOT OLD.call_type
     OR NEW.request IS NOT OLD.request
     OR NEW.request_hash IS NOT OLD.request_hash
     OR NEW.hash_scheme IS NOT OLD.hash_scheme
     OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call may change only from pending to finished');
END
"""

# 0002's update guard, for the downgrade.
SQLITE_GUARD_CALLS_UPDATE_2 = """
CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
     OR NEW.completed_at IS NULL
     OR NEW.call_id IS NOT OLD.call_id
     OR NEW.state_id IS NOT OLD.state_id
     OR NEW.call_index IS NOT OLD.call_index
     OR NEW.call_type IS NOT OLD.call_type
     OR NEW.request IS NOT OLD.request
     OR NEW.request_hash IS NOT OLD.request_hash
     OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call may change only from pending to finished');
END
"""

PG_RECORD_RELEASED = """
CREATE PROCEDURE callindex_record_released(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request text, p_request_hash text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision,
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
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
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

PG_RECORD_CALL = """
CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request text, p_request_hash text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision
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
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
    FROM counter
    RETURNING * INTO recorded;
    IF FOUND THEN
        RETURN NEXT recorded;  -- no row at all: the state is unknown
    END IF;
END;
$$
"""

PG_FINISH_CALL = """
CREATE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision
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
    SET status = p_status, response = p_response::json, response_hash = p_response_hash,
        error = p_error::json, error_hash = p_error_hash, latency_ms = p_latency_ms,
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

RECORD_RELEASED_SIGNATURE = (
    "callindex_record_released(text, text, text, text, {json}, text, {json}, text, {json}, "
    "text, double precision, bigint, timestamptz, timestamptz, double precision)"
)
DEFINERS = (
    "callindex_record_call(text, text, text, text, text, text, text, text, text, text, "
    "double precision)",
    "callindex_finish_call(text, text, text, text, text, text, double precision)",
)

# As 0004 did for the jsonb forms: pinned to the tables' schema, and not
# executable by PUBLIC.
PG_PIN_DEFINERS = """
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


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def _revision(revision_id: str) -> object:
    scripts = ScriptDirectory(str(Path(__file__).resolve().parents[1]))
    return scripts.get_revision(revision_id).module  # type: ignore[union-attr]


def _payloads_stored() -> bool:
    """Whether any call holds a payload (offline: assume so)."""
    if op.get_context().as_sql:
        return True
    stored = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM calls WHERE request IS NOT NULL OR response IS NOT NULL "
        "OR error IS NOT NULL LIMIT 1"
    )
    return stored.first() is not None


def _sqlite_numbering_installed() -> bool:
    if op.get_context().as_sql:
        return False
    found = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM sqlite_master "
        "WHERE type = 'trigger' AND name = 'callindex_number_call_given'"
    )
    return found.first() is not None


def _sqlite_drop_numbering() -> bool:
    """Drop 0004's numbering triggers, if installed: they insert a renumbered
    call again column by column, so a change of columns needs them created
    again (:func:`_sqlite_create_numbering`)."""
    if not _sqlite_numbering_installed():
        return False
    for name in ("given", "taken", "missing"):
        op.execute(f"DROP TRIGGER callindex_number_call_{name}")
    return True


def _sqlite_create_numbering() -> None:
    earlier = _revision("0004")
    for statement in earlier.sqlite_triggers(earlier._sqlite_columns()):  # type: ignore[attr-defined]
        op.execute(statement)


def upgrade() -> None:
    op.create_index("ix_calls_request_hash", "calls", ["request_hash"], if_not_exists=True)
    if not _postgresql():
        numbering = _sqlite_drop_numbering()
        op.execute(ADD_HASH_SCHEME)
        op.execute("DROP TRIGGER callindex_guard_calls_update")
        op.execute(SQLITE_GUARD_CALLS_UPDATE)
        if numbering:
            _sqlite_create_numbering()
        return
    op.execute(ADD_HASH_SCHEME)
    op.execute("DROP TRIGGER callindex_guard_calls_update ON calls")
    if _payloads_stored():
        op.execute(
            "ALTER TABLE calls "
            + ", ".join(f"ALTER COLUMN {name} TYPE json USING {name}::json" for name in PAYLOADS)
        )
    else:
        # Columns with nothing in them (a table adopted in this same upgrade):
        # replaced, which rewrites nothing, instead of converted.
        op.execute(
            "ALTER TABLE calls "
            + ", ".join(f"DROP COLUMN {name}, ADD COLUMN {name} json" for name in PAYLOADS)
        )
    op.execute(PG_GUARD_CALLS)
    op.execute(PG_GUARD_CALLS_UPDATE)
    op.execute(f"DROP PROCEDURE {RECORD_RELEASED_SIGNATURE.format(json='jsonb')}")
    op.execute(PG_RECORD_RELEASED)
    op.execute(PG_RECORD_CALL)
    op.execute(PG_FINISH_CALL)
    op.execute(PG_PIN_DEFINERS)
    op.execute(PG_GUARD_NEW_COUNTER)
    op.execute(PG_GUARD_NEW_COUNTER_TRIGGER)


def downgrade() -> None:
    op.drop_index("ix_calls_request_hash", "calls")
    if not _postgresql():
        numbering = _sqlite_drop_numbering()
        op.execute("DROP TRIGGER callindex_guard_calls_update")
        op.execute("ALTER TABLE calls DROP COLUMN hash_scheme")
        op.execute(SQLITE_GUARD_CALLS_UPDATE_2)
        if numbering:
            _sqlite_create_numbering()
        return
    op.execute("DROP TRIGGER callindex_guard_new_counter ON call_index_counters")
    op.execute("DROP FUNCTION callindex_guard_new_counter()")
    op.execute(f"DROP PROCEDURE {RECORD_RELEASED_SIGNATURE.format(json='text')}")
    op.execute(_revision("0005").PG_RECORD_RELEASED)  # type: ignore[attr-defined]
    for signature in DEFINERS:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute("DROP TRIGGER callindex_guard_calls_update ON calls")
    op.execute(
        "ALTER TABLE calls "
        + ", ".join(f"ALTER COLUMN {name} TYPE jsonb USING {name}::jsonb" for name in PAYLOADS)
    )
    op.execute("ALTER TABLE calls DROP COLUMN hash_scheme")
    op.execute(PG_GUARD_CALLS_2)
    op.execute(_revision("0005").PG_GUARD_CALLS_UPDATE)  # type: ignore[attr-defined]
