"""Finished calls are immutable, enforced by the database; index on pending calls.

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

# A pending call may be finished (success, error) or abandoned, once; its
# identity (state, index, type, request, creation time) never changes. Nothing
# else may be updated, and no call may be deleted.
POSTGRESQL_GUARD = """
CREATE FUNCTION callindex_guard_calls() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'callindex: call % cannot be deleted: the audit trail is append-only',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'callindex: call % is %, and a finished call cannot be changed',
            OLD.call_id, OLD.status USING ERRCODE = 'CX001';
    END IF;
    IF NEW.status = 'pending'
       OR NEW.call_id IS DISTINCT FROM OLD.call_id
       OR NEW.state_id IS DISTINCT FROM OLD.state_id
       OR NEW.call_index IS DISTINCT FROM OLD.call_index
       OR NEW.call_type IS DISTINCT FROM OLD.call_type
       OR NEW.request IS DISTINCT FROM OLD.request
       OR NEW.request_hash IS DISTINCT FROM OLD.request_hash
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'callindex: pending call % may only be finished or abandoned',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$
"""

SQLITE_GUARDS = [
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
]


def upgrade() -> None:
    op.create_index(
        "ix_calls_pending_created_at",
        "calls",
        ["created_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(POSTGRESQL_GUARD)
        op.execute(
            "CREATE TRIGGER callindex_guard_calls BEFORE UPDATE OR DELETE ON calls "
            "FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls()"
        )
    else:
        for statement in SQLITE_GUARDS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER callindex_guard_calls ON calls")
        op.execute("DROP FUNCTION callindex_guard_calls()")
    else:
        op.execute("DROP TRIGGER callindex_guard_calls_update")
        op.execute("DROP TRIGGER callindex_guard_calls_delete")
    op.drop_index("ix_calls_pending_created_at", table_name="calls")
