BEGIN;

CREATE TABLE callindex_alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT callindex_alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE call_index_counters (
    state_id TEXT NOT NULL, 
    next_index BIGINT DEFAULT '0' NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_call_index_counters PRIMARY KEY (state_id), 
    CONSTRAINT ck_call_index_counters_next_index_non_negative CHECK (next_index >= 0), 
    CONSTRAINT ck_call_index_counters_state_id_length CHECK (length(state_id) BETWEEN 1 AND 255)
)
 WITH (fillfactor = 20);

CREATE TABLE calls (
    call_id TEXT NOT NULL, 
    state_id TEXT NOT NULL, 
    call_index BIGINT NOT NULL, 
    call_type VARCHAR(64) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    request JSONB, 
    request_hash VARCHAR(64), 
    response JSONB, 
    response_hash VARCHAR(64), 
    error JSONB, 
    error_hash VARCHAR(64), 
    latency_ms FLOAT, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    completed_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_calls PRIMARY KEY (call_id), 
    CONSTRAINT ck_calls_call_index_non_negative CHECK (call_index >= 0), 
    CONSTRAINT ck_calls_status_known CHECK (status IN ('pending', 'success', 'error', 'abandoned')), 
    CONSTRAINT fk_calls_state_id_call_index_counters FOREIGN KEY(state_id) REFERENCES call_index_counters (state_id) ON DELETE RESTRICT, 
    CONSTRAINT uq_calls_state_id_call_index UNIQUE (state_id, call_index)
);

CREATE FUNCTION callindex_allocate(state_id text, count integer DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL OR callindex_allocate.count < 1 THEN
        RAISE EXCEPTION 'callindex_allocate: count must be at least 1, not %',
            callindex_allocate.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE call_index_counters AS counters
    SET next_index = counters.next_index + callindex_allocate.count
    WHERE counters.state_id = callindex_allocate.state_id
    RETURNING counters.next_index - callindex_allocate.count INTO first_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate: unknown state %', callindex_allocate.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$$;

INSERT INTO callindex_alembic_version (version_num) VALUES ('0001') RETURNING callindex_alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE INDEX ix_calls_pending_created_at ON calls (created_at) WHERE status = 'pending';

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
$$;

CREATE TRIGGER callindex_guard_calls BEFORE UPDATE OR DELETE ON calls FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls();

CREATE TRIGGER callindex_guard_calls_truncate BEFORE TRUNCATE ON calls FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_calls();

CREATE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward and is never deleted '
        '(% on call_index_counters)', TG_OP USING ERRCODE = 'CX001';
END;
$$;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.state_id <> OLD.state_id) EXECUTE FUNCTION callindex_guard_counters();

CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters FOR EACH ROW EXECUTE FUNCTION callindex_guard_counters();

CREATE TRIGGER callindex_guard_counters_truncate BEFORE TRUNCATE ON call_index_counters FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_counters();

UPDATE callindex_alembic_version SET version_num='0002' WHERE callindex_alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

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
$$;

UPDATE callindex_alembic_version SET version_num='0003' WHERE callindex_alembic_version.version_num = '0002';

COMMIT;

