"""Entry points with a version in their name, and a code on every SQLite refusal.

Rolling upgrades (expand, then contract). The functions a worker calls get a
version in their name: ``callindex_open_state_v2``, ``callindex_reserve_v2``,
``callindex_allocate_v2``, ``callindex_record_call_v2``,
``callindex_finish_call_v2`` (payloads as JSON text) and the procedure
``callindex_record_released_v2``. The unversioned (version 1) functions stay,
so workers of an earlier callindex keep calling the ones they know while new
workers call these; 0010 drops them once no earlier worker is left. Whoever
may execute a version-1 function may execute its version 2.

``callindex_schema_interfaces`` says which entry-point versions each revision
serves: a library meeting a revision it does not know (a newer one) goes on
writing when that revision still serves its interface, and refuses to write
("ahead") when it does not.

SQLite raises no SQLSTATE: every refusal of callindex's triggers now starts
its message with a code, as PostgreSQL's do (``callindex: [CX001] ...``):
CX001 a recorded call cannot change, CX002 a counter only moves forward,
CX003 an index too far ahead, CX005 an index already recorded (the counter is
behind its calls), CX006 a call_type or latency_ms refused.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

INTERFACES = """
CREATE TABLE callindex_schema_interfaces (
    revision VARCHAR(32) NOT NULL,
    interface INTEGER NOT NULL,
    CONSTRAINT pk_callindex_schema_interfaces PRIMARY KEY (revision, interface)
)
"""
SERVED = (
    "INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0009', 1), ('0009', 2)"
)

# Argument types of the entry points that take payloads (as JSON text).
RECORD = "text, text, text, text, text, text, text, text, text, text, double precision"
FINISH = "text, text, text, text, text, text, double precision"
RELEASED = f"{RECORD}, bigint, timestamptz, timestamptz, double precision"

# Each version-2 entry point, with the version-1 signature whose grants it takes.
ENTRY_POINTS = {
    "callindex_open_state_v2(text)": "callindex_open_state(text)",
    "callindex_reserve_v2(text, integer)": "callindex_reserve(text, integer)",
    "callindex_allocate_v2(text, integer)": "callindex_allocate(text, integer)",
    f"callindex_record_call_v2({RECORD})": f"callindex_record_call({RECORD})",
    f"callindex_finish_call_v2({FINISH})": f"callindex_finish_call({FINISH})",
    f"callindex_record_released_v2({RELEASED})": f"callindex_record_released({RELEASED})",
}
# The procedure commits inside its body, which a SECURITY DEFINER routine may
# not: it runs with its caller's rights, as version 1 does.
DEFINERS = tuple(signature for signature in ENTRY_POINTS if "record_released" not in signature)

PG_ENTRY_POINTS = (
    # callindex_allocate_v2
    """
CREATE FUNCTION callindex_allocate_v2(
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
    IF callindex_allocate_v2.count IS NULL
       OR callindex_allocate_v2.count NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'callindex_allocate_v2: count must be 1 to 1000000, not %',
            callindex_allocate_v2.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT reserved INTO first_index
    FROM callindex_reserve_v2(callindex_allocate_v2.state_id,
                              callindex_allocate_v2.count) AS reserved;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate_v2: unknown state %', callindex_allocate_v2.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$function$
""",
    # callindex_finish_call_v2
    """
CREATE FUNCTION callindex_finish_call_v2(
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
        RAISE EXCEPTION 'callindex_finish_call_v2: status must be success or error, not %',
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
    # callindex_open_state_v2
    """
CREATE FUNCTION callindex_open_state_v2(
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
    # callindex_record_call_v2
    """
CREATE FUNCTION callindex_record_call_v2(
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
    # callindex_record_released_v2
    """
CREATE PROCEDURE callindex_record_released_v2(
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
    # callindex_reserve_v2
    """
CREATE FUNCTION callindex_reserve_v2(
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

# As for version 1: each SECURITY DEFINER function resolves names in the
# tables' schema only and is not executable by PUBLIC; every role granted a
# version-1 function is granted its version 2.
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
    "{pairs}", ", ".join(f"ARRAY['{new}', '{old}']" for new, old in ENTRY_POINTS.items())
).replace("{definers}", "', '".join(DEFINERS))

# callindex's SQLite triggers as 0008 leaves them (legacy-writers mode off),
# re-created with a code in front of each message.
SQLITE_TRIGGERS = {
    "callindex_guard_calls_delete": """
CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call cannot be deleted: the audit trail is append-only');
END
""",
    "callindex_guard_calls_update": """
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
""",
    "callindex_guard_calls_replace_id": """
CREATE TRIGGER callindex_guard_calls_replace_id BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE call_id = NEW.call_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: a recorded call cannot be replaced');
END
""",
    # Absent in legacy-writers mode, where the numbering triggers renumber instead.
    "callindex_guard_calls_replace_index": """
CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END
""",
    "callindex_guard_counters_delete": """
CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter is never deleted');
END
""",
    "callindex_check_call_insert": """
CREATE TRIGGER callindex_check_call_insert BEFORE INSERT ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END
""",  # noqa: E501
    "callindex_check_call_update": """
CREATE TRIGGER callindex_check_call_update BEFORE UPDATE OF call_type, latency_ms ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END
""",  # noqa: E501
}
# The numbering trigger of legacy-writers mode lists the table's own columns:
# it is re-created from its stored text.
SQLITE_NUMBERING = "callindex_number_call_given"

CODES = {
    "a call cannot be deleted": "CX001",
    "a call may change only from pending to finished": "CX001",
    "a recorded call cannot be replaced": "CX001",
    "a counter is never deleted": "CX002",
    "call_index is more than": "CX003",
    "call_index taken": "CX005",
    "call_type must be": "CX006",
}


def coded(trigger: str, forward: bool = True) -> str:
    """``trigger`` with a code in front of its message (``forward``), or without."""
    for message, code in CODES.items():
        plain, with_code = f"'callindex: {message}", f"'callindex: [{code}] {message}"
        trigger = (
            trigger.replace(plain, with_code) if forward else trigger.replace(with_code, plain)
        )
    return trigger


def _sqlite_trigger_text(name: str) -> str | None:
    """The stored text of a trigger, or None when absent (offline: as 0008 leaves it)."""
    if op.get_context().as_sql:
        return SQLITE_TRIGGERS.get(name)
    row = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)
        )
        .first()
    )
    return None if row is None else str(row[0])


def _sqlite_recode(forward: bool) -> None:
    for name, frozen in [*SQLITE_TRIGGERS.items(), (SQLITE_NUMBERING, None)]:
        present = _sqlite_trigger_text(name)
        if present is None:
            continue
        op.execute(f"DROP TRIGGER {name}")
        op.execute(coded(frozen if frozen is not None else present, forward))


def upgrade() -> None:
    op.execute(INTERFACES)
    op.execute(SERVED)
    if op.get_context().dialect.name != "postgresql":
        _sqlite_recode(forward=True)
        return
    for definition in PG_ENTRY_POINTS:
        op.execute(definition)
    op.execute(PG_PIN_AND_GRANT)


def downgrade() -> None:
    op.execute("DROP TABLE callindex_schema_interfaces")
    if op.get_context().dialect.name != "postgresql":
        _sqlite_recode(forward=False)
        return
    for signature in ENTRY_POINTS:
        op.execute(f"DROP ROUTINE {signature}")
