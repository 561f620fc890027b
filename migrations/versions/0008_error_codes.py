"""One SQLSTATE per refusal, so errors are told apart by code, not by message.

PostgreSQL: callindex's triggers and functions raised ``CX001`` for every
guard, ``numeric_value_out_of_range`` for an index too far ahead and
``insufficient_privilege`` for a finish by another role. Each condition now
has a code of its own (callindex/translation.py maps them to typed errors):

- ``CX001`` a recorded call cannot be changed or deleted (ImmutableCallError)
- ``CX002`` a counter may only move forward, within the step (CounterGuardError)
- ``CX003`` an index the counter did not hand out, or too far ahead of it
  (IndexAheadError)
- ``CX004`` a pending call finished by a role other than the one that
  recorded it (CallOwnedByAnotherRoleError)

SQLite raises no SQLSTATE: its triggers' messages start with the same code
(``callindex: [CX002] ...``) for the same translation. Those of this library's
SQLite triggers that can refuse a counter or an index are created again
with it.

The functions are the earlier revisions' definitions with only the code
changed; the downgrade puts back each revision's own.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from pathlib import Path

from alembic import op
from alembic.script import ScriptDirectory

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

MAX_STEP = 1_000_000


def _revision(revision_id: str) -> object:
    scripts = ScriptDirectory(str(Path(__file__).resolve().parents[1]))
    return scripts.get_revision(revision_id).module  # type: ignore[union-attr]


# This revision's definitions: the earlier ones with only the code changed.
PG_DEFINITIONS = (
    """
CREATE OR REPLACE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward, by at most 1000000 at '
        'a time, and is never deleted (% on call_index_counters)', TG_OP
        USING ERRCODE = 'CX002';
END;
$$
""",
    """
CREATE OR REPLACE FUNCTION callindex_guard_new_counter() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a new counter starts at most 1000000 (state %, next %)',
        NEW.state_id, NEW.next_index USING ERRCODE = 'CX002';
END;
$$
""",
    """
CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;
    RETURN NEW;
END;
$$
""",
    """
CREATE OR REPLACE FUNCTION callindex_number_call() RETURNS trigger
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
    IF NEW.call_index > next + 1000000 THEN
        RAISE EXCEPTION 'callindex: call_index % is more than 1000000 ahead of the '
            'counter of state % (%)', NEW.call_index, NEW.state_id, next
            USING ERRCODE = 'CX003';
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
""",
    """
CREATE OR REPLACE FUNCTION callindex_finish_call(
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
            'may finish it', p_call_id USING ERRCODE = 'CX004';
    END IF;
END;
$$
""",
    """
CREATE OR REPLACE FUNCTION callindex_finish_call(
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
            'may finish it', p_call_id USING ERRCODE = 'CX004';
    END IF;
END;
$$
""",
)


def _earlier_definitions() -> list[str]:
    """The definitions these replace, for the downgrade (each revision's own)."""
    r4, r5, r6, r7 = (_revision(r) for r in ("0004", "0005", "0006", "0007"))
    return [
        definition.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        for definition in (
            r5.PG_GUARD_COUNTERS,  # type: ignore[attr-defined]
            r6.PG_GUARD_NEW_COUNTER,  # type: ignore[attr-defined]
            r7.PG_VOUCH_INDEX,  # type: ignore[attr-defined]
            r4.NUMBER_CALL,  # type: ignore[attr-defined]
            r4.FINISH_CALL,  # type: ignore[attr-defined]
            r6.PG_FINISH_CALL,  # type: ignore[attr-defined]
        )
    ]


# CREATE OR REPLACE resets a function's settings: the SECURITY DEFINER ones
# are pinned to the tables' schema again (as 0004 and 0006 did).
DEFINERS = (
    "callindex_vouch_index()",
    "callindex_number_call()",
    "callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision)",
    "callindex_finish_call(text, text, text, text, text, text, double precision)",
)
PG_PIN_DEFINERS = """
DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['{functions}'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
    END LOOP;
END;
$$
""".replace("{functions}", "', '".join(DEFINERS))

SQLITE_GUARD_COUNTERS = f"""
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + {MAX_STEP}
     OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most {MAX_STEP} at a time');
END
"""  # noqa: E501
SQLITE_GUARD_COUNTERS_REPLACE = f"""
CREATE TRIGGER callindex_guard_counters_replace BEFORE INSERT ON call_index_counters
WHEN NEW.next_index < (SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
  OR NEW.next_index > {MAX_STEP} + (
      SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most {MAX_STEP} at a time (INSERT OR REPLACE on call_index_counters)');
END
"""  # noqa: E501


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for definition in PG_DEFINITIONS:
            op.execute(definition)
        op.execute(PG_PIN_DEFINERS)
        return
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(SQLITE_GUARD_COUNTERS)
    op.execute("DROP TRIGGER callindex_guard_counters_replace")
    op.execute(SQLITE_GUARD_COUNTERS_REPLACE)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for definition in _earlier_definitions():
            op.execute(definition)
        op.execute(PG_PIN_DEFINERS)
        return
    op.execute("DROP TRIGGER callindex_guard_counters_replace")
    op.execute(_revision("0007").SQLITE_GUARD_COUNTERS_REPLACE)  # type: ignore[attr-defined]
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(_revision("0005").SQLITE_MOVES)  # type: ignore[attr-defined]
