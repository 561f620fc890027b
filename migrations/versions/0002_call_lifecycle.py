"""The database guards the trail: calls change only from pending to finished,
nothing is deleted, replaced or truncated, counters never move back.
Also an index on pending calls.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# A pending call may be finished (success, error) or abandoned, once, with its
# completion time; its identity (state, index, type, request, creation time)
# never changes. Nothing else may be updated, and no call may be deleted.
POSTGRESQL = [
    """
CREATE FUNCTION callindex_guard_calls() RETURNS trigger
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
""",
    "CREATE TRIGGER callindex_guard_calls BEFORE UPDATE OR DELETE ON calls "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls()",
    "CREATE TRIGGER callindex_guard_calls_truncate BEFORE TRUNCATE ON calls "
    "FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_calls()",
    """
CREATE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward and is never deleted '
        '(% on call_index_counters)', TG_OP USING ERRCODE = 'CX001';
END;
$$
""",
    # The WHEN clause is checked without calling the function: allocations pay nothing.
    "CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters "
    "FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.state_id <> OLD.state_id) "
    "EXECUTE FUNCTION callindex_guard_counters()",
    "CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_counters()",
    "CREATE TRIGGER callindex_guard_counters_truncate BEFORE TRUNCATE ON call_index_counters "
    "FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_counters()",
]

SQLITE = [
    """
CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call cannot be deleted: the audit trail is append-only');
END
""",
    """
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
""",
    # INSERT OR REPLACE deletes the row it replaces without firing delete
    # triggers, so a conflicting insert is refused before it happens.
    """
CREATE TRIGGER callindex_guard_calls_replace_id BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE call_id = NEW.call_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: a recorded call cannot be replaced');
END
""",
    """
CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END
""",
    """
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter may only move forward');
END
""",
    """
CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter is never deleted');
END
""",
]

POSTGRESQL_DOWN = [
    "DROP TRIGGER callindex_guard_counters_truncate ON call_index_counters",
    "DROP TRIGGER callindex_guard_counters_delete ON call_index_counters",
    "DROP TRIGGER callindex_guard_counters ON call_index_counters",
    "DROP FUNCTION callindex_guard_counters()",
    "DROP TRIGGER callindex_guard_calls_truncate ON calls",
    "DROP TRIGGER callindex_guard_calls ON calls",
    "DROP FUNCTION callindex_guard_calls()",
]
SQLITE_DOWN = [
    "DROP TRIGGER callindex_guard_counters_delete",
    "DROP TRIGGER callindex_guard_counters",
    "DROP TRIGGER callindex_guard_calls_replace_index",
    "DROP TRIGGER callindex_guard_calls_replace_id",
    "DROP TRIGGER callindex_guard_calls_update",
    "DROP TRIGGER callindex_guard_calls_delete",
]


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_index(
        "ix_calls_pending_created_at",
        "calls",
        ["created_at"],
        # `callindex db adopt` builds it beforehand, CONCURRENTLY, on a large table.
        if_not_exists=True,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    for statement in POSTGRESQL if _postgresql() else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    for statement in POSTGRESQL_DOWN if _postgresql() else SQLITE_DOWN:
        op.execute(statement)
    op.drop_index("ix_calls_pending_created_at", table_name="calls")
