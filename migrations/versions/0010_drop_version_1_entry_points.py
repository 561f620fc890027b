"""Drop the version-1 entry points (the contract step of 0009's rolling upgrade).

Apply it once every worker runs a callindex that calls the ``_v2`` functions
(0.2 or newer): a worker of an earlier version fails from here on with
"undefined function". ``callindex db upgrade 0009`` stops before it.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SERVED = "INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0010', 2)"
UNSERVED = "DELETE FROM callindex_schema_interfaces WHERE revision = '0010'"

# Argument types of the entry points that take payloads (version 1 also as jsonb).
RECORD = "text, text, text, text, {json}, text, {json}, text, {json}, text, double precision"
FINISH = "text, text, {json}, text, {json}, text, double precision"
RELEASED = (
    "text, text, text, text, text, text, text, text, text, text, double precision, "
    "bigint, timestamptz, timestamptz, double precision"
)

RECORD_V2 = f"callindex_record_call_v2({RECORD.format(json='text')})"
FINISH_V2 = f"callindex_finish_call_v2({FINISH.format(json='text')})"

# Each version-1 entry point, with the version-2 signature whose grants it
# takes back on a downgrade.
ENTRY_POINTS = {
    "callindex_open_state(text)": "callindex_open_state_v2(text)",
    "callindex_reserve(text, integer)": "callindex_reserve_v2(text, integer)",
    "callindex_allocate(text, integer)": "callindex_allocate_v2(text, integer)",
    **{
        f"callindex_record_call({RECORD.format(json=json)})": RECORD_V2
        for json in ("jsonb", "text")
    },
    **{
        f"callindex_finish_call({FINISH.format(json=json)})": FINISH_V2
        for json in ("jsonb", "text")
    },
    f"callindex_record_released({RELEASED})": f"callindex_record_released_v2({RELEASED})",
}
DEFINERS = tuple(signature for signature in ENTRY_POINTS if "record_released" not in signature)

# Version 1 as 0008 left it, for the downgrade.
PG_VERSION_1 = (
    # callindex_allocate(text,integer)
    """
CREATE FUNCTION callindex_allocate(
    state_id text,
    count integer DEFAULT 1
)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL
       OR callindex_allocate.count NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'callindex_allocate: count must be 1 to 1000000, not %',
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
$function$
""",
    # callindex_finish_call (jsonb)
    """
CREATE FUNCTION callindex_finish_call(
    p_call_id text,
    p_status text,
    p_response jsonb,
    p_response_hash text,
    p_error jsonb,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
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
$function$
""",
    # callindex_finish_call (text)
    """
CREATE FUNCTION callindex_finish_call(
    p_call_id text,
    p_status text,
    p_response text,
    p_response_hash text,
    p_error text,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
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
$function$
""",
    # callindex_open_state(text)
    """
CREATE FUNCTION callindex_open_state(
    p_state_id text
)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
BEGIN
    -- A state with calls but no counter yet (an adopted table) starts past them.
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT p_state_id, coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = p_state_id
    ON CONFLICT (state_id) DO NOTHING;
END;
$function$
""",
    # callindex_record_call (jsonb)
    """
CREATE FUNCTION callindex_record_call(
    p_call_id text,
    p_state_id text,
    p_call_type text,
    p_status text,
    p_request jsonb,
    p_request_hash text,
    p_response jsonb,
    p_response_hash text,
    p_error jsonb,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
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
$function$
""",
    # callindex_record_call (text)
    """
CREATE FUNCTION callindex_record_call(
    p_call_id text,
    p_state_id text,
    p_call_type text,
    p_status text,
    p_request text,
    p_request_hash text,
    p_response text,
    p_response_hash text,
    p_error text,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
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
$function$
""",
    # callindex_record_released
    """
CREATE PROCEDURE callindex_record_released(
    IN p_call_id text,
    IN p_state_id text,
    IN p_call_type text,
    IN p_status text,
    IN p_request text,
    IN p_request_hash text,
    IN p_response text,
    IN p_response_hash text,
    IN p_error text,
    IN p_error_hash text,
    IN p_latency_ms double precision,
    INOUT call_index bigint DEFAULT NULL::bigint,
    INOUT created_at timestamp with time zone DEFAULT NULL::timestamp with time zone,
    INOUT completed_at timestamp with time zone DEFAULT NULL::timestamp with time zone,
    INOUT waited_ms double precision DEFAULT NULL::double precision
)
 LANGUAGE plpgsql
AS $procedure$
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
$procedure$
""",
    # callindex_reserve(text,integer)
    """
CREATE FUNCTION callindex_reserve(
    p_state_id text, p_count integer
)
 RETURNS SETOF bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
BEGIN
    -- No row: the state is unknown, or p_count is not in 1..1000000 (the
    -- library's limit too: a counter must never be pushed out of reach).
    RETURN QUERY
    UPDATE call_index_counters
    SET next_index = next_index + p_count
    WHERE state_id = p_state_id AND p_count BETWEEN 1 AND 1000000
    RETURNING next_index - p_count;
END;
$function$
""",
)

PG_PIN_AND_GRANT = """
DO $$
DECLARE
    pair text[];
    grantee name;
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[{pairs}] LOOP
        IF pair[1] = ANY (ARRAY['{definers}']) THEN
            EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp',
                           pair[1], current_schema());
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', pair[1]);
        END IF;
        FOR grantee IN
            SELECT pg_get_userbyid(acl.grantee)
            FROM pg_proc, aclexplode(pg_proc.proacl) AS acl
            WHERE pg_proc.oid = pair[2]::regprocedure AND acl.privilege_type = 'EXECUTE'
              AND acl.grantee NOT IN (0, pg_proc.proowner)
        LOOP
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', pair[1], grantee);
        END LOOP;
    END LOOP;
END;
$$
""".replace(
    "{pairs}", ", ".join(f"ARRAY['{old}', '{new}']" for old, new in ENTRY_POINTS.items())
).replace("{definers}", "', '".join(DEFINERS))


def upgrade() -> None:
    op.execute(SERVED)
    if op.get_context().dialect.name == "postgresql":
        for signature in ENTRY_POINTS:
            op.execute(f"DROP ROUTINE {signature}")


def downgrade() -> None:
    op.execute(UNSERVED)
    if op.get_context().dialect.name == "postgresql":
        for definition in PG_VERSION_1:
            op.execute(definition)
        op.execute(PG_PIN_AND_GRANT)
