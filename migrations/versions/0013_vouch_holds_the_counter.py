"""The vouch trigger holds the counter of the state it vouches for.

``callindex_vouch_index`` (a pipeline role's direct ``INSERT INTO calls``)
read the state's counter without a lock, so an insert at a reserved index
could pass its purged-index check while a purge of that state, holding the
counter, was recording the run that covers the index, and land inside the
run once the purge committed. It now takes the counter row ``FOR KEY SHARE``
first (as ``record_call(call_index=k)`` does): a purge of the state either
committed before, and the check sees its run (``CX009``), or waits for the
insert.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SERVED = "INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0013', 2)"

_VOUCH_INDEX = """
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
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id{lock};
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;
    IF EXISTS (SELECT 1 FROM call_purges
               WHERE state_id = NEW.state_id
                 AND first_index <= NEW.call_index AND NEW.call_index <= last_index) THEN
        RAISE EXCEPTION 'callindex: call_index % of state % belonged to a purged call',
            NEW.call_index, NEW.state_id USING ERRCODE = 'CX009';
    END IF;
    RETURN NEW;
END;
$$
"""
# CREATE OR REPLACE resets a function's settings: pin it to this schema again.
_PIN_VOUCH_INDEX = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$
"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(_VOUCH_INDEX.format(lock=" FOR KEY SHARE"))
        op.execute(_PIN_VOUCH_INDEX)
    op.execute(SERVED)


def downgrade() -> None:
    op.execute("DELETE FROM callindex_schema_interfaces WHERE revision = '0013'")
    if op.get_context().dialect.name == "postgresql":
        op.execute(_VOUCH_INDEX.format(lock=""))
        op.execute(_PIN_VOUCH_INDEX)
