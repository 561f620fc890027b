"""Guards that hold on every path.

- What a call may hold is the database's to enforce, not the writer's:
  ``call_type`` is a short identifier (``[a-z0-9_]{1,32}``) and
  ``latency_ms`` is finite and not negative, on every insert and finish
  (PostgreSQL: CHECK constraints, ``NOT VALID`` so adopting a large table
  scans nothing; SQLite: triggers, since it cannot add a constraint to a
  table).
- PostgreSQL: an insert by any role but the owner gets its ``created_at`` and
  ``completed_at`` from the database (``now()``; ``completed_at`` only for a
  finished status), so an application role cannot backdate a call for a
  sweep to abandon, or record a finished call without its completion time.
- SQLite: ``INSERT OR REPLACE INTO call_index_counters`` deletes the old row
  without firing a trigger; a counter it would move back (or more than
  1,000,000 forward) is now refused.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

MAX_STEP = 1_000_000

PG_CHECKS = (
    "ALTER TABLE calls ADD CONSTRAINT ck_calls_call_type_identifier "
    "CHECK (call_type ~ '^[a-z0-9_]{1,32}$') NOT VALID",
    "ALTER TABLE calls ADD CONSTRAINT ck_calls_latency_ms_finite "
    "CHECK (latency_ms IS NULL OR (latency_ms >= 0 AND latency_ms < 'Infinity')) NOT VALID",
)

PG_VOUCH_INDEX = """
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
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$
"""
# 0005's definition, for the downgrade.
PG_VOUCH_INDEX_5 = """
CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
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

_BAD_CALL_MESSAGE = (
    "callindex: call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative"
)
_REWIND_MESSAGE = (
    f"callindex: a counter may only move forward, by at most {MAX_STEP} at a time "
    "(INSERT OR REPLACE on call_index_counters)"
)
# As PostgreSQL's CHECKs: a NULL (an adopted table's legacy writer) passes.
_SQLITE_BAD_CALL = (
    "(length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') "
    "OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308"
)
SQLITE_CHECKS = (
    f"""
CREATE TRIGGER callindex_check_call_insert BEFORE INSERT ON calls
WHEN {_SQLITE_BAD_CALL}
BEGIN
    SELECT RAISE(ABORT, '{_BAD_CALL_MESSAGE}');
END
""",
    f"""
CREATE TRIGGER callindex_check_call_update BEFORE UPDATE OF call_type, latency_ms ON calls
WHEN {_SQLITE_BAD_CALL}
BEGIN
    SELECT RAISE(ABORT, '{_BAD_CALL_MESSAGE}');
END
""",
)
SQLITE_GUARD_COUNTERS_REPLACE = f"""
CREATE TRIGGER callindex_guard_counters_replace BEFORE INSERT ON call_index_counters
WHEN NEW.next_index < (SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
  OR NEW.next_index > {MAX_STEP} + (
      SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
BEGIN
    SELECT RAISE(ABORT, '{_REWIND_MESSAGE}');
END
"""


# CREATE OR REPLACE resets a function's settings: pinned again, as 0005 did.
PG_PIN_VOUCH_INDEX = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$
"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for statement in PG_CHECKS:
            op.execute(statement)
        op.execute(PG_VOUCH_INDEX)
        op.execute(PG_PIN_VOUCH_INDEX)
        return
    for statement in SQLITE_CHECKS:
        op.execute(statement)
    op.execute(SQLITE_GUARD_COUNTERS_REPLACE)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(PG_VOUCH_INDEX_5)
        op.execute(PG_PIN_VOUCH_INDEX)
        op.execute("ALTER TABLE calls DROP CONSTRAINT ck_calls_latency_ms_finite")
        op.execute("ALTER TABLE calls DROP CONSTRAINT ck_calls_call_type_identifier")
        return
    op.execute("DROP TRIGGER callindex_guard_counters_replace")
    op.execute("DROP TRIGGER callindex_check_call_update")
    op.execute("DROP TRIGGER callindex_check_call_insert")
