"""PostgreSQL: record_call as a PL/pgSQL function, so its plan is cached.

callindex sends record_call in one round trip together with its early lock
release (see callindex.database.Statements); that script is sent with
client-side parameters and would be planned anew each time. Inside a function
the statements are planned once per session.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RECORD_CALL = """
CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
AS $$
DECLARE
    recorded calls;
    allocated bigint;
BEGIN
    -- A call_id recorded already comes back as it is: no second row, no index used.
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    UPDATE call_index_counters AS counters
    SET next_index = counters.next_index + 1
    WHERE counters.state_id = p_state_id
    RETURNING counters.next_index - 1 INTO allocated;
    IF NOT FOUND THEN
        RETURN;  -- unknown state: no row
    END IF;
    -- A concurrent insert of the same call_id fails this one on pk_calls, and
    -- the counter bump above rolls back with it.
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, completed_at
    ) VALUES (
        p_call_id, p_state_id, allocated, p_call_type, p_status,
        p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
        p_latency_ms, CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    )
    RETURNING * INTO recorded;
    RETURN NEXT recorded;
END;
$$
"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(RECORD_CALL)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION callindex_record_call(text, text, text, text, jsonb, text, jsonb, "
            "text, jsonb, text, double precision)"
        )
